"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from click.testing import CliRunner
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from govmesh.bus import Bus, Codec, Delivery, SecurityEvent, Subjects, ensure_event_stream
from govmesh.cli import cli
from govmesh.config import Deployment
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.identity import ClientCert, Identity, Issuer, ssl_context
from govmesh.identity._permissions import AUDITOR_ROLE, COORDINATOR_ROLE, SENTINEL_ROLE
from govmesh.observability import AuditIndex
from govmesh.observability._sentinel import SENTINEL_MEMBER, ServerSentinel
from govmesh.observability._service import AuditService
from govmesh.runtime import WATCH_MEMBER, NatsServer, RedisServer, Transport, advertise
from govmesh.scenarios import Swarm, load_scenario, run_workflows

from _deploy import deployment

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


# ---------------------------------------------------------------------------------------
# 11. Safe defaults: no machine settings changed unasked; bounded subscriptions.
# ---------------------------------------------------------------------------------------
