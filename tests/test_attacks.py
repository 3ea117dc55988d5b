"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
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
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from nacl.bindings import crypto_sign_seed_keypair
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from govmesh.bus import (
    MAX_HANDLERS,
    SLOW_CONSUMER,
    Bus,
    Codec,
    Delivery,
    Envelope,
    SecurityEvent,
    Subjects,
    ensure_event_stream,
)
from govmesh.cli import cli
from govmesh.config import Deployment, key_prefix, utc_day
from govmesh.errors import BusError, SecurityError
from govmesh.governance._actor import GovernanceService
from govmesh.governance._replay import ReplayReport, decisions_key, replay
from govmesh.governance.messages import (
    ApprovalListing,
    ApprovalQuery,
    Decision,
    StartRecord,
    ToolIntent,
)
from govmesh.identity import (
    OPERATOR_MEMBER,
    SOCKET_MEMBERS,
    ClientCert,
    EnrolmentServer,
    Identity,
    Issuer,
    MemberKeys,
    SigningKey,
    TokenVerifier,
    request_grant,
    ssl_context,
)
from govmesh.observability import AuditIndex
from govmesh.observability._sentinel import SENTINEL_MEMBER, ServerSentinel
from govmesh.observability._service import AuditService
from govmesh.roles import AUDITOR_ROLE, COORDINATOR_ROLE, SENTINEL_ROLE
from govmesh.runtime import (
    ENV_LOW_LATENCY,
    WATCH_MEMBER,
    JoinedDeployment,
    NatsServer,
    RedisServer,
    Runtime,
    Transport,
    advertise,
    join,
)
from govmesh.runtime._latency import CPU_LATENCY_DEVICE
from govmesh.scenarios import Swarm, run_workflows, scenario_app
from govmesh.state import Keyring, StateService
from govmesh.state.messages import (
    Snapshot,
    SnapshotQuery,
    SnapshotRecorded,
    SnapshotReply,
    SnapshotStored,
)
from govmesh.subjects import GOVERNANCE_SERVICE

from _deploy import ERP_TERMS, deployment
from _governed import ROLE, SEED, Governed, two_governance_actors
from _procs import MARK_VAR, wait_until_gone
from procurement.tools import create_purchase_order

ERP_CREATE_PO = create_purchase_order.name

ROOT = Path(__file__).parent.parent
WAIT_S = 10.0
REFUSED_S = 0.5
"""How long a request the server refuses to route is given before it counts as refused."""


@contextlib.contextmanager
def _in_a_thread(context: contextlib.AbstractAsyncContextManager[Path]) -> Iterator[Path]:
    """Enter an async context (a deployment's `advertise`, whose enrolment socket answers
    in its event loop) on a thread of its own, for a test that blocks while it is in."""
    entered: queue.Queue[Path | BaseException] = queue.Queue()
    loop = asyncio.new_event_loop()
    leave = asyncio.Event()

    async def hold() -> None:
        try:
            async with context as value:
                entered.put(value)
                await leave.wait()
        except BaseException as exc:
            entered.put(exc)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(hold(),), daemon=True)
    thread.start()
    value = entered.get(timeout=60)
    if isinstance(value, BaseException):
        thread.join()
        raise value
    try:
        yield value
    finally:
        loop.call_soon_threadsafe(leave.set)
        thread.join(timeout=60)
        loop.close()


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


async def _eventually(check: Callable[[], bool], what: str) -> None:
    """`_until` for a check that needs no awaiting."""

    async def holds() -> bool:
        return check()

    await _until(holds, what)


