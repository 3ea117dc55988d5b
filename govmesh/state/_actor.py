"""The state actor: persists agent snapshots from the bus and serves them back, and fires
durable timers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import msgspec
from redis.exceptions import RedisError

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import BusError
from govmesh.identity import Identity
from govmesh.service import Service, being_cancelled
from govmesh.state._timers import Timer, TimerStore
from govmesh.state.messages import (
    Snapshot,
    SnapshotQuery,
    SnapshotReply,
    TimerCancel,
    TimerFired,
    TimerSet,
)

__all__ = ["StateService"]

QUEUE = "state"

log = logging.getLogger(__name__)


class StateService(Service):
    """Stores each snapshot as a version of (workflow, agent) in a Redis sorted set, and
    fires the agents' durable timers when the deployment's clock says they are due.

    A sorted set scored by version makes latest and by-version lookup O(log N).

    Args:
        deployment: where the services are and whom to trust.
        identity: this actor's identity (role ``state``).
        tick_s: how often (real seconds) to look for due timers.
    """

    def __init__(self, deployment: Deployment, identity: Identity, *, tick_s: float = 0.05):
        super().__init__(deployment, identity)
        self._tick_s = tick_s
        self._ticker: asyncio.Task[None] | None = None
        self.timers_fired = 0

    async def on_start(self) -> None:
        """Subscribe to snapshots, timers and snapshot queries; start firing timers."""
        self._decoder = msgspec.msgpack.Decoder(Snapshot)
        self.timers = TimerStore(self.redis, self.deployment.key_prefix)
        await self.bus.subscribe(
            self.subjects.all("state"),
            self._on_state,
            accepts=Snapshot | TimerSet | TimerCancel,
            queue=QUEUE,
        )
        await self.bus.subscribe(
            self.subjects.ctl("state"),
            self._on_query,
            accepts=SnapshotQuery,
            queue=QUEUE,
            concurrent=False,
        )

        self._ticker = asyncio.create_task(self._fire_due(), name="timers")

    def stats(self) -> dict[str, Any]:
        """Counters, plus timers fired."""
        return {**super().stats(), "timers_fired": self.timers_fired}

    async def close(self) -> None:
        """Stop firing timers, then leave. Safe to call twice; a timer being fired is fired
        again by the next state actor (at least once)."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        await super().close()

    def _versions_key(self, workflow: str, agent: str) -> str:
        return self.key("snap", workflow, agent)

    async def _on_state(self, d: Delivery) -> None:
        agent, workflow = d.claims.sub, d.envelope.workflow
        match d.body:
            case Snapshot() as snap:
                data = self.bus.codec.encode(snap)
                await self.redis.zadd(
                    self._versions_key(snap.workflow, agent), {data: snap.version}
                )
            case TimerSet() as t:
                await self.timers.set(
                    Timer(
                        workflow=workflow,
                        agent=agent,
                        name=t.name,
                        due_at=t.due_at,
                        payload=t.payload,
                        set_at=self.deployment.clock.now(),
                    ),
                    seq=d.envelope.ts,
                )
            case TimerCancel() as t:
                await self.timers.cancel(workflow, agent, t.name, seq=d.envelope.ts)

    async def _fire_due(self) -> None:
        clock = self.deployment.clock
        while True:
            try:
                for timer in await self.timers.take_due(clock.now()):
                    await self.bus.publish(
                        self.subjects.msg(timer.agent),
                        TimerFired(
                            name=timer.name,
                            due_at=timer.due_at,
                            fired_at=clock.now(),
                            payload=timer.payload,
                        ),
                        workflow=timer.workflow,
                    )
                    await self.timers.fired(timer)
                    self.timers_fired += 1
            except (RedisError, OSError, BusError) as exc:
                if being_cancelled():
                    raise
                # Redis or NATS restarting: the timers wait in Redis; the next tick fires them.
                log.warning("timers postponed: %s", exc)
            await asyncio.sleep(self._tick_s)

    async def _on_query(self, d: Delivery) -> None:
        q: SnapshotQuery = d.body
        key = self._versions_key(q.workflow, q.agent)
        if q.version:
            raw = await self.redis.zrangebyscore(key, q.version, q.version, start=0, num=1)
        else:
            raw = await self.redis.zrange(key, -1, -1)
        reply = (
            SnapshotReply(found=True, snapshot=self._decoder.decode(cast(bytes, raw[0])))
            if raw
            else SnapshotReply(found=False)
        )
        await self.bus.respond(d, reply)
