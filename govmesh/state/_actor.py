"""The state actor: persists agent snapshots from the bus and serves them back."""

from __future__ import annotations

from typing import cast

import msgspec

from govmesh.bus import Delivery
from govmesh.service import Service
from govmesh.state.messages import Snapshot, SnapshotQuery, SnapshotReply

__all__ = ["StateService"]

QUEUE = "state"


class StateService(Service):
    """Stores each snapshot as a version of (workflow, agent) in a Redis sorted set.

    A sorted set scored by version makes latest and by-version lookup O(log N).
    """

    async def on_start(self) -> None:
        """Subscribe to snapshots and snapshot queries."""
        self._decoder = msgspec.msgpack.Decoder(Snapshot)
        await self.bus.subscribe(
            self.subjects.all("state"), self._on_snapshot, accepts=Snapshot, queue=QUEUE
        )
        await self.bus.subscribe(
            self.subjects.ctl("state"),
            self._on_query,
            accepts=SnapshotQuery,
            queue=QUEUE,
            concurrent=False,
        )

    def _versions_key(self, workflow: str, agent: str) -> str:
        return self.key("snap", workflow, agent)

    async def _on_snapshot(self, d: Delivery) -> None:
        snap: Snapshot = d.body
        data = self.bus.codec.encode(snap)
        await self.redis.zadd(self._versions_key(snap.workflow, d.claims.sub), {data: snap.version})

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
