"""Model-spend reservations: a call's maximum cost is reserved before it runs, atomically
against every cap, and settled with the provider-reported usage after.

Checking spend and then adding to it in two steps lets concurrent calls all pass the check
and overshoot a cap together. Here one Redis script checks the workflow's, the agent's and
the tenant's figures (settled spend plus outstanding reservations plus this call's maximum)
and reserves on all three at once, or on none; so no interleaving of calls, however many,
can push settled spend past a cap. Amounts are integer micro-dollars, so sums are exact.

Keys, under the tenant's prefix (each a hash with ``settled`` and ``reserved``):

==============================  ===========================================================
``budget:wf:<workflow>``        the workflow's spend; ``released`` once a person let it go
                                past the soft threshold
``budget:agent:<agent>:<day>``  the agent's spend in one UTC day (kept two days)
``budget:tenant:<day>``         the tenant's spend in one UTC day (kept two days)
``budget:reservations``         hash: reservation id -> ``amount workflow agent day``
``budget:expiry``               sorted set: reservation id by when it lapses unsettled
==============================  ===========================================================

A reservation the agent never settles (it died mid-call) lapses and is settled by the
budget actor's sweep at its full amount: the call may have run, so spend is counted high,
never low.

Below both the budget actor (`govmesh.forecasting`), which settles and sweeps, and the
governance actor, which releases a workflow a person let spend on: neither imports the other.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Final, Literal, cast

import msgspec
import redis.asyncio as aioredis

from govmesh.config import utc_day
from govmesh.errors import GovmeshError

__all__ = [
    "INTERRUPT_TOOL",
    "BudgetCaps",
    "BudgetError",
    "Granted",
    "Refused",
    "ReservationBook",
    "micro_usd",
]

INTERRUPT_TOOL: Final = "budget.continue"
"""The tool name of a budget interrupt's approval request: approving it lets the workflow
spend past its soft threshold."""

MICRO: Final = 1_000_000
"""Micro-dollars per dollar: the unit of every amount in the reservation keys."""

_DAY_TTL_S: Final = 2 * 86_400

# KEYS: workflow, agent-day, tenant-day, reservations, expiry.
# ARGV: id, amount, workflow cap, agent cap, tenant cap ('' for none), soft fraction ('' for
# none), lapses-at, entry, day ttl.
# Returns {'granted'} or {'soft'|'hard', scope index, settled, reserved, cap}.
_RESERVE: Final = """
local amount = tonumber(ARGV[2])
local caps = {ARGV[3], ARGV[4], ARGV[5]}
for i = 1, 3 do
  if caps[i] ~= '' then
    local settled = tonumber(redis.call('HGET', KEYS[i], 'settled') or '0')
    local reserved = tonumber(redis.call('HGET', KEYS[i], 'reserved') or '0')
    local cap = tonumber(caps[i])
    if settled + reserved + amount > cap then
      return {'hard', i, settled, reserved, cap}
    end
    if i == 1 and ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'released') ~= '1'
        and settled + reserved + amount > math.floor(cap * tonumber(ARGV[6])) then
      return {'soft', i, settled, reserved, cap}
    end
  end
end
for i = 1, 3 do
  redis.call('HINCRBY', KEYS[i], 'reserved', amount)
end
redis.call('EXPIRE', KEYS[2], ARGV[9])
redis.call('EXPIRE', KEYS[3], ARGV[9])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[8])
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[1])
return {'granted'}
"""

# KEYS: workflow, agent-day, tenant-day, reservations, expiry. ARGV: id, actual.
# Settles a reservation once: a second settlement of the same id changes nothing (returns 0).
_SETTLE: Final = """
local entry = redis.call('HGET', KEYS[4], ARGV[1])
if not entry then return 0 end
local amount = tonumber(string.match(entry, '^(%d+)'))
local actual = tonumber(ARGV[2])
for i = 1, 3 do
  redis.call('HINCRBY', KEYS[i], 'reserved', -amount)
  redis.call('HINCRBY', KEYS[i], 'settled', actual)
