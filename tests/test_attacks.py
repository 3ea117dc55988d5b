"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
import redis
from click.testing import CliRunner
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from test_governance import ROLE, SEED, Governed, _two_governance_actors

from govmesh.bus import Bus, Codec, Delivery, SecurityEvent, Subjects, ensure_event_stream
from govmesh.cli import cli
from govmesh.config import Deployment, key_prefix, utc_day
from govmesh.errors import BusError
from govmesh.governance._actor import GovernanceService
from govmesh.governance._replay import ReplayReport, decisions_key, replay
from govmesh.governance.messages import (
    ApprovalListing,
    ApprovalQuery,
    Decision,
    StartRecord,
    ToolIntent,
)
from govmesh.identity import ClientCert, Identity, Issuer, ssl_context
from govmesh.identity._permissions import (
    AUDITOR_ROLE,
    COORDINATOR_ROLE,
    GOVERNANCE_SERVICE,
    SENTINEL_ROLE,
)
from govmesh.observability import AuditIndex
from govmesh.observability._sentinel import SENTINEL_MEMBER, ServerSentinel
from govmesh.observability._service import AuditService
from govmesh.runtime import (
    ENV_LOW_LATENCY,
    WATCH_MEMBER,
    NatsServer,
    RedisServer,
    Runtime,
    Transport,
    advertise,
)
from govmesh.runtime._latency import CPU_LATENCY_DEVICE
from govmesh.scenarios import Swarm, load_scenario, run_workflows
from govmesh.tools import ERP_CREATE_PO

from _deploy import deployment
from _procs import MARK_VAR, wait_until_gone

ROOT = Path(__file__).parent.parent
WAIT_S = 10.0
REFUSED_S = 0.5
"""How long a request the server refuses to route is given before it counts as refused."""


# ---------------------------------------------------------------------------------------
# 1. The audit index verifies every message of the stream as a live receiver does.
# ---------------------------------------------------------------------------------------

_ATTACKED = "wf-attacked"


