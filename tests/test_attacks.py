"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from govmesh.bus import (
    EVENT_STREAM,
    MAX_HANDLERS,
    SLOW_CONSUMER,
    Bus,
    Codec,
    Delivery,
    SecurityEvent,
    ensure_event_stream,
)
from govmesh.state import Keyring, StateService
from govmesh.state.messages import (
    Snapshot,
    SnapshotQuery,
    SnapshotRecorded,
    SnapshotReply,
    SnapshotStored,
)

from _deploy import deployment


async def _eventually(check: Callable[[], bool], *, within_s: float = 20.0) -> None:
    """Wait until ``check()`` holds; the machine may be busy, so no tight deadline."""
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        await asyncio.sleep(0.02)


async def _security_monitor(bus: Bus) -> list[SecurityEvent]:
    """Collect the security events of ``bus``'s tenant (an auditor sees them live)."""
    events: list[SecurityEvent] = []

    async def on_event(d: Delivery) -> None:
        events.append(d.body)

    await bus.subscribe(bus.subjects.security, on_event, accepts=SecurityEvent)
    await bus.flush()
    return events


# ---------------------------------------------------------------------------------------
# 1. The audit index verifies every message of the stream as a live receiver does.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 2. Monitoring survives a malformed message in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 3. The Redis-protocol server needs credentials.
# ---------------------------------------------------------------------------------------


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

CANARY = b"canary-7f3a-erp-session-token"


def _snapshot_with_canary(workflow: str) -> Snapshot:
    return Snapshot(
        workflow=workflow,
        version=1,
        goal={"phase": "negotiating"},
        tool=b'{"erp_session": "' + CANARY + b'"}',
    )