async def _security_monitor(bus: Bus) -> list[SecurityEvent]:
    """Collect the security events of ``bus``'s tenant (an auditor sees them live)."""
    events: list[SecurityEvent] = []

    async def on_event(d: Delivery) -> None:
        events.append(d.body)

    await bus.subscribe(bus.subjects.security, on_event, accepts=SecurityEvent)
    await bus.flush()
    return events


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
    with _in_a_thread(advertise(dep, issuer, ca=transport.ca, what="attacked")):
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
        async with advertise(dep, issuer, ca=rt.transport.ca) as where:
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
        tools=[ERP_TERMS],
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
    app = scenario_app(ROOT / "scenarios" / "procurement.yaml")
    requester, buyer = app.agent_ids
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
            await nc.publish(Subjects(prefix).intent(buyer), b"x")
            await nc.flush()
        finally:
            await nc.close()
        attacked.set()

    report = await run_workflows(
        app,
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
    async with two_governance_actors(
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


def _waiting_scenario(path: Path) -> None:
    """Write to `path` the procurement scenario with every purchase over the approval
    threshold and under the limit, so each one waits for an operator."""
    text = (ROOT / "scenarios" / "procurement.yaml").read_text()
    changes = {
        "../policies/": f"{ROOT / 'policies'}/",
        "path: [../examples]": f"path: [{ROOT / 'examples'}]",
        "vendors: {Vendor_A: 0.45, Vendor_B: 0.40, Vendor_C: 0.15}": "vendors: {Vendor_A: 1.0}",
        "amount_usd: {min: 250, max: 12500}": "amount_usd: {min: 5500, max: 9500}",
    }
    for old, new in changes.items():
        assert old in text, f"the procurement scenario no longer says {old!r}"
        text = text.replace(old, new)
    path.write_text(text)


@pytest.fixture(scope="module")
def waiting_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A live ``govmesh run`` whose every purchase waits for an operator, advertised in a
    home directory of its own; yields its advertised directory once both escalations are
    pending (an operator has enrolled and listed them by then), and stops the run after."""
    base = tmp_path_factory.mktemp("waiting-run")
    scenario = base / "waiting.yaml"
    _waiting_scenario(scenario)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOVMESH_", "RAY_"))}
    env["GOVMESH_HOME"] = str(base / "home")
    govmesh = [sys.executable, "-m", "govmesh.cli"]
    log = base / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*govmesh, "run", str(scenario), "-n", "2", "--manual-approvals"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        listed, pending = base / "pending.json", []
        deadline = time.monotonic() + 180
        while len(pending) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the escalations never became pending"
            got = subprocess.run(
                [*govmesh, "approvals", "list", "--json", str(listed)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                timeout=60,
            )
            if got.returncode == 0:
                pending = json.loads(listed.read_text())
            time.sleep(0.5)
        yield base / "home" / "acme"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Ctrl-C closes the enrolment socket and removes the advertised directory.
    assert proc.returncode == 130, log.read_text()[-3000:]
    assert not (base / "home" / "acme").exists()


def _mints(seed: bytes, joined: JoinedDeployment) -> bool:
    """Whether `seed`, as an Ed25519 issuer key, signs tokens the deployment accepts."""
    dep = joined.deployment
    forger = Issuer(name="forged", audience=dep.audience, key=SigningKey(seed))
    token = forger.issue(sub="governance-1", role="governance", key=SigningKey().public)
    try:
        TokenVerifier(issuers=list(dep.issuers), audience=dep.audience).verify(token)
    except SecurityError:
        return False
    return True


def _decoded(data: bytes) -> list[bytes]:
    """`data` and what the strings of its JSON decode to as base64 or hex."""
    blobs = [data]
    try:
        document = json.loads(data)
    except ValueError:
        return blobs
    for value in document.values() if isinstance(document, dict) else ():
        if isinstance(value, str):
            padded = value + "=" * (-len(value) % 4)
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                with contextlib.suppress(ValueError):
                    blobs.append(decode(padded))
            with contextlib.suppress(ValueError):
                blobs.append(bytes.fromhex(value))
    return blobs


def _key_material(path: Path, joined: JoinedDeployment) -> list[str]:
    """What in the file at `path` could mint a governance identity of the deployment."""
    data = path.read_bytes()
    found = []
    if b"PRIVATE KEY" in data:
        found.append(f"{path.name}: a PEM private key")
    for load in (serialization.load_pem_private_key, serialization.load_der_private_key):
        with contextlib.suppress(ValueError, TypeError, UnsupportedAlgorithm):
            load(data, password=None)
            found.append(f"{path.name}: a private key ({load.__name__})")
    for blob in _decoded(data):
        for at in range(len(blob) - 31):
            if _mints(blob[at : at + 32], joined):
                found.append(f"{path.name}: the token issuer's seed at byte {at}")
    return found


def test_the_advertised_directory_holds_nothing_that_can_mint_an_identity(
    waiting_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(waiting_run.parent))
    joined = join("acme")
    files = [p for p in waiting_run.rglob("*") if p.is_file()]
    assert "deployment.json" in {p.name for p in files}, files
    assert [finding for p in files for finding in _key_material(p, joined)] == []


async def test_the_enrolment_socket_gives_no_governance_gateway_or_agent_identity(
    waiting_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(waiting_run.parent))
    joined = join("acme")
    socket_path = waiting_run / "enrol.sock"
    assert stat.S_IMODE(waiting_run.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    asked = [
        ("governance-1", "governance"),
        ("gateway-1", "gateway"),
        ("procurement-1", "Procurement-Agent-v2"),
        ("requester-1", "Requester"),
        ("budget-1", "budget"),
        ("state-1", "state"),
        ("audit-1", "auditor"),
        ("issuer-acme", "issuer"),
        ("coordinator-attack", "coordinator"),
        (OPERATOR_MEMBER, "governance"),
        (OPERATOR_MEMBER, "auditor"),
        (WATCH_MEMBER, "gateway"),
    ]
    for member, role in asked:
        request = MemberKeys(member, role).request()
        with pytest.raises(SecurityError, match=r"enrolment_refused.*refused member"):
            await request_grant(socket_path, request)
    # What it does grant names the operator or watch member, grants no tool and no budget.
    verifier = TokenVerifier(
        issuers=list(joined.deployment.issuers), audience=joined.deployment.audience
    )
    for member, role in SOCKET_MEMBERS.items():
        identity = await joined.member(member, role)
        claims = verifier.verify(identity.token)
        assert (claims.sub, claims.role, claims.capabilities, claims.budget_usd) == (
            member,
            role,
            (),
            0.0,
        )
        assert identity.cert is not None and (identity.cert.member_id, identity.cert.role) == (
            member,
            role,
        )


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
    reason="runs a client as another user: needs root and a system python3",
)
async def test_the_enrolment_socket_refuses_another_user_even_when_it_may_connect() -> None:
    base = Path(tempfile.mkdtemp(prefix="gm-enrol-", dir="/tmp"))
    try:
        os.chmod(base, 0o711)
        path = base / "enrol.sock"
        issuer = Issuer(name="test:acme", audience="govmesh:acme")
        async with EnrolmentServer(path, issuer=issuer, ca=None, tenant="acme") as server:
            os.chmod(path, 0o666)  # permissions loosened by mistake
            request = msgspec.json.encode(MemberKeys(WATCH_MEMBER, AUDITOR_ROLE).request())
            client = (
                "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "s.sendall(sys.stdin.buffer.read()); print(s.makefile('rb').readline().decode())"
            )
            proc = await asyncio.create_subprocess_exec(
                "/usr/bin/python3",
                "-c",
                client,
                str(path),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                user=65534,
                group=65534,
                cwd="/",
            )
            out, err = await proc.communicate(request + b"\n")
            assert proc.returncode == 0, err
            assert "this client runs as uid 65534" in json.loads(out)["error"]
            assert (server.refused, server.granted) == ({"peer": 1}, {})
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_the_swarm_s_actors_are_given_no_private_key_and_make_their_own(
    secure_nats: tuple[Transport, NatsServer],
    redis_server: RedisServer,
    prefix: str,
    ray_session: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import ray.actor
    from ray import cloudpickle

    shipped: list[tuple[str, tuple[Any, ...], bytes, set[type]]] = []

    class Recording(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO) -> None:
            super().__init__(file, protocol=5)
            self.types: set[type] = set()

        def reducer_override(self, obj: Any) -> Any:
            self.types.add(type(obj))
            return super().reducer_override(obj)

    def record(method: str, args: Any, kwargs: Any) -> None:
        out = io.BytesIO()
        pickler = Recording(out)
        pickler.dump((args, kwargs))
        shipped.append((method, tuple(args or ()), out.getvalue(), pickler.types))

    create, call = ray.actor.ActorClass._remote, ray.actor.ActorHandle._actor_method_call

    def recorded_create(self: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        record("__init__", args, kwargs)
        return create(self, args=args, kwargs=kwargs, **options)

    def recorded_call(
        self: Any, method: str, args: Any = None, kwargs: Any = None, **kw: Any
    ) -> Any:
        record(method, args, kwargs)
        return call(self, method, args=args, kwargs=kwargs, **kw)

    made: list[bytes] = []  # seeds of every Ed25519 key made in this process
    init = SigningKey.__init__

    def recorded_init(self: SigningKey, raw: bytes | None = None) -> None:
        init(self, raw)
        made.append(self.raw)

    monkeypatch.setattr(ray.actor.ActorClass, "_remote", recorded_create)
    monkeypatch.setattr(ray.actor.ActorHandle, "_actor_method_call", recorded_call)
    monkeypatch.setattr(SigningKey, "__init__", recorded_init)
    caplog.set_level(logging.DEBUG)

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    app = scenario_app(ROOT / "scenarios" / "procurement.yaml")
    requester, agent = app.agent_ids
    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    await ensure_event_stream(coordinator.nc, dep.tenant)
    swarm = Swarm(app, dep, issuer, seed=1, transport=transport)
    try:
        await swarm.start()
        os.kill((await swarm.pids())[agent], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while swarm.restarts.get(agent, 0) == 0:
            assert time.monotonic() < deadline, "the agent actor never came back"
            await asyncio.sleep(0.1)
    finally:
        await swarm.close()
        await coordinator.close()
    monkeypatch.undo()

    assert shipped, "nothing was recorded"
    for method, _, data, types in shipped:
        assert not types & {Identity, SigningKey, ClientCert, MemberKeys}, (method, types)
        assert b"PRIVATE KEY" not in data, method
        assert not [seed for seed in made if seed in data], method
    verifier = TokenVerifier(issuers=list(dep.issuers), audience=dep.audience)
    enrolled: dict[str, list[bytes]] = {}
    for method, args, _, _ in shipped:
        if method in ("start", "ensure_started"):
            claims = verifier.verify(args[0].token)
            enrolled.setdefault(claims.sub, []).append(claims.key.raw)
    members = {"governance-1", "gateway-1", "audit-1", "budget-1", "state-1", agent}
    assert members | {requester} == set(enrolled)
    # Each key was made in its actor's process, none here; a restarted actor made new ones.
    made_here = {crypto_sign_seed_keypair(seed)[0] for seed in made}
    assert not [k for keys in enrolled.values() for k in keys if k in made_here]
    assert len(enrolled[agent]) == 2 and enrolled[agent][0] != enrolled[agent][1]
    assert "PRIVATE KEY" not in caplog.text
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert leaked == []


# ---------------------------------------------------------------------------------------
# 8. State stays with its agent, and the tool tier stays sealed in the stream.
# ---------------------------------------------------------------------------------------

CANARY = b"canary-7f3a-erp-session-token"


@dataclass
class StateParties:
    state: StateService
    alice: Bus
    mallory: Bus
    coordinator: Bus
    auditor: Bus


@pytest.fixture
async def state_parties(secure_nats, redis_server, prefix: str) -> AsyncIterator[StateParties]:
    """The real state actor; alice, whose snapshot holds a secret; mallory, a compromised
    agent; the coordinator (a platform role); an auditor, as `govmesh watch` connects."""
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    state = StateService(dep, issuer.identity("state-1", "state"), keyring=Keyring.generate())
    await state.start()
    buses = [
        await Bus.connect(dep, issuer.identity(name, role))
        for name, role in (
            ("alice", "agent"),
            ("mallory", "agent"),
            ("coordinator-1", "coordinator"),
            ("audit-1", "auditor"),
        )
    ]
    yield StateParties(state, *buses)
    for bus in reversed(buses):
        await bus.close()
    await state.close()


async def _alice_stores_a_canary(alice: Bus, workflow: str) -> None:
    stored = await alice.request(
        alice.subjects.state("alice"),
        Snapshot(
            workflow=workflow,
            version=1,
            goal={"phase": "negotiating"},
            tool=b'{"erp_session": "' + CANARY + b'"}',
        ),
        accepts=SnapshotStored,
        workflow=workflow,
    )
    assert stored.body.stored


async def test_an_agent_cannot_read_another_agents_snapshot(state_parties: StateParties) -> None:
    p = state_parties
    events = await _security_monitor(p.auditor)
    await _alice_stores_a_canary(p.alice, "wf-1")

    # A platform role may not read an agent's snapshots either (least privilege).
    for thief in (p.mallory, p.coordinator):
        reply = await thief.request(
            thief.subjects.ctl("state"),
            SnapshotQuery(workflow="wf-1", agent="alice"),
            accepts=SnapshotReply,
        )
        answer: SnapshotReply = reply.body
        assert not answer.found and answer.snapshot is None
        assert "may read only its own snapshots" in answer.error
        assert CANARY not in reply.data

    assert p.state.bus.rejected["foreign_snapshot"] == 2
    await _eventually(lambda: len(events) >= 2, "both refusals were reported")
    assert {(e.reason, e.claimed_sender) for e in events} == {
        ("foreign_snapshot", "mallory"),
        ("foreign_snapshot", "coordinator-1"),
    }

    own = await p.alice.request(
        p.alice.subjects.ctl("state"),
        SnapshotQuery(workflow="wf-1", agent="alice"),
        accepts=SnapshotReply,
    )
    assert own.body.snapshot is not None and CANARY in own.body.snapshot.tool


async def test_the_event_stream_never_holds_a_tool_tier_in_the_clear(
    state_parties: StateParties,
) -> None:
    p = state_parties
    await ensure_event_stream(p.coordinator.nc, p.coordinator.subjects.tenant)
    await _alice_stores_a_canary(p.alice, "wf-2")

    reader = await p.auditor.nc.jetstream().pull_subscribe(
        p.auditor.subjects.everything,
        durable=None,
        stream=p.auditor.subjects.event_stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
    )
    seen: list[bytes] = []
    codec = Codec()

    def envelopes() -> list[Envelope]:
        return [codec.envelope(codec.open(data).envelope) for data in seen]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(e.kind == "SnapshotRecorded" for e in envelopes()):
            break
        try:
            seen += [m.data for m in await reader.fetch(100, timeout=0.5)]
        except TimeoutError:
            continue
    await reader.unsubscribe()

    assert seen, "the stream recorded this tenant's events"
    assert not [data for data in seen if CANARY in data], "a tool tier is in the clear"
    assert "Snapshot" not in {e.kind for e in envelopes()}
    # What the audit keeps of the snapshot: that it was stored, and its hashes.
    [record] = [
        codec.body(e, SnapshotRecorded) for e in envelopes() if e.kind == "SnapshotRecorded"
    ]
    assert record.agent == "alice" and record.version == 1 and record.stored
    assert len(record.sealed_sha256) == 64

    # Nor may a live subscriber with the auditor's rights read a snapshot in transit.
    await p.auditor.nc.subscribe(p.alice.subjects.all("state"))
    await _eventually(
        lambda: p.auditor.rejected["permission_violation"] >= 1,
        "the server refused the auditor's subscription to snapshots",
    )


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


class Flood(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    n: int


class HeldHandler:
    """A handler that holds every message until `release` is set, counting how many of it
    run at once."""

    def __init__(self) -> None:
        self.running = self.peak = self.handled = 0
        self.release = asyncio.Event()

    async def __call__(self, d: Delivery) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
            self.handled += 1


@pytest.fixture
async def receiver_and_flooder(
    secure_nats, redis_server, prefix: str
) -> AsyncIterator[tuple[Bus, Bus, Bus]]:
    """Bob receives on his inbox, mallory (a compromised agent) floods it, an auditor
    watches the security events."""
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    buses = [
        await Bus.connect(dep, issuer.identity(name, role))
        for name, role in (("bob", "agent"), ("mallory", "agent"), ("monitor", "auditor"))
    ]
    yield buses[0], buses[1], buses[2]
    for bus in reversed(buses):
        await bus.close()


async def _flood(mallory: Bus, inbox: str, count: int) -> None:
    for n in range(count):
        await mallory.publish(inbox, Flood(n=n))
    await mallory.flush()


async def test_a_burst_never_runs_more_handlers_than_the_bound_and_a_flood_is_reported(
    receiver_and_flooder: tuple[Bus, Bus, Bus],
) -> None:
    bob, mallory, monitor = receiver_and_flooder
    bound, pending, burst = 4, 20, 300
    held = HeldHandler()
    inbox = bob.subjects.msg("bob")
    events = await _security_monitor(monitor)
    await bob.subscribe(inbox, held, accepts=Flood, max_handlers=bound, pending_msgs_limit=pending)
    await bob.flush()
    await _flood(mallory, inbox, burst)

    await _eventually(
        lambda: bob.slow_consumers[inbox] > 0 and held.running == bound,
        "the bound is reached and the flood dropped",
    )
    await _eventually(
        lambda: any(e.reason == SLOW_CONSUMER for e in events), "a slow consumer was reported"
    )
    [event, *_] = [e for e in events if e.reason == SLOW_CONSUMER]
    assert event.receiver == "bob" and event.subject == inbox
    assert bob.rejected[SLOW_CONSUMER] == bob.slow_consumers[inbox]

    # The receiver keeps going: what it held is handled, then new messages are too.
    held.release.set()
    await _eventually(
        lambda: held.handled + bob.slow_consumers[inbox] == burst, "what was held is handled"
    )
    await mallory.publish(inbox, Flood(n=-1))
    await _eventually(
        lambda: held.handled + bob.slow_consumers[inbox] == burst + 1, "a new message is handled"
    )
    assert held.peak == bound


async def test_a_burst_beyond_the_default_bound_waits_for_free_handlers(
    receiver_and_flooder: tuple[Bus, Bus, Bus],
) -> None:
    bob, mallory, _ = receiver_and_flooder
    burst = MAX_HANDLERS + 50
    held = HeldHandler()
    inbox = bob.subjects.msg("bob")
    await bob.subscribe(inbox, held, accepts=Flood)
    await bob.flush()
    await _flood(mallory, inbox, burst)

    await _eventually(lambda: held.running == MAX_HANDLERS, "the default bound is reached")
    held.release.set()
    await _eventually(lambda: held.handled == burst, "the whole burst is handled")
    # The rest waited unread in the pending buffer, which held them all: none dropped.
    assert held.peak == MAX_HANDLERS and not bob.slow_consumers
