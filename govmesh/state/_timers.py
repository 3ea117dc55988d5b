"""Durable timers: a workflow that waits hours or days wakes up on time, through restarts.

Timers live in the tenant's Redis keys, not in any process, so they fire after a restart
of the state actor or of Redis (append-only file) as if nothing happened:

======================  ===============================================================
``timers:due``          sorted set: timer id scored by when it is due (deployment clock)
``timers:def``          hash: timer id -> the `Timer` (msgpack)
``timers:firing``       sorted set: timer id scored by when a state actor took it (real time)
``timers:seq``          hash: timer id -> send time of the last set or cancel applied
======================  ===============================================================

Sets and cancels of one timer may be handled out of order (the state actor handles
messages concurrently, and several state actors share them), so each carries its send
time and an older one never overrides a newer one; the ``seq`` entries stay as
tombstones so a late set cannot bring back a cancelled or fired timer.

Firing is take, publish, finish. Taking moves the id from ``due`` to ``firing`` atomically,
so with several state actors each timer is taken once; a timer taken by an actor that died
before finishing is due again after a lease (`FIRING_LEASE_S` by default). Delivery is
therefore at least once, and `TimerFired` says so.
"""

from __future__ import annotations

import time
from typing import Any, Final, cast

import msgspec
import redis.asyncio as aioredis

__all__ = ["FIRING_LEASE_S", "Timer", "TimerStore"]

FIRING_LEASE_S: Final = 10.0
"""A timer taken longer ago than this (real seconds) was lost with its actor; fire again."""

# KEYS: due, firing, def. ARGV: now (clock), real now, limit, stale_before (real).
# Makes lost firings due again, then takes up to `limit` due timers and returns their
# definitions; an id without a definition (cancelled meanwhile) is dropped.
_TAKE_DUE: Final = """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], 0, id)
end
local taken = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local timer = redis.call('HGET', KEYS[3], id)
  if timer then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    taken[#taken + 1] = timer
  end
end
return taken
"""

# KEYS: def, due, firing, seq. ARGV: id, timer ('' to cancel), due_at, seq.
_APPLY: Final = """
local last = redis.call('HGET', KEYS[4], ARGV[1])
if last and tonumber(last) >= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: firing, def. ARGV: id, the timer as taken. A timer set again meanwhile stays.
_FIRED: Final = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
"""


class Timer(msgspec.Struct, frozen=True, kw_only=True):
    """One durable timer of an agent for a workflow."""

    workflow: str
    agent: str
    name: str
    due_at: float
    payload: dict[str, Any] = {}
    set_at: float = 0.0

    @property
    def timer_id(self) -> str:
        """Its id: one timer per (workflow, agent, name)."""
        return timer_id(self.workflow, self.agent, self.name)


def timer_id(workflow: str, agent: str, name: str) -> str:
    """The id of timer `name` of `agent` for `workflow`."""
    return f"{workflow}\x1f{agent}\x1f{name}"


class TimerStore:
    """One tenant's timers in Redis (see the module docs for the keys).

    Args:
        redis: the connection to use.
        prefix: the tenant's key prefix.
        firing_lease_s: real seconds after which a timer taken but not finished is due
            again.
    """

    def __init__(
        self, redis: aioredis.Redis, prefix: str, *, firing_lease_s: float = FIRING_LEASE_S
    ) -> None:
        self.redis = redis
        self._lease_s = firing_lease_s
        self._due = f"{prefix}:timers:due"
        self._def = f"{prefix}:timers:def"
        self._firing = f"{prefix}:timers:firing"
        self._seq = f"{prefix}:timers:seq"
        self._apply = redis.register_script(_APPLY)
        self._decoder = msgspec.msgpack.Decoder(Timer)
        self._take_due = redis.register_script(_TAKE_DUE)
        self._fired = redis.register_script(_FIRED)

    async def set(self, timer: Timer, *, seq: float) -> bool:
        """Store `timer`, replacing one of the same (workflow, agent, name), unless a set or
        cancel sent later (`seq`: send time) was applied already; returns whether applied."""
        return bool(
            await self._apply(
                keys=self._keys(),
                args=[timer.timer_id, msgspec.msgpack.encode(timer), timer.due_at, seq],
            )
        )

    async def cancel(self, workflow: str, agent: str, name: str, *, seq: float) -> bool:
        """Drop a timer that has not fired, unless it was set again later than `seq`;
        returns whether there was one to drop."""
        tid = timer_id(workflow, agent, name)
        return bool(await self._apply(keys=self._keys(), args=[tid, b"", 0, seq]))

    def _keys(self) -> list[str]:
        return [self._def, self._due, self._firing, self._seq]

    async def take_due(self, now: float, *, limit: int = 100) -> list[Timer]:
        """Take the timers due by `now` (deployment clock) for firing, in one round trip."""
        real = time.time()
        taken = cast(
            list[bytes],
            await self._take_due(
                keys=[self._due, self._firing, self._def],
                args=[now, real, limit, real - self._lease_s],
            ),
        )
        return [self._decoder.decode(t) for t in taken]

    async def fired(self, timer: Timer) -> None:
        """Forget a timer whose `TimerFired` has been published (unless it was set again)."""
        await self._fired(
            keys=[self._firing, self._def], args=[timer.timer_id, msgspec.msgpack.encode(timer)]
        )

    async def pending(self) -> list[Timer]:
        """Every timer not yet fired, soonest first."""
        raw = cast(list[bytes], await self.redis.hvals(self._def))
        return sorted((self._decoder.decode(r) for r in raw), key=lambda t: t.due_at)
