"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from govmesh.bus import Bus, Delivery, SecurityEvent
from govmesh.config import key_prefix
from govmesh.errors import BusError
from govmesh.governance._actor import GovernanceService
from govmesh.governance.messages import ApprovalListing, ApprovalQuery
from govmesh.identity import Issuer
from govmesh.identity._permissions import GOVERNANCE_SERVICE
from govmesh.runtime import ENV_LOW_LATENCY, NatsServer, RedisServer, Runtime, Transport, advertise
from govmesh.runtime._latency import CPU_LATENCY_DEVICE

from _deploy import deployment
from _procs import MARK_VAR, wait_until_gone

ROOT = Path(__file__).parent.parent


# ---------------------------------------------------------------------------------------
# 1. The audit index verifies every message of the stream as a live receiver does.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 2. Monitoring survives a malformed message in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 3. The Redis-protocol server needs credentials.
# ---------------------------------------------------------------------------------------


@pytest.fixture
def embedded_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No external services from the environment: the Runtime embeds its own."""
    for name in ("GOVMESH_NATS_URL", "GOVMESH_REDIS_URL", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def _without_credentials(url: str, *, password: str | None = None) -> str:
    """`url` as an outsider who knows where the server is has it: no user, no password,
    or a guessed password for the platform user."""
    scheme, rest = url.split("://", 1)
    where = rest.rsplit("@", 1)[-1]
    return f"{scheme}://{where}" if password is None else f"{scheme}://govmesh:{password}@{where}"


def _sockets_of(pid: int) -> set[str]:
    """The socket inodes process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def _listeners(pid: int) -> tuple[list[str], list[str]]:
    """The TCP addresses and the Unix socket paths process `pid` listens on."""
    mine = _sockets_of(pid)
    tcp = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in mine:  # 0A: LISTEN
                tcp.append(fields[1])
    unix = []
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[6] in mine and int(fields[3], 16) & 0x10000:  # ACCEPTCON
            unix.append(fields[7])
    return tcp, unix


@pytest.mark.usefixtures("embedded_only")
async def test_without_the_redis_secret_nobody_resets_a_workflows_committed_spend(
    tmp_path: Path, prefix: str
) -> None:
    async with Runtime(workdir=tmp_path / "rt", start_ray=False) as rt:
        spend = f"{key_prefix(prefix)}:spend"  # governance's committed spend per workflow
        with redis.Redis.from_url(rt.redis_url) as platform:
            platform.hset(spend, "wf-split", "12000")
            for url in (
                _without_credentials(rt.redis_url),
                _without_credentials(rt.redis_url, password="guessed"),
            ):
                with redis.Redis.from_url(url) as outsider:
                    for attack in (
                        lambda: outsider.hset(spend, "wf-split", "0"),
                        lambda: outsider.delete(spend),
                        lambda: outsider.hgetall(spend),
                    ):
                        with pytest.raises(redis.RedisError, match=r"(?i)auth|password"):
                            attack()
            assert platform.hget(spend, "wf-split") == b"12000"


def _ping_as_nobody(url: str) -> str:
    """Ping the server at `url` from a child process running as user ``nobody``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, try, report, and leave without cleanup
        try:
            os.setgid(65534)
            os.setuid(65534)
            redis.Redis.from_url(url, socket_connect_timeout=2).ping()
            said = "connected"
        except BaseException as exc:
            said = f"refused: {exc}"
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        return f.read().decode()


@pytest.mark.usefixtures("embedded_only")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
async def test_another_local_user_cannot_reach_the_redis_server_even_with_the_secret(
    tmp_path: Path,
) -> None:
    async with Runtime(workdir=tmp_path / "rt", start_ray=False) as rt:
        said = _ping_as_nobody(rt.redis_url)
    assert said.startswith("refused") and "Permission denied" in said, said


@pytest.mark.usefixtures("embedded_only")
async def test_the_embedded_redis_listens_only_on_a_private_unix_socket(tmp_path: Path) -> None:
    async with Runtime(workdir=tmp_path / "rt", start_ray=False) as rt:
        assert rt.redis_server is not None and rt.redis_server.pid is not None
        tcp, unix = _listeners(rt.redis_server.pid)
        assert tcp == [], f"listens on TCP {tcp}"
        assert unix, "listens on no Unix socket"
        for path in map(Path, unix):
            directory = path.parent.stat()
            assert directory.st_uid == os.geteuid()
            assert stat.S_IMODE(directory.st_mode) == 0o700, oct(directory.st_mode)
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, oct(path.stat().st_mode)
            for sibling in path.parent.iterdir():
                assert stat.S_IMODE(sibling.stat().st_mode) & 0o077 == 0, sibling


def _every_process_text() -> str:
    """What anyone on this machine can see of the running processes: ``ps`` and every
    process's command line and (as root) environment."""
    texts = [subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout]
    for proc in Path("/proc").iterdir():
        for name in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                texts.append((proc / name).read_bytes().decode(errors="replace"))
    return "\n".join(texts)