class Note(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An agent-to-agent message of the attacked workflow."""

    text: str


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def _attack_the_stream(
    dep: Deployment,
    issuer: Issuer,
    *,
    before: Callable[[Bus], Awaitable[None]] | None = None,
) -> None:
    """Run a deployment's audit actor and a receiving agent, and let a compromised agent
    (``mallory``, a real member) publish onto the stream what its permissions allow:

    - a `Decision` "allow" for buyer-1's workflow, claiming ``governance-1``, signed by a key
      the deployment never issued (``token_unknown_issuer``);
    - the same, signed with mallory's own real token and key (``sender_mismatch``);
    - garbage bytes on buyer-1's inbox and on the security subject (``malformed``);
    - a genuine message buyer-1 sent mallory, published again (``replay``).

    Returns once buyer-1 refused what reached it and the audit actor has read everything.
    ``before`` runs (with buyer-1's bus) before the first event.
    """
    audit = AuditService(dep, issuer.identity("audit-1", AUDITOR_ROLE))
    mallory_id = issuer.identity("mallory", "agent")
    buyer = await Bus.connect(dep, issuer.identity("buyer-1", "agent"), rotate=False)
    mallory = await Bus.connect(dep, mallory_id, rotate=False)
    # The deployment's coordinator makes the event stream.
    async with await Bus.connect(
        dep, issuer.identity("coordinator", COORDINATOR_ROLE), rotate=False
    ) as coordinator:
        await ensure_event_stream(coordinator.nc, dep.tenant)
    await audit.start()
    try:
        received: list[Delivery] = []

        async def on_note(d: Delivery) -> None:
            received.append(d)

        await buyer.subscribe(buyer.subjects.msg("buyer-1"), on_note, accepts=Note)
        await buyer.flush()
        captured: asyncio.Queue[bytes] = asyncio.Queue()

        async def capture(msg: object) -> None:
            await captured.put(msg.data)  # type: ignore[attr-defined]

        await mallory.nc.subscribe(mallory.subjects.msg("mallory"), cb=capture)
        await mallory.flush()
        if before is not None:
            await before(buyer)

        # The workflow's own events.
        intent = ToolIntent(tool="erp.order", args={"amount_usd": 4000}, step=1)
        await buyer.publish(buyer.subjects.intent("buyer-1"), intent, workflow=_ATTACKED)
        await buyer.publish(buyer.subjects.msg("mallory"), Note(text="quote?"), workflow=_ATTACKED)
        genuine = await asyncio.wait_for(captured.get(), 30)

        victim = mallory.subjects.msg("buyer-1")
        forged = Decision(
            intent_id="0" * 32,
            intent_hash="0" * 64,
            workflow=_ATTACKED,
            agent="buyer-1",
            outcome="allow",
            policy_hash="f" * 64,
            expires_at=time.time() + 300,
        )
        outsider = Issuer(name=issuer.name, audience=issuer.audience).identity(
            "governance-1", "governance"
        )
        impostor = Identity(
            agent_id="governance-1",
            role="governance",
            key=mallory_id.key,
            token=mallory_id.token,
        )
        codec = Codec()
        for signer in (outsider, impostor):
            _, data = codec.seal(signer, subject=victim, body=forged, workflow=_ATTACKED)
            await mallory.nc.publish(victim, data)
        await mallory.nc.publish(victim, b"\xc1 not a sealed message")
        await mallory.nc.publish(mallory.subjects.security, b"\x00\xff garbage")
        await mallory.nc.publish(mallory.subjects.msg("mallory"), genuine)
        await mallory.flush()

        # Every live receiver refused what reached it, and reported it.
        async def refused_by_buyer() -> bool:
            return sum(buyer.rejected.values()) == 3

        await _until(refused_by_buyer, "buyer-1 refused the forged decisions and the garbage")
        assert dict(buyer.rejected) == {
            "token_unknown_issuer": 1,
            "sender_mismatch": 1,
            "malformed": 1,
        }
        assert received == []
        index = AuditIndex(audit.redis, prefix=dep.key_prefix)

        async def reports_stored() -> bool:
            reports = await index.by_kind("SecurityEvent")
            return sum(r.summary.get("reason") in buyer.rejected for r in reports) == 3

        await _until(reports_stored, "the audit actor stored buyer-1's security events")
        js = audit.bus.nc.jetstream()

        async def all_read() -> bool:
            info = await js.consumer_info(audit.subjects.event_stream, f"audit-{dep.tenant}")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await _until(all_read, "the audit actor read the whole stream")
    finally:
        await audit.close()
        await mallory.close()
        await buyer.close()


def test_forged_replayed_and_malformed_messages_stay_out_of_the_audit_trail(
    secure_nats: tuple[Transport, NatsServer],
    redis_server: RedisServer,
    prefix: str,
    tmp_path: Path,
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    asyncio.run(_attack_the_stream(dep, issuer))
    runner = CliRunner()
    where = ["--redis-url", redis_server.url, "--tenant", prefix]
    claimed = ["replay", "sender_mismatch", "token_unknown_issuer"]

    shown = runner.invoke(cli, ["audit", "show", _ATTACKED, *where, "--json", str(tmp_path / "s")])
    assert shown.exit_code == 0, shown.output
    trace = json.loads((tmp_path / "s").read_text())
    records = [(r[3], r[4]) for r in trace["records"]]  # array-like: (kind, sender)
    assert records == [("ToolIntent", "buyer-1"), ("Note", "buyer-1")], records
    assert sorted(m["reason"] for m in trace["refused"]) == claimed
    assert {m["claimed_sender"] for m in trace["refused"]} == {"governance-1", "buyer-1"}
    assert all(
        m["seq"] > 0 and m["subject"].startswith(f"gm.{prefix}.msg.") for m in trace["refused"]
    )
    assert "3 messages that claimed wf-attacked were refused" in shown.output
    assert "governance-1" not in shown.output.split("refused")[0], "not shown as an event"

    verified = runner.invoke(cli, ["audit", "verify", *where, "--json", str(tmp_path / "v")])
    assert verified.exit_code == 0, verified.output
    report = json.loads((tmp_path / "v").read_text())
    assert report["problems"] == [] and report["refused"] == 5
    assert report["refused_reasons"] == {
        "malformed": 2,
        "replay": 1,
        "sender_mismatch": 1,
        "token_unknown_issuer": 1,
    }
    assert "malformed 2" in verified.output
    one = runner.invoke(cli, ["audit", "verify", _ATTACKED, *where, "--json", str(tmp_path / "w")])
    assert one.exit_code == 0, one.output
    assert json.loads((tmp_path / "w").read_text())["refused"] == 3

    bundle_path = tmp_path / "bundle.json"
    exported = runner.invoke(cli, ["audit", "export", _ATTACKED, *where, "--out", str(bundle_path)])
    assert exported.exit_code == 0, exported.output
    bundle = json.loads(bundle_path.read_text())
    assert [(e["kind"], e["sender"]) for e in bundle["events"]] == records
    assert sorted(m["reason"] for m in bundle["refused"]) == claimed
    assert bundle["integrity"]["verify"]["ok"] and bundle["integrity"]["verify"]["refused"] == 3
    assert "3 refused messages" in exported.output


# ---------------------------------------------------------------------------------------
# 2. Monitoring survives a malformed message in the stream.
# ---------------------------------------------------------------------------------------

_REFUSED_ON_THE_STREAM = sorted(
    ["token_unknown_issuer", "sender_mismatch", "malformed", "malformed", "replay"]
)


def _watched_security(path: Path) -> tuple[list[dict[str, object]], dict[str, object]]:
    seen = json.loads(path.read_text())
    return seen["events"], seen["board"]


def test_watch_shows_forged_and_malformed_messages_as_security_events_and_goes_on(
    secure_nats: tuple[Transport, NatsServer],
    redis_server: RedisServer,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("GOVMESH_HOME", str(home))
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    issuer.identity(WATCH_MEMBER, AUDITOR_ROLE)  # admitted, as a deployment admits it
    follow = ["watch", "--tenant", prefix, "-k", "SecurityEvent"]
    pings = 0
    with advertise(dep, issuer, ca=transport.ca, what="attacked"):
        live_json = tmp_path / "live.json"
        live = subprocess.Popen(
            [sys.executable, "-m", "govmesh.cli", *follow, "--lines", "--json", str(live_json)],
            env={**os.environ, "GOVMESH_HOME": str(home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(x) for x in live.stdout or ()], daemon=True
        ).start()
        shown: list[str] = []

        def showing(what: str) -> int:
            """How many lines the live watch has shown with ``what`` in them."""
            assert live.poll() is None, live.communicate()[1][-3000:]
            while not lines.empty():
                shown.append(lines.get())
            return sum(what in line for line in shown)

        async def until_shown(what: str, count: int) -> None:
            async def seen() -> bool:
                return showing(what) >= count

            await _until(seen, f"govmesh watch showed {count} x {what!r}", timeout=120)

        async def watching(buyer: Bus) -> None:
            # A watch that starts from now shows what comes once it has joined: knock until
            # it answers.
            nonlocal pings
            ping = SecurityEvent(reason="watch-ping", subject=buyer.subjects.security)
            deadline = time.monotonic() + 120
            while not showing("watch-ping"):
                assert time.monotonic() < deadline, "govmesh watch never joined"
                await buyer.publish(buyer.subjects.security, ping)
                pings += 1
                await asyncio.sleep(0.5)

        try:
            asyncio.run(_attack_the_stream(dep, issuer, before=watching))
            # The five messages refused on the stream, and buyer-1's three reports.
            asyncio.run(until_shown(" refused ", 5))
            asyncio.run(until_shown("receiver=buyer-1", 3))
            live.send_signal(signal.SIGINT)
            _, stderr = live.communicate(timeout=60)
        finally:
            if live.poll() is None:
                live.kill()
        assert live.returncode == 130 and "interrupted" in stderr, stderr[-3000:]
        events, board = _watched_security(live_json)
        refused = [e for e in events if e["refused"]]
        assert sorted(e["summary"]["reason"] for e in refused) == _REFUSED_ON_THE_STREAM
        assert {e["sender"] for e in events if not e["refused"]} == {"buyer-1"}
        assert board["refused"] == 5
        text = "".join(shown)
        assert text.count(" refused ") == 5
        assert "claimed kind=Decision sender=governance-1" in text

        # Joining late, the dashboard folds in the same from the stream's start.
        replay_json = tmp_path / "replay.json"
        everything = ["-n", str(pings + 8), "--replay", "--live", "--json", str(replay_json)]
        replayed = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [*follow, *everything])
        assert replayed.exit_code == 0, replayed.output
        events, board = _watched_security(replay_json)
        assert sorted(e["summary"]["reason"] for e in events if e["refused"]) == (
            _REFUSED_ON_THE_STREAM
        )
        assert "5 refused on the stream" in replayed.output
        assert "sender_mismatch" in replayed.output and "governance-1" in replayed.output


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


class Raw:
    """A raw nats-py client holding a member's certificate: what a compromised member runs
    instead of govmesh's Bus, ignoring every error the server sends it."""

    def __init__(self, nc: NATS, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors


class Watched:
    """A deployment of one tenant on the mutual-TLS server, its sentinel running, and a
    monitor (an auditor) that collects the verified security events."""

    def __init__(self, dep: Deployment, issuer: Issuer, transport: Transport) -> None:
        self.dep = dep
        self.issuer = issuer
        self.transport = transport
        self.subjects = Subjects(dep.tenant)
        self.sentinel = ServerSentinel(
            dep,
            issuer.identity(SENTINEL_MEMBER, SENTINEL_ROLE),
            transport=transport,
            window_s=2.0,
            poll_s=0.05,
        )
        self.events: list[Delivery] = []
        self.opened: list[NATS] = []

    async def raw(self, member_id: str, role: str = "agent", *, agent: bool = False) -> Raw:
        """A raw client with the certificate of a newly admitted member."""
        cert = self.transport.admit(member_id, role, tenant=self.dep.tenant, agent=agent)
        return await self.raw_with(cert)

    async def raw_with(self, cert: ClientCert) -> Raw:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(
            self.dep.nats_url,
            tls=ssl_context(cert),
            inbox_prefix=self.subjects.inbox_prefix(cert.member_id),
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=WAIT_S,
        )
        self.opened.append(nc)
        return Raw(nc, errors)

    def reported(self, reason: str, sender: str) -> list[SecurityEvent]:
        return [
            d.body
            for d in self.events
            if d.body.reason == reason and d.body.claimed_sender == sender
        ]

    async def until_reported(self, reason: str, sender: str, count: int = 1) -> list[SecurityEvent]:
        deadline = time.monotonic() + WAIT_S
        while len(found := self.reported(reason, sender)) < count:
            assert time.monotonic() < deadline, [d.body for d in self.events]
            await asyncio.sleep(0.02)
        return found


@pytest.fixture
async def watched(secure_nats: tuple[Transport, NatsServer], prefix: str) -> AsyncIterator[Watched]:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, "", prefix, transport)
    w = Watched(dep, issuer, transport)
    monitor = await Bus.connect(dep, issuer.identity("monitor-1", "auditor"))

    async def on_event(d: Delivery) -> None:
        w.events.append(d)

    await monitor.subscribe(w.subjects.security, on_event, accepts=SecurityEvent)
    await monitor.flush()
    await w.sentinel.start()
    try:
        yield w
    finally:
        for nc in w.opened:
            if not nc.is_closed:
                await nc.close()
        await w.sentinel.close()
        await monitor.close()


async def test_a_raw_client_publishing_on_another_agents_intent_is_reported_by_certificate(
    watched: Watched,
):
    mallory = await watched.raw("mallory")
    victim = watched.subjects.intent("alice")

    await mallory.nc.publish(victim, b"forged intent")
    await mallory.nc.flush()

    (event,) = await watched.until_reported("publish_violation", "mallory")
    assert event.subject == victim
    assert event.receiver == SENTINEL_MEMBER
    assert f"CN=mallory,OU=agent,O={watched.dep.tenant}" in event.detail
    assert "member 'mallory', role 'agent'" in event.detail
    # Signed by the sentinel's own member, which may publish nothing but security events.
    (delivery,) = [d for d in watched.events if d.body == event]
    assert (delivery.claims.sub, delivery.claims.role) == (SENTINEL_MEMBER, SENTINEL_ROLE)


async def test_a_client_hammering_refused_publishes_cannot_flood_the_stream_but_is_counted(
    watched: Watched,
):
    mallory = await watched.raw("mallory")
    sentinel = watched.sentinel

    for i in range(300):
        await mallory.nc.publish(watched.subjects.intent(f"victim-{i % 7}"), b"x")
    await mallory.nc.flush()

    # One event at once, then one per window counting the rest of that window.
    deadline = time.monotonic() + WAIT_S
    while sum(_refusals(e) for e in watched.reported("publish_violation", "mallory")) < 300:
        assert time.monotonic() < deadline, watched.reported("publish_violation", "mallory")
        await asyncio.sleep(0.05)
    events = watched.reported("publish_violation", "mallory")
    assert sum(_refusals(e) for e in events) == 300
    assert 2 <= len(events) <= 6
    assert sentinel.stats()["rejected"] == {"publish_violation": 300}


def _refusals(event: SecurityEvent) -> int:
    """How many refusals one event stands for: itself, or the count of a summary."""
    found = re.search(r"; (\d+) more like it", event.detail)
    return int(found[1]) if found else 1


async def test_a_certificate_of_no_admitted_member_is_reported_by_its_subject(
    watched: Watched,
):
    cert_pem, key_pem = watched.transport.ca.client_cert(
        "stranger", "agent", tenant=watched.dep.tenant
    )
    stranger = ClientCert(
        member_id="stranger",
        role="agent",
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_pem=watched.transport.ca.ca_pem,
    )

    with pytest.raises(nats.errors.Error):
        await watched.raw_with(stranger)

    dn = f"CN=stranger,OU=agent,O={watched.dep.tenant}"
    (event,) = await watched.until_reported("authentication_failure", dn)
    assert "no admitted member" in event.detail


async def test_refusals_during_a_run_count_in_its_security_rejections(
    secure_nats: tuple[Transport, NatsServer], redis_server: RedisServer, prefix: str
):
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix)
    scenario = load_scenario(ROOT / "scenarios" / "procurement.yaml")
    requester = scenario.agents.requester.id
    attacked = asyncio.Event()

    async def attack(swarm: Swarm, finished: Callable[[], int]) -> None:
        # The requester's own certificate, in a raw client that ignores the server's errors.
        (cert,) = [i.cert for i in swarm.identities() if i.agent_id == requester]
        assert cert is not None

        async def quiet(_: Exception) -> None:
            pass

        nc = await nats.connect(
            server.url,
            tls=ssl_context(cert),
            inbox_prefix=Subjects(prefix).inbox_prefix(requester),
            error_cb=quiet,
        )
        try:
            await nc.publish(Subjects(prefix).intent(scenario.agents.procurement.id), b"x")
            await nc.flush()
        finally:
            await nc.close()
        attacked.set()

    report = await run_workflows(
        scenario,
        dep,
        issuer,
        workflows=2,
        seed=1,
        timeout_s=120,
        in_process=True,
        transport=transport,
        during=attack,
    )

    assert attacked.is_set()
    assert report["workflows"]["finished"] == 2
    assert report["security_rejections"] == {"publish_violation": 1}
    assert report["actors"]["sentinel"]["events"] == 1


# ---------------------------------------------------------------------------------------
# 5. A decision is readable only by the agent it answers.
# ---------------------------------------------------------------------------------------


async def test_an_agent_cannot_read_the_decisions_that_answer_another_agent(watched: Watched):
    s = watched.subjects
    governance = await Bus.connect(
        watched.dep, watched.issuer.identity("governance-1", "governance")
    )
    alice = await Bus.connect(watched.dep, watched.issuer.identity("alice", "agent"))
    mallory = await watched.raw("mallory")
    for_alice: asyncio.Queue[Decision] = asyncio.Queue()
    stolen: list[Msg] = []

    async def on_decision(d: Delivery) -> None:
        await for_alice.put(d.body)

    async def steal(msg: Msg) -> None:
        stolen.append(msg)

    try:
        await alice.subscribe(s.decisions("alice"), on_decision, accepts=Decision)
        await alice.flush()
        for wildcard in (s.all("decision"), s.decisions("alice"), f"{s.prefix}.>"):
            await mallory.nc.subscribe(wildcard, cb=steal)
        await mallory.nc.flush()
        await mallory.nc.flush()

        decision = Decision(
            intent_id="i-1",
            intent_hash="0" * 64,
            workflow="wf-1",
            agent="alice",
            outcome="allow",
            policy_hash="p",
            expires_at=time.time() + 60,
        )
        await governance.publish(s.decision("alice", "wf-1"), decision, workflow="wf-1")

        assert await asyncio.wait_for(for_alice.get(), WAIT_S) == decision
        await mallory.nc.flush()  # anything routed to mallory would precede this PONG
        assert stolen == []
        assert sum("permissions violation for subscription" in e for e in mallory.errors) == 3
        events = await watched.until_reported("subscribe_violation", "mallory")
        assert events[0].subject == s.all("decision")
        assert f"CN=mallory,OU=agent,O={watched.dep.tenant}" in events[0].detail
    finally:
        await alice.close()
        await governance.close()


# ---------------------------------------------------------------------------------------
# 6. Intents are decided only for workflows the deployment started; budget authority is
#    cumulative.
# ---------------------------------------------------------------------------------------


PURCHASE = {"item": "desks", "vendor": "Vendor_A", "amount_usd": 4000.0}
"""Under the seed policy's approval threshold (5,000) and workflow limit (10,000)."""


@contextlib.asynccontextmanager
async def _governed(
    tmp_path, secure_nats, redis_server, prefix, *, budget_usd: float = 50_000
) -> AsyncIterator[tuple[Governed, asyncio.Queue[SecurityEvent]]]:
    """Two real governance actors in one queue group on the seed policy, an agent
    ``proc-1`` whose token carries ``budget_usd``, and the tenant's security events."""
    async with _two_governance_actors(
        tmp_path, secure_nats, redis_server, prefix, SEED, budget_usd=budget_usd
    ) as g:
        events: asyncio.Queue[SecurityEvent] = asyncio.Queue()

        async def on_event(d: Delivery) -> None:
            await events.put(d.body)

        watcher = await Bus.connect(g.dep, g.issuer.identity("watcher-1", "auditor"))
        try:
            await watcher.subscribe(watcher.subjects.security, on_event, accepts=SecurityEvent)
            await watcher.flush()
            yield g, events
        finally:
            await watcher.close()


async def _purchase(agent: Bus, workflow: str, *, step: int = 1) -> None:
    """The agent asks for a 4,000 purchase in ``workflow``, started or not."""
    await agent.publish(
        agent.subjects.intent(agent.identity.agent_id),
        ToolIntent(tool=ERP_CREATE_PO, args=PURCHASE, step=step),
        workflow=workflow,
    )


async def _replayed_the_same(g: Governed) -> ReplayReport:
    report = await replay(g.actors[0].redis, prefix=g.dep.key_prefix)
    assert report.mismatches == [] and report.matched == report.decisions, report
    return report


async def test_intents_for_made_up_workflows_are_refused_and_reported(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix) as (g, events):
        # A compromised agent splits 3 x 4,000 across three workflow ids nobody started.
        made_up = [f"wf-made-up-{n}" for n in range(3)]
        for workflow in made_up:
            await _purchase(g.agent, workflow)
        decided = [await asyncio.wait_for(g.decisions.get(), 10) for _ in made_up]
        assert sorted(d.workflow for d in decided) == made_up
        assert [d.outcome for d in decided] == ["deny"] * 3
        reported = [await asyncio.wait_for(events.get(), 10) for _ in made_up]
        spend = await g.actors[0].redis.hgetall(f"{g.dep.key_prefix}:spend")
        report = await _replayed_the_same(g)

    for decision in decided:
        assert decision.reasons == (f"workflow {decision.workflow!r} was not started",)
    assert {(e.reason, e.claimed_sender) for e in reported} == {("unknown_workflow", "proc-1")}
    assert spend == {}
    assert report.decisions == 3


async def test_an_agent_the_start_record_does_not_name_is_refused(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix) as (g, events):
        await g.coordinator.start("wf-started")  # names proc-1 only
        outsider = await Bus.connect(
            g.dep,
            g.issuer.identity("proc-2", ROLE, capabilities=(ERP_CREATE_PO,), budget_usd=50_000),
        )
        theirs: asyncio.Queue[Decision] = asyncio.Queue()

        async def on_decision(d: Delivery) -> None:
            await theirs.put(d.body)

        try:
            await outsider.subscribe(
                outsider.subjects.decisions("proc-2"), on_decision, accepts=Decision
            )
            await outsider.flush()
            await _purchase(outsider, "wf-started")
            refused = await asyncio.wait_for(theirs.get(), 10)
            assert (refused.agent, refused.outcome) == ("proc-2", "deny")
            event = await asyncio.wait_for(events.get(), 10)
            await _purchase(g.agent, "wf-started", step=2)
            allowed = await asyncio.wait_for(g.decisions.get(), 10)
        finally:
            await outsider.close()
        await _replayed_the_same(g)

    assert refused.reasons == ("agent 'proc-2' is not named in the start of workflow 'wf-started'",)
    assert (event.reason, event.claimed_sender) == ("not_a_participant", "proc-2")
    assert (allowed.agent, allowed.outcome) == ("proc-1", "allow")


async def test_only_the_coordinator_records_a_start(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix) as (g, events):
        # Agents may publish on ctl.*: the agent starts a workflow of its own.
        await g.agent.publish(
            g.agent.subjects.ctl("governance"), StartRecord(agents=("proc-1",)), workflow="wf-own"
        )
        await asyncio.sleep(0.2)  # time for it to be recorded, were it recorded
        await _purchase(g.agent, "wf-own")
        decision = await asyncio.wait_for(g.decisions.get(), 10)
        assert decision.outcome == "deny"
        reported = [await asyncio.wait_for(events.get(), 10) for _ in range(2)]

    assert decision.reasons == ("workflow 'wf-own' was not started",)
    assert sorted((e.reason, e.claimed_sender) for e in reported) == [
        ("not_a_coordinator", "proc-1"),
        ("unknown_workflow", "proc-1"),
    ]


async def test_budget_authority_is_cumulative_per_agent_per_day(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix, budget_usd=10_000) as (
        g,
        events,
    ):
        workflows = [f"wf-authority-{n}" for n in range(3)]
        await g.coordinator.start(*workflows)
        # 3 x 4,000 at once, each in a started workflow of its own, to either actor.
        await asyncio.gather(*(_purchase(g.agent, w) for w in workflows))
        decided = [await asyncio.wait_for(g.decisions.get(), 10) for _ in workflows]
        assert sorted(d.outcome for d in decided) == ["allow", "allow", "deny"]
        event = await asyncio.wait_for(events.get(), 10)
        day_spend = await g.actors[0].redis.hgetall(
            f"{g.dep.key_prefix}:day-spend:{utc_day(time.time())}"
        )
        await _replayed_the_same(g)

    [denied] = [d for d in decided if d.outcome == "deny"]
    assert denied.reasons == (
        "amount 4000 plus spend today 8000 (total 12000) exceeds the agent's budget "
        "authority 10000 a day",
    )
    assert (event.reason, event.claimed_sender) == ("over_budget_authority", "proc-1")
    assert {k: float(v) for k, v in day_spend.items()} == {b"proc-1": 8000.0}


# ---------------------------------------------------------------------------------------
# 7. The advertised directory holds nothing that can mint identities.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 8. State stays with its agent, and the tool tier stays sealed in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 9. Stream permissions are least privilege, per tenant.
# ---------------------------------------------------------------------------------------


async def _two_tenants(
    transport: Transport, server: NatsServer, prefix: str
) -> tuple[Deployment, Deployment, Callable[[Deployment, str, str], Awaitable[NATS]]]:
    """Tenants A and B on one server, each with its event stream made by its coordinator
    and one event in it, and a way to connect raw clients with members' certificates."""
    opened: list[NATS] = []

    async def raw(dep: Deployment, member_id: str, role: str) -> NATS:
        cert = transport.admit(member_id, role, tenant=dep.tenant)

        async def quiet(_: Exception) -> None:
            pass

        nc = await nats.connect(
            server.url,
            tls=ssl_context(cert),
            inbox_prefix=Subjects(dep.tenant).inbox_prefix(member_id),
            error_cb=quiet,
            allow_reconnect=False,
        )
        opened.append(nc)
        return nc

    made = []
    for tenant in (prefix, f"{prefix}b"):
        dep, issuer = deployment(server.url, "", tenant, transport)
        coordinator = await raw(dep, "coordinator-1", "coordinator")
        await ensure_event_stream(coordinator, tenant)
        agent = await Bus.connect(dep, issuer.identity("alice", "agent"), rotate=False)
        await agent.publish(agent.subjects.msg("bob"), SecurityEvent(reason="note", subject=""))
        await agent.close()
        made.append(dep)
    raw.opened = opened  # type: ignore[attr-defined]
    return made[0], made[1], raw


@pytest.fixture
async def tenants(
    secure_nats: tuple[Transport, NatsServer], prefix: str
) -> AsyncIterator[tuple[Deployment, Deployment, Any]]:
    transport, server = secure_nats
    a, b, raw = await _two_tenants(transport, server, prefix)
    try:
        yield a, b, raw
    finally:
        for nc in raw.opened:
            if not nc.is_closed:
                await nc.close()


async def _one_event(js: Any, stream: str, tenant: str, durable: str) -> list[Msg]:
    sub = await js.pull_subscribe(
        Subjects(tenant).everything,
        durable=durable,
        stream=stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT),
    )
    msgs: list[Msg] = await sub.fetch(1, timeout=WAIT_S)
    for msg in msgs:
        await msg.ack_sync(timeout=WAIT_S)
    return msgs