async def test_an_agent_cannot_read_another_agents_snapshot(
    secure_nats, redis_server, prefix: str
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    state = StateService(dep, issuer.identity("state-1", "state"), keyring=Keyring.generate())
    await state.start()
    alice = await Bus.connect(dep, issuer.identity("alice", "agent"))
    mallory = await Bus.connect(dep, issuer.identity("mallory", "agent"))
    # A platform role may not read an agent's snapshots either (least privilege).
    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    monitor = await Bus.connect(dep, issuer.identity("monitor", "auditor"))
    try:
        events = await _security_monitor(monitor)
        stored = await alice.request(
            alice.subjects.state("alice"),
            _snapshot_with_canary("wf-1"),
            accepts=SnapshotStored,
            workflow="wf-1",
        )
        assert stored.body.stored

        for thief in (mallory, coordinator):
            reply = await thief.request(
                thief.subjects.ctl("state"),
                SnapshotQuery(workflow="wf-1", agent="alice"),
                accepts=SnapshotReply,
            )
            answer: SnapshotReply = reply.body
            assert not answer.found and answer.snapshot is None
            assert "may read only its own snapshots" in answer.error
            assert CANARY not in reply.data

        assert state.bus.rejected["foreign_snapshot"] == 2
        await _eventually(lambda: len(events) >= 2)
        assert {(e.reason, e.claimed_sender) for e in events} == {
            ("foreign_snapshot", "mallory"),
            ("foreign_snapshot", "coordinator-1"),
        }

        own = await alice.request(
            alice.subjects.ctl("state"),
            SnapshotQuery(workflow="wf-1", agent="alice"),
            accepts=SnapshotReply,
        )
        assert own.body.snapshot is not None and CANARY in own.body.snapshot.tool
    finally:
        for bus in (monitor, coordinator, mallory, alice):
            await bus.close()
        await state.close()


async def test_the_event_stream_never_holds_a_tool_tier_in_the_clear(
    secure_nats, redis_server, prefix: str
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    state = StateService(dep, issuer.identity("state-1", "state"), keyring=Keyring.generate())
    await state.start()
    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    alice = await Bus.connect(dep, issuer.identity("alice", "agent"))
    auditor = await Bus.connect(dep, issuer.identity("audit-1", "auditor"))
    try:
        await ensure_event_stream(coordinator.nc)
        stored = await alice.request(
            alice.subjects.state("alice"),
            _snapshot_with_canary("wf-2"),
            accepts=SnapshotStored,
            workflow="wf-2",
        )
        assert stored.body.stored

        reader = await auditor.nc.jetstream().pull_subscribe(
            auditor.subjects.everything,
            durable=None,
            stream=EVENT_STREAM,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )
        seen: list[bytes] = []
        codec = Codec()

        def kinds() -> set[str]:
            return {codec.envelope(codec.open(data).envelope).kind for data in seen}

        deadline = time.monotonic() + 20
        while "SnapshotRecorded" not in kinds() and time.monotonic() < deadline:
            try:
                seen += [m.data for m in await reader.fetch(100, timeout=0.5)]
            except TimeoutError:
                continue
        await reader.unsubscribe()

        assert seen, "the stream recorded this tenant's events"
        assert not [data for data in seen if CANARY in data], "a tool tier is in the clear"
        assert "Snapshot" not in kinds()
        # What the audit keeps of the snapshot: that it was stored, and its hashes.
        envelopes = [codec.envelope(codec.open(data).envelope) for data in seen]
        [record] = [
            codec.body(e, SnapshotRecorded) for e in envelopes if e.kind == "SnapshotRecorded"
        ]
        assert record.agent == "alice" and record.version == 1 and record.stored
        assert len(record.sealed_sha256) == 64

        # Nor may a live subscriber with the auditor's rights read a snapshot in transit.
        await auditor.nc.subscribe(alice.subjects.all("state"))
        await _eventually(lambda: auditor.rejected["permission_violation"] >= 1)
    finally:
        for bus in (auditor, alice, coordinator):
            await bus.close()
        await state.close()


# ---------------------------------------------------------------------------------------
# 9. Stream permissions are least privilege, per tenant.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 10. A message replayed to another governance actor of the group is refused.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 11. Safe defaults: no machine settings changed unasked; bounded subscriptions.
# ---------------------------------------------------------------------------------------


class Flood(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    n: int


async def test_a_burst_never_runs_more_handlers_than_the_bound_and_a_flood_is_reported(
    secure_nats, redis_server, prefix: str
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    bob = await Bus.connect(dep, issuer.identity("bob", "agent"))
    mallory = await Bus.connect(dep, issuer.identity("mallory", "agent"))
    monitor = await Bus.connect(dep, issuer.identity("monitor", "auditor"))
    bound, pending, burst = 4, 20, 300
    running = peak = handled = 0
    release = asyncio.Event()

    async def handler(d: Delivery) -> None:
        nonlocal running, peak, handled
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
            handled += 1

    inbox = bob.subjects.msg("bob")
    try:
        events = await _security_monitor(monitor)
        await bob.subscribe(
            inbox, handler, accepts=Flood, max_handlers=bound, pending_msgs_limit=pending
        )
        await bob.flush()
        for n in range(burst):
            await mallory.publish(inbox, Flood(n=n))
        await mallory.flush()

        await _eventually(lambda: bob.slow_consumers[inbox] > 0 and running == bound)
        await _eventually(lambda: any(e.reason == SLOW_CONSUMER for e in events))
        [event, *_] = [e for e in events if e.reason == SLOW_CONSUMER]
        assert event.receiver == "bob" and event.subject == inbox
        assert bob.rejected[SLOW_CONSUMER] == bob.slow_consumers[inbox]

        # The receiver keeps going: what it held is handled, then new messages are too.
        release.set()
        await _eventually(lambda: handled + bob.slow_consumers[inbox] == burst)
        await mallory.publish(inbox, Flood(n=-1))
        await _eventually(lambda: handled + bob.slow_consumers[inbox] == burst + 1)
        assert peak == bound
        assert len(bob._tasks) < bound + 5, "no handler tasks left behind"
    finally:
        for bus in (monitor, mallory, bob):
            await bus.close()


async def test_a_burst_beyond_the_default_bound_waits_for_free_handlers(
    secure_nats, redis_server, prefix: str
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    bob = await Bus.connect(dep, issuer.identity("bob", "agent"))
    mallory = await Bus.connect(dep, issuer.identity("mallory", "agent"))
    burst = MAX_HANDLERS + 50
    running = peak = handled = 0
    release = asyncio.Event()

    async def handler(d: Delivery) -> None:
        nonlocal running, peak, handled
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
            handled += 1

    inbox = bob.subjects.msg("bob")
    try:
        await bob.subscribe(inbox, handler, accepts=Flood)
        await bob.flush()
        for n in range(burst):
            await mallory.publish(inbox, Flood(n=n))
        await mallory.flush()
        await _eventually(lambda: running == MAX_HANDLERS)
        release.set()
        await _eventually(lambda: handled == burst)
        # The rest waited unread in the pending buffer, which held them all: none dropped.
        assert peak == MAX_HANDLERS and not bob.slow_consumers
    finally:
        for bus in (mallory, bob):
            await bus.close()
