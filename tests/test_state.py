"""The state actor on real servers: snapshots in four tiers stored sealed, served back,
retained, and refused loudly when tampered with or misplaced."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from govmesh.agents import AgentService
from govmesh.bus import Bus, Delivery
from govmesh.errors import StateError
from govmesh.llm import SimulatedModel, SimulatedModelSettings
from govmesh.state import Keyring, StateService
from govmesh.state.messages import Snapshot, SnapshotQuery, SnapshotRecorded, SnapshotReply

from _deploy import deployment

ROOT = Path(__file__).parent.parent

POLICY_HASH = "ab" * 32
TOOL = b'{"erp_session": "s-42", "draft_po": "PO-draft-9"}'


@dataclass
class Parts:
    agent: Bus
    auditor: Bus
    state: StateService
    redis: aioredis.Redis
    prefix: str


@pytest.fixture
async def parts(secure_nats, redis_server, prefix: str) -> AsyncIterator[Parts]:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    state = StateService(
        dep, issuer.identity("state-1", "state"), keyring=Keyring.generate("k1"), retain=3
    )
    await state.start()
    agent = await Bus.connect(dep, issuer.identity("agent-1", "agent"))
    auditor = await Bus.connect(dep, issuer.identity("audit-1", "auditor"))
    redis = aioredis.Redis.from_url(redis_server.url)
    yield Parts(agent, auditor, state, redis, dep.key_prefix)
    await redis.aclose()
    await auditor.close()
    await agent.close()
    await state.close()


async def _query(p: Parts, workflow: str, version: int = 0) -> SnapshotReply:
    reply = await p.agent.request(
        p.agent.subjects.ctl("state"),
        SnapshotQuery(workflow=workflow, agent="agent-1", version=version),
        accepts=SnapshotReply,
    )
    return reply.body


async def _send(p: Parts, snap: Snapshot, *, until_version: int | None = None) -> None:
    await p.agent.publish(p.agent.subjects.state("agent-1"), snap, workflow=snap.workflow)
    deadline = time.monotonic() + 10
    want = until_version or snap.version
    while time.monotonic() < deadline:
        got = await _query(p, snap.workflow)
        if got.snapshot is not None and got.snapshot.version >= want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"version {want} of {snap.workflow} was never stored")


def _snap(workflow: str, version: int) -> Snapshot:
    return Snapshot(
        workflow=workflow,
        version=version,
        goal={"phase": "negotiating", "round": version, "vendor": "Vendor_A"},
        policy_hash=POLICY_HASH,
        tool=TOOL,
        reflections=tuple(f"reflection {i}: the quote was too high" for i in range(version)),
    )


async def test_every_tier_round_trips_through_the_state_actor_and_the_tool_tier_is_sealed(
    parts: Parts,
) -> None:
    sent = _snap("wf-tiers", 2)
    await _send(parts, sent)

    reply = await _query(parts, "wf-tiers", version=2)
    assert reply.found and reply.snapshot == sent
    [stored] = await parts.redis.zrange(f"{parts.prefix}:snap:wf-tiers:agent-1", 0, -1)
    assert b"erp_session" not in stored and b"s-42" not in stored, "the tool tier is encrypted"


async def test_only_the_newest_versions_are_kept_and_a_resent_version_replaces_the_first(
    parts: Parts,
) -> None:
    for version in range(1, 6):
        await _send(parts, _snap("wf-keep", version))
    await _send(parts, _snap("wf-keep", 5))

    key = f"{parts.prefix}:snap:wf-keep:agent-1"
    assert [int(score) for _, score in await parts.redis.zrange(key, 0, -1, withscores=True)] == [
        3,
        4,
        5,
    ]
    assert not (await _query(parts, "wf-keep", version=1)).found
    latest = await _query(parts, "wf-keep")
    assert latest.snapshot is not None and latest.snapshot.version == 5


async def test_a_tampered_or_misplaced_snapshot_is_refused_loudly(parts: Parts) -> None:
    await _send(parts, _snap("wf-a", 1))
    key = f"{parts.prefix}:snap:wf-a:agent-1"
    [stored] = await parts.redis.zrange(key, 0, -1)
    # Copied under another workflow: every tier is intact, but it is not that workflow's.
    await parts.redis.zadd(f"{parts.prefix}:snap:wf-b:agent-1", {stored: 1})
    moved = await _query(parts, "wf-b")
    assert not moved.found and moved.snapshot is None
    assert "belongs to" in moved.error and "wf-a" in moved.error

    # One bit flipped inside the encrypted tool tier.
    at = stored.index(b"k1") + 20
    tampered = stored[:at] + bytes([stored[at] ^ 1]) + stored[at + 1 :]
    await parts.redis.delete(key)
    await parts.redis.zadd(key, {tampered: 1})
    reply = await _query(parts, "wf-a")
    assert not reply.found and reply.snapshot is None
    assert "failed authentication" in reply.error


async def test_an_oversized_goal_state_is_refused_in_the_agent_with_a_clear_error(
    parts: Parts,
) -> None:
    agent = AgentService(
        parts.state.deployment,
        parts.state.identity,  # never started: the check comes before the bus
        model=SimulatedModel(SimulatedModelSettings(), seed=1),
    )
    with pytest.raises(StateError, match=r"goal state of wf-big/state-1 is 12,0\d\d bytes"):
        await agent.snapshot("wf-big", {"notes": "x" * 12_000})
    with pytest.raises(StateError, match=r"not JSON at \$\.when"):
        await agent.snapshot("wf-big", {"when": {1, 2}})


async def test_each_stored_snapshot_is_recorded_without_its_content(parts: Parts) -> None:
    records: list[Delivery] = []
    got = asyncio.Event()

    async def on_record(d: Delivery) -> None:
        records.append(d)
        got.set()

    watcher = parts.auditor
    await watcher.subscribe(watcher.subjects.all("snapshot"), on_record, accepts=SnapshotRecorded)
    await watcher.flush()
    await _send(parts, _snap("wf-rec", 1))
    await asyncio.wait_for(got.wait(), 10)

    [d] = records
    assert d.envelope.subject == watcher.subjects.snapshot("agent-1")
    assert d.envelope.workflow == "wf-rec" and d.claims.sub == "state-1"
    [stored] = await parts.redis.zrange(f"{parts.prefix}:snap:wf-rec:agent-1", 0, -1)
    assert d.body == SnapshotRecorded(
        agent="agent-1",
        version=1,
        stored=True,
        policy_hash=POLICY_HASH,
        key_id="k1",
        sealed_sha256=hashlib.sha256(stored).hexdigest(),
    )
    assert b"erp_session" not in d.data and b"s-42" not in d.data