async def test_the_auditor_of_one_tenant_cannot_consume_another_tenants_stream(tenants):
    a, b, raw = tenants
    auditor = await raw(a, "audit-1", "auditor")
    js = auditor.jetstream(timeout=REFUSED_S)
    own, other = Subjects(a.tenant).event_stream, Subjects(b.tenant).event_stream

    # Its own tenant's stream it reads and acknowledges, as the audit actor does.
    reader = auditor.jetstream(timeout=WAIT_S)
    assert len(await _one_event(reader, own, a.tenant, "audit-a")) == 1
    assert (await reader.consumer_info(own, "audit-a")).ack_floor.stream_seq == 1

    with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
        await _one_event(js, other, b.tenant, "steal")
    with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
        await js.add_consumer(other, ConsumerConfig(name="steal2", durable_name="steal2"))
    with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
        await js.stream_info(other)

    coordinator_b = await raw(b, "coordinator-1", "coordinator")
    for name in ("steal", "steal2"):
        with pytest.raises(nats.js.errors.NotFoundError):
            await coordinator_b.jetstream(timeout=WAIT_S).consumer_info(other, name)


async def test_the_coordinator_cannot_delete_purge_or_change_the_stream(tenants):
    a, b, raw = tenants
    coordinator = await raw(a, "coordinator-1", "coordinator")
    js = coordinator.jetstream(timeout=REFUSED_S)
    own, other = Subjects(a.tenant).event_stream, Subjects(b.tenant).event_stream
    before = await coordinator.jetstream(timeout=WAIT_S).stream_info(own)
    assert before.state.messages == 1
    assert before.config.deny_delete and before.config.deny_purge

    refused = (nats.errors.TimeoutError, nats.js.errors.Error)
    with pytest.raises(refused):
        await js.delete_stream(own)
    with pytest.raises(refused):
        await js.purge_stream(own)
    changed = before.config.evolve(max_age=1.0)
    with pytest.raises(refused):
        await js.update_stream(changed)
    with pytest.raises(refused):
        await js.delete_stream(other)
    with pytest.raises(refused):
        await js.stream_info(other)

    after = await coordinator.jetstream(timeout=WAIT_S).stream_info(own)
    assert after.state.messages == 1
    assert after.config.max_age == before.config.max_age
    auditor_b = await raw(b, "audit-1", "auditor")
    assert (await auditor_b.jetstream(timeout=WAIT_S).stream_info(other)).state.messages == 1


