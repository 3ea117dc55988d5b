"""The state actor: persists agent snapshots from the bus and serves them back, and fires
durable timers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, Final, cast

from redis.exceptions import RedisError

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import BusError, ConfigError, SecurityError, StateError
from govmesh.identity import Identity
from govmesh.service import Service, being_cancelled, raise_if_cancelled
from govmesh.state._tiers import (
    ENV_STATE_KEYS,
    Keyring,
    SnapshotState,
    decode_sealed,
    encode_sealed,
    seal,
    unseal,
)
from govmesh.state._timers import Timer, TimerStore
from govmesh.state.messages import (
    Snapshot,
    SnapshotQuery,
    SnapshotRecorded,
    SnapshotReply,
    SnapshotStored,
    TimerCancel,
    TimerFired,
    TimerSet,
)
from govmesh.telemetry._tracing import span

__all__ = ["StateService"]

QUEUE = "state"
FOREIGN_SNAPSHOT: Final = "foreign_snapshot"
"""The security event reason for a query of another agent's snapshot."""

log = logging.getLogger(__name__)


class StateService(Service):
    """Stores each snapshot as a version of (workflow, agent) in a Redis sorted set, and
    fires the agents' durable timers when the deployment's clock says they are due.

    A sorted set scored by version makes latest and by-version lookup O(log N).

    Snapshots are stored sealed (`seal`): the tool tier encrypted with the keyring's current
    key, and only the newest `retain` versions of each (workflow, agent) are kept. Each one
    is recorded, without content, on ``snapshot.<agent>`` (`SnapshotRecorded`) for the event
    stream, which leaves the snapshots themselves out.

    A snapshot is served only to its own agent: the verified sender of a query must be the
    agent it names. No platform role reads another's snapshots either: an agent rehydrates
    itself, and what the audit needs is in the record. Any other query is refused, reported
    as a security event (``foreign_snapshot``) and answered with the reason.

    Args:
        deployment: where the services are and whom to trust.
        identity: this actor's identity (role ``state``).
        keyring: the snapshot keys; every state actor of a deployment needs the same ones.
            Default: ``GOVMESH_STATE_KEYS``, else a fresh key (snapshots then die with it).
        retain: versions kept per (workflow, agent).
        tick_s: how often (real seconds) to look for due timers.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        keyring: Keyring | None = None,
        retain: int = 100,
        tick_s: float = 0.05,
    ) -> None:
        super().__init__(deployment, identity)
        if retain < 1:
            raise ConfigError(f"retain must be at least 1, got {retain!r}")
        if keyring is None:
            keyring = Keyring.from_env()
        if keyring is None:
            log.warning(
                "%s: no %s; tool snapshots are encrypted with a key that dies with this actor",
                identity.agent_id,
                ENV_STATE_KEYS,
            )
            keyring = Keyring.generate()
        self.keyring = keyring
        self._retain = retain
        self._tick_s = tick_s
        self.refused = 0
        self._ticker: asyncio.Task[None] | None = None
        self.timers_fired = 0

    async def on_start(self) -> None:
        """Subscribe to snapshots, timers and snapshot queries; start firing timers."""
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
        """Counters, plus timers fired and snapshots refused."""
        return {
            **super().stats(),
            "timers_fired": self.timers_fired,
            "snapshots_refused": self.refused,
        }

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
                with span(
                    "govmesh.snapshot",
                    attributes={
                        "govmesh.workflow": workflow,
                        "govmesh.agent": agent,
                        "govmesh.snapshot.version": snap.version,
                        "govmesh.state.phase": str(snap.goal.get("phase", "")) or None,
                    },
                ) as storing:
                    recorded = await self._store(agent, snap)
                    storing.set_attribute("govmesh.snapshot.stored", recorded.stored)
                if d.reply:
                    await self.bus.respond(
                        d,
                        SnapshotStored(
                            workflow=snap.workflow,
                            version=snap.version,
                            stored=recorded.stored,
                            error=recorded.error,
                        ),
                    )
                await self.bus.publish(
                    self.subjects.snapshot(agent),
                    recorded,
                    workflow=snap.workflow,
                    causation=d.envelope.id,
                    trace=d.envelope.trace,
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

    async def _store(self, agent: str, snap: Snapshot) -> SnapshotRecorded:
        """Seal and store one snapshot; returns what was stored, or why it was refused."""
        try:
            sealed = seal(
                SnapshotState(
                    tenant=self.deployment.tenant,
                    workflow=snap.workflow,
                    agent=agent,
                    version=snap.version,
                    goal=snap.goal,
                    tool=snap.tool or None,
                    reflections=snap.reflections,
                    policy_hash=snap.policy_hash,
                ),
                self.keyring,
            )
        except StateError as exc:
            self.refused += 1
            log.error("snapshot refused: %s", exc)
            return SnapshotRecorded(agent=agent, version=snap.version, stored=False, error=str(exc))
        record = encode_sealed(sealed)
        key = self._versions_key(snap.workflow, agent)
        async with self.redis.pipeline(transaction=True) as pipe:
            # A version sent again (an agent retrying after a crash) replaces the first.
            pipe.zremrangebyscore(key, snap.version, snap.version)
            pipe.zadd(key, {record: snap.version})
            pipe.zremrangebyrank(key, 0, -self._retain - 1)
            await pipe.execute()
        return SnapshotRecorded(
            agent=agent,
            version=snap.version,
            stored=True,
            policy_hash=sealed.policy_hash,
            key_id=sealed.tool.key_id if sealed.tool else "",
            sealed_sha256=hashlib.sha256(record).hexdigest(),
        )

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
            raise_if_cancelled()
            await asyncio.sleep(self._tick_s)

    async def _on_query(self, d: Delivery) -> None:
        q: SnapshotQuery = d.body
        if q.agent != d.claims.sub:
            refusal = SecurityError(
                FOREIGN_SNAPSHOT,
                f"{d.claims.sub!r} asked for the snapshot of {q.workflow}/{q.agent}; an agent "
                "may read only its own snapshots",
            )
            self.bus.report(refusal, subject=d.envelope.subject, data=d.data)
            await self.bus.respond(d, SnapshotReply(found=False, error=str(refusal)))
            return
        key = self._versions_key(q.workflow, q.agent)
        if q.version:
            raw = await self.redis.zrangebyscore(key, q.version, q.version, start=0, num=1)
        else:
            raw = await self.redis.zrange(key, -1, -1)
        reply = SnapshotReply(found=False)
        if raw:
            try:
                reply = SnapshotReply(found=True, snapshot=self._open(q, cast(bytes, raw[0])))
            except StateError as exc:
                log.error("snapshot of %s/%s cannot be opened: %s", q.workflow, q.agent, exc)
                reply = SnapshotReply(found=False, error=str(exc))
        await self.bus.respond(d, reply)

    def _open(self, q: SnapshotQuery, data: bytes) -> Snapshot:
        state = unseal(decode_sealed(data), self.keyring)
        # The encrypted tier is bound to its place; the others are checked here, so a
        # record copied under another workflow's key is refused too.
        found = (state.tenant, state.workflow, state.agent)
        if found != (self.deployment.tenant, q.workflow, q.agent) or (
            q.version and state.version != q.version
        ):
            raise StateError(
                f"the snapshot stored for {q.workflow}/{q.agent} belongs to "
                f"{'/'.join(found)} v{state.version}"
            )
        return Snapshot(
            workflow=state.workflow,
            version=state.version,
            goal=state.goal,
            policy_hash=state.policy_hash,
            tool=state.tool or b"",
            reflections=state.reflections,
        )