end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return 1
"""


def micro_usd(usd: float, *, up: bool = False) -> int:
    """``usd`` in integer micro-dollars; rounded up with ``up`` (a maximum cost must never be
    under-reserved), else to nearest."""
    scaled = usd * MICRO
    return math.ceil(scaled - 1e-9) if up else round(scaled)


class BudgetCaps(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Model-spend caps in USD; None for no cap on that scope.

    Attributes:
        workflow_usd: per workflow, over its whole life.
        agent_daily_usd: per agent, per UTC day.
        tenant_daily_usd: per tenant, per UTC day.
        soft_threshold: the share of the workflow cap at which the workflow is interrupted
            to a person before it spends more (None: never).
        reservation_ttl_s: how long a reservation may stay unsettled before the budget actor
            settles it at its full amount.
        interrupt_expiry_s: how long an interrupt waits for a person before the workflow
            halts (0: for good).
    """

    workflow_usd: float | None = None
    agent_daily_usd: float | None = None
    tenant_daily_usd: float | None = None
    soft_threshold: float | None = 0.8
    reservation_ttl_s: float = 300.0
    interrupt_expiry_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("workflow_usd", "agent_daily_usd", "tenant_daily_usd"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.soft_threshold is not None and not 0 < self.soft_threshold < 1:
            raise ValueError(f"soft_threshold must be within (0, 1), got {self.soft_threshold!r}")
        if not self.reservation_ttl_s > 0:
            raise ValueError(f"reservation_ttl_s must be positive, got {self.reservation_ttl_s!r}")


class Granted(msgspec.Struct, frozen=True, kw_only=True):
    """A reservation held; settle it with the call's actual cost."""

    reservation_id: str
    workflow: str
    agent: str
    day: str
    amount: int


Scope = Literal["workflow", "agent", "tenant"]
_SCOPES: Final[tuple[Scope, ...]] = ("workflow", "agent", "tenant")


class Refused(msgspec.Struct, frozen=True, kw_only=True):
    """A reservation refused, finally: the call must not run and is not to be retried.

    Attributes:
        kind: ``soft`` (the workflow reached its soft threshold: pause and ask a person) or
            ``hard`` (a cap would be passed: halt).
        scope: whose figure refused it.
        settled_usd, reserved_usd, cap_usd: that scope's figures when it was refused.
        amount_usd: the maximum cost that was asked for.
    """

    kind: Literal["soft", "hard"]
    scope: Scope
    settled_usd: float
    reserved_usd: float
    cap_usd: float
    amount_usd: float

    def reason(self) -> str:
        """One sentence for reports and approval requests."""
        what = "soft threshold" if self.kind == "soft" else "cap"
        return (
            f"{self.scope} model spend {self.settled_usd:.6f} USD settled + "
            f"{self.reserved_usd:.6f} reserved + {self.amount_usd:.6f} for this call would pass "
            f"its {what} ({self.cap_usd:.6f} USD cap)"
        )


class BudgetError(GovmeshError, RuntimeError):
    """A model call's spend reservation was refused; the call did not run.

    Final: the call must not be retried as it is. A ``soft`` refusal pauses the workflow
    for a person; a ``hard`` one halts it.

    Attributes:
        refusal: the refusal, with the figures that caused it
            (`Refused`).
        calls: model calls of the step that did run before it (set by the agent).
    """

    def __init__(self, refusal: Refused) -> None:
        self.refusal = refusal
        self.calls = 0
        super().__init__(refusal.reason())


class ReservationBook:
    """Reserves and settles model spend in one tenant's Redis keys (see the module docs).

    Args:
        redis: the connection to use.
        prefix: the tenant's key prefix.
        caps: the caps to hold calls to.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str, caps: BudgetCaps) -> None:
        self.redis = redis
        self.prefix = prefix
        self.caps = caps
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)

    def workflow_key(self, workflow: str) -> str:
        """The hash of a workflow's model spend."""
        return f"{self.prefix}:budget:wf:{workflow}"

    def _keys(self, workflow: str, agent: str, day: str) -> list[str]:
        p = self.prefix
        return [
            self.workflow_key(workflow),
            f"{p}:budget:agent:{agent}:{day}",
            f"{p}:budget:tenant:{day}",
            f"{p}:budget:reservations",
            f"{p}:budget:expiry",
        ]

    async def reserve(
        self, workflow: str, agent: str, max_cost_usd: float, *, now: float | None = None
    ) -> Granted | Refused:
        """Reserve ``max_cost_usd`` for one call of ``agent`` in ``workflow``, or refuse."""
        now = time.time() if now is None else now
        day = utc_day(now)
        amount = micro_usd(max_cost_usd, up=True)
        reservation_id = uuid.uuid4().hex
        caps = self.caps
        answer = await self._reserve(
            keys=self._keys(workflow, agent, day),
            args=[
                reservation_id,
                amount,
                *(
                    b"" if cap is None else micro_usd(cap)
                    for cap in (caps.workflow_usd, caps.agent_daily_usd, caps.tenant_daily_usd)
                ),
                b"" if caps.soft_threshold is None else repr(caps.soft_threshold),
                repr(now + caps.reservation_ttl_s),
                f"{amount} {workflow} {agent} {day}",
                _DAY_TTL_S,
            ],
        )
        if answer[0] == b"granted":
            return Granted(
                reservation_id=reservation_id,
                workflow=workflow,
                agent=agent,
                day=day,
                amount=amount,
            )
        kind, scope, settled, reserved, cap = answer
        return Refused(
            kind="soft" if kind == b"soft" else "hard",
            scope=_SCOPES[int(scope) - 1],
            settled_usd=int(settled) / MICRO,
            reserved_usd=int(reserved) / MICRO,
            cap_usd=int(cap) / MICRO,
            amount_usd=amount / MICRO,
        )

    async def settle(self, granted: Granted, actual_usd: float) -> bool:
        """Settle a reservation with the call's actual cost; False if it was settled already
        (by the sweep, say), and then nothing changes."""
        return await self.settle_id(
            granted.reservation_id,
            granted.workflow,
            granted.agent,
            granted.day,
            micro_usd(actual_usd),
        )

    async def settle_id(
        self, reservation_id: str, workflow: str, agent: str, day: str, actual: int
    ) -> bool:
        """Settle reservation ``reservation_id`` with ``actual`` micro-dollars."""
        done = await self._settle(
            keys=self._keys(workflow, agent, day), args=[reservation_id, actual]
        )
        return bool(done)

    async def settle_lapsed(self, *, now: float | None = None, limit: int = 100) -> int:
        """Settle reservations that lapsed unsettled at their full amount; returns how many."""
        now = time.time() if now is None else now
        p = self.prefix
        ids = cast(
            list[bytes],
            await self.redis.zrangebyscore(f"{p}:budget:expiry", "-inf", now, start=0, num=limit),
        )
        settled = 0
        for raw_id in ids:
            entry = cast(bytes | None, await self.redis.hget(f"{p}:budget:reservations", raw_id))
            if entry is None:
                await self.redis.zrem(f"{p}:budget:expiry", raw_id)
                continue
            amount, workflow, agent, day = entry.decode().split(" ")
            settled += await self.settle_id(raw_id.decode(), workflow, agent, day, int(amount))
        return settled

    async def release(self, workflow: str) -> None:
        """Let ``workflow`` spend past its soft threshold, up to its cap (a person said so)."""
        await self.redis.hset(self.workflow_key(workflow), "released", "1")

    async def spent(self, workflow: str) -> tuple[float, float]:
        """The workflow's settled and reserved spend, in USD."""
        settled, reserved = await self.redis.hmget(
            self.workflow_key(workflow), ["settled", "reserved"]
        )
        return int(settled or 0) / MICRO, int(reserved or 0) / MICRO