# ---------------------------------------------------------------------------------------
# 10. A message replayed to another governance actor of the group is refused.
# ---------------------------------------------------------------------------------------


async def test_an_intent_replayed_to_the_other_governance_actor_is_refused(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix) as (g, events):
        first, second = g.actors
        await g.coordinator.start("wf-replayed")
        subject = g.agent.subjects.intent("proc-1")
        _, captured = g.agent.codec.seal(
            g.agent.identity,
            subject=subject,
            body=ToolIntent(tool=ERP_CREATE_PO, args=PURCHASE, step=1),
            workflow="wf-replayed",
        )
        await g.agent.send(subject, captured)
        original = await asyncio.wait_for(g.decisions.get(), 10)
        decided_by = first if first.decided else second
        other = second if decided_by is first else first
        # The actor that decided leaves the group: the replay can only reach the other.
        await decided_by.close()
        await g.agent.send(subject, captured)
        with contextlib.suppress(TimeoutError):
            answered = await asyncio.wait_for(g.decisions.get(), 1)
            raise AssertionError(f"{other.identity.agent_id} answered the replay: {answered}")
        event = await asyncio.wait_for(events.get(), 10)
        records = await other.redis.xlen(decisions_key(g.dep.key_prefix))

    assert original.outcome == "allow"
    assert (event.reason, event.receiver) == ("replay", other.identity.agent_id)
    assert other.decided == {}
    assert records == 1


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
