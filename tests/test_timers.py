"""Durable timers on real servers: stored in Redis, fired by the state actor on the
deployment's (simulated) clock, through restarts of the state actor and of Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from govmesh.bus import Bus, Delivery
from govmesh.config import Clock
from govmesh.runtime import RedisServer
from govmesh.state import StateService, Timer, TimerFired, TimerSet, TimerStore
from govmesh.state.messages import TimerCancel

from _deploy import deployment

DAY = 86_400.0


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis-protocol server of the test's own, so restarting it disturbs nobody."""
    server = RedisServer(workdir=tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def _agent(dep, issuer, fired: asyncio.Queue[tuple[str, TimerFired]]) -> Bus:
    bus = await Bus.connect(dep, issuer.identity("agent-1", "agent"))

    async def on_fired(d: Delivery) -> None:
        await fired.put((d.envelope.workflow, d.body))

    await bus.subscribe(bus.subjects.msg("agent-1"), on_fired, accepts=TimerFired)
    await bus.flush()
    return bus


async def _stored(store: TimerStore, count: int) -> list[Timer]:
    deadline = time.monotonic() + 10
    while ((found := await store.pending()) and len(found) < count) or not found:
        assert time.monotonic() < deadline, f"{count} timers were never stored"
        await asyncio.sleep(0.02)
    return found


async def test_a_timer_set_for_two_simulated_days_fires_after_a_restart(
    secure_nats, own_redis: RedisServer, prefix: str
) -> None:
    transport, server = secure_nats
    # Two simulated days pass in four real seconds.
    clock = Clock(origin=time.time(), speed=2 * DAY / 4)
    dep, issuer = deployment(server.url, own_redis.url, prefix, transport)
    dep = msgspec.structs.replace(dep, clock=clock)
    fired: asyncio.Queue[tuple[str, TimerFired]] = asyncio.Queue()
    agent = await _agent(dep, issuer, fired)
    first = StateService(dep, issuer.identity("state-1", "state"))
    await first.start()
    redis = aioredis.Redis.from_url(own_redis.url)
    try:
        due = clock.now() + 2 * DAY
        await agent.publish(
            agent.subjects.state("agent-1"),
            TimerSet(name="vendor-reply", due_at=due, payload={"vendor": "Vendor_A"}),
            workflow="wf-wait",
        )
        [stored] = await _stored(TimerStore(redis, dep.key_prefix), 1)
        assert (stored.workflow, stored.agent, stored.due_at) == ("wf-wait", "agent-1", due)

        await first.close()
        own_redis.restart()
        second = StateService(dep, issuer.identity("state-2", "state"))
        await second.start()
        try:
            workflow, timer = await asyncio.wait_for(fired.get(), 30)
            deadline = time.monotonic() + 10
            while second.timers_fired == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)  # it counts once the firing is finished
        finally:
            await second.close()
        assert first.timers_fired == 0 and second.timers_fired == 1
        assert workflow == "wf-wait" and timer.name == "vendor-reply"
        assert timer.payload == {"vendor": "Vendor_A"}
        assert timer.fired_at >= timer.due_at == due
    finally:
        await redis.aclose()
    after = aioredis.Redis.from_url(own_redis.url)  # the first connection died with the restart
    try:
        assert await TimerStore(after, dep.key_prefix).pending() == []
    finally:
        await after.aclose()
        await agent.close()
        await first.close()


async def test_a_moved_or_cancelled_timer_fires_once_or_never(
    secure_nats, redis_server, prefix: str
) -> None:
    transport, server = secure_nats
    clock = Clock(origin=time.time(), speed=DAY)  # a simulated day per real second
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    dep = msgspec.structs.replace(dep, clock=clock)
    fired: asyncio.Queue[tuple[str, TimerFired]] = asyncio.Queue()
    agent = await _agent(dep, issuer, fired)
    state = StateService(dep, issuer.identity("state-1", "state"))
    await state.start()
    try:
        s = agent.subjects.state("agent-1")
        far = clock.now() + 365 * DAY
        await agent.publish(s, TimerSet(name="remind", due_at=far), workflow="wf-a")
        await agent.publish(
            s, TimerSet(name="remind", due_at=clock.now() + DAY / 4), workflow="wf-a"
        )
        await agent.publish(s, TimerSet(name="expire", due_at=far), workflow="wf-b")
        await agent.publish(s, TimerCancel(name="expire"), workflow="wf-b")
        workflow, timer = await asyncio.wait_for(fired.get(), 30)
        assert (workflow, timer.name) == ("wf-a", "remind") and timer.due_at < far
        await asyncio.sleep(0.5)
        assert fired.empty(), "a moved timer fires once; a cancelled one never"
        assert await state.timers.pending() == []
    finally:
        await agent.close()
        await state.close()


async def test_a_timer_taken_by_a_dead_state_actor_fires_again(redis_server, prefix: str) -> None:
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        store = TimerStore(redis, f"gm:{prefix}", firing_lease_s=0.2)
        timer = Timer(workflow="wf", agent="agent-1", name="t", due_at=time.time() - 1)
        assert await store.set(timer, seq=2.0)
        stale = msgspec.structs.replace(timer, due_at=time.time() + 3600)
        assert not await store.set(stale, seq=1.0), "an older set never overrides a newer one"
        assert await store.take_due(time.time()) == [timer]
        assert await store.take_due(time.time()) == [], "taken once while its lease runs"
        await asyncio.sleep(0.3)  # the taker died without finishing; its lease runs out
        assert await store.take_due(time.time()) == [timer]
        await store.fired(timer)
        await asyncio.sleep(0.3)
        assert await store.take_due(time.time()) == [] and await store.pending() == []
    finally:
        await redis.aclose()


async def test_the_state_actor_closes_when_a_redis_call_swallows_its_timer_loops_cancellation(
    nats_server, redis_server, monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    dep, issuer = deployment(nats_server.url, redis_server.url, prefix)
    state = StateService(dep, issuer.identity("state-1", "state"))
    await state.start()
    take_due = state.timers.take_due
    taking = asyncio.Event()

    async def take_due_swallowing_a_cancellation(now: float, **options: int) -> list[Timer]:
        # The first call waits until close() cancels the ticker, then returns normally, as
        # redis-py's send does on Python 3.11 when the cancellation lands just as the
        # command's result arrives (`asyncio.wait_for`).
        due = await take_due(now, **options)
        if not taking.is_set():
            taking.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        return due

    monkeypatch.setattr(state.timers, "take_due", take_due_swallowing_a_cancellation)
    try:
        await asyncio.wait_for(taking.wait(), 30)
    finally:
        await asyncio.wait_for(state.close(), 30)