@pytest.mark.usefixtures("embedded_only")
async def test_the_redis_secret_is_in_no_process_list_advertised_record_or_log(
    tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(tmp_path / "home"))
    caplog.set_level(logging.DEBUG)
    async with Runtime(workdir=tmp_path / "rt", start_ray=False) as rt:
        secret = urlsplit(rt.redis_url).password
        assert secret, f"the embedded Redis at {rt.redis_url} takes no password"
        issuer = Issuer(name=f"test:{prefix}", audience=f"govmesh:{prefix}")
        dep = issuer.deployment(
            tenant=prefix, nats_url=rt.nats_url, redis_url=rt.redis_url, tls=True
        )
        assert rt.transport is not None
        with advertise(dep, issuer, ca=rt.transport.ca) as where:
            advertised = {p: p.read_bytes() for p in where.rglob("*") if p.is_file()}
        processes = _every_process_text()
        logs = {p: p.read_bytes() for p in rt.workdir.rglob("*.log")}
    assert advertised and logs
    assert secret not in processes
    for path, data in {**advertised, **logs}.items():
        assert secret.encode() not in data, path
    assert secret not in caplog.text


@pytest.mark.usefixtures("embedded_only")
def test_govmesh_up_prints_no_redis_secret_and_keeps_it_in_a_private_file(
    tmp_path: Path,
) -> None:
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK_VAR: mark, "GOVMESH_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "govmesh.cli", "-v", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "services are up" in line:
                break
        env_file = next(
            Path(w.strip("`;")) for line in seen for w in line.split() if w.endswith("join.env")
        )
        joining = dict(
            line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line
        )
        secret = urlsplit(joining["GOVMESH_REDIS_URL"]).password
        assert secret
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        with redis.Redis.from_url(joining["GOVMESH_REDIS_URL"]) as client:
            assert client.ping()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "GOVMESH_REDIS_URL=unix://govmesh:***@" in stdout
    assert secret not in stdout + "".join(seen) + stderr
    assert wait_until_gone(mark, timeout=60) == []


async def test_an_agent_cannot_list_the_approvals_and_is_reported(
    secure_nats: tuple[Transport, NatsServer], redis_server: RedisServer, prefix: str
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    governance = GovernanceService(
        dep,
        issuer.identity("governance-1", "governance"),
        policy_paths=[str(ROOT / "policies" / "procurement-agent-v2.yaml")],
    )
    await governance.start()
    agent = await Bus.connect(dep, issuer.identity("proc-1", "Procurement-Agent-v2"))
    watcher = await Bus.connect(dep, issuer.identity("auditor-1", "auditor"))
    operator = await Bus.connect(dep, issuer.identity("operator", "operator"))
    try:
        events: asyncio.Queue[SecurityEvent] = asyncio.Queue()

        async def on_event(d: Delivery) -> None:
            await events.put(d.body)

        await watcher.subscribe(watcher.subjects.security, on_event, accepts=SecurityEvent)
        await watcher.flush()
        query = agent.subjects.ctl(GOVERNANCE_SERVICE)
        with pytest.raises(BusError):
            await agent.request(query, ApprovalQuery(), accepts=ApprovalListing, timeout=2)
        event = await asyncio.wait_for(events.get(), 10)
        assert event.reason == "not_an_operator" and "proc-1" in event.detail
        listing = await operator.request(query, ApprovalQuery(), accepts=ApprovalListing)
        assert listing.body.pending == ()
    finally:
        for bus in (agent, watcher, operator):
            await bus.close()
        await governance.close()


# ---------------------------------------------------------------------------------------
# 4. Publishes refused by nats-server become security events.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 5. A decision is readable only by the agent it answers.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 6. Intents are decided only for workflows the deployment started; budget authority is
#    cumulative.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 7. The advertised directory holds nothing that can mint identities.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 8. State stays with its agent, and the tool tier stays sealed in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 9. Stream permissions are least privilege, per tenant.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 10. A message replayed to another governance actor of the group is refused.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 11. Safe defaults: no machine settings changed unasked; bounded subscriptions.
# ---------------------------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    """`pid` and every live process below it."""
    parents: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(proc.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo += parents.get(current, [])
    return found


def _holding(device: Path, pids: set[int]) -> list[int]:
    holders = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == str(device):
                        holders.append(pid)
    return holders


@pytest.mark.usefixtures("embedded_only")
async def test_a_default_runtime_changes_no_machine_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_LOW_LATENCY, raising=False)
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    async with Runtime(workdir=tmp_path / "rt", start_ray=False) as rt:
        assert not rt.low_latency.held
        assert _holding(CPU_LATENCY_DEVICE, _descendants(os.getpid())) == []
        assert rt.nats_server is not None and rt.nats_server.pid is not None
        environ = Path(f"/proc/{rt.nats_server.pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"GOMAXPROCS=") for e in environ)
