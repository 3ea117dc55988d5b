"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from govmesh.bus import (
    EVENT_STREAM,
    MAX_HANDLERS,
    SLOW_CONSUMER,
    Bus,
    Codec,
    Delivery,
    Envelope,
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
    await _eventually(lambda: len(events) >= 2)
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
    await ensure_event_stream(p.coordinator.nc)
    await _alice_stores_a_canary(p.alice, "wf-2")

    reader = await p.auditor.nc.jetstream().pull_subscribe(
        p.auditor.subjects.everything,
        durable=None,
        stream=EVENT_STREAM,
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
    await _eventually(lambda: p.auditor.rejected["permission_violation"] >= 1)


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

    await _eventually(lambda: bob.slow_consumers[inbox] > 0 and held.running == bound)
    await _eventually(lambda: any(e.reason == SLOW_CONSUMER for e in events))
    [event, *_] = [e for e in events if e.reason == SLOW_CONSUMER]
    assert event.receiver == "bob" and event.subject == inbox
    assert bob.rejected[SLOW_CONSUMER] == bob.slow_consumers[inbox]

    # The receiver keeps going: what it held is handled, then new messages are too.
    held.release.set()
    await _eventually(lambda: held.handled + bob.slow_consumers[inbox] == burst)
    await mallory.publish(inbox, Flood(n=-1))
    await _eventually(lambda: held.handled + bob.slow_consumers[inbox] == burst + 1)
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

    await _eventually(lambda: held.running == MAX_HANDLERS)
    held.release.set()
    await _eventually(lambda: held.handled == burst)
    # The rest waited unread in the pending buffer, which held them all: none dropped.
    assert held.peak == MAX_HANDLERS and not bob.slow_consumers
