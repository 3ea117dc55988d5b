"""The idempotency ledger: one entry per step's tool call, so a retried step never repeats a
side effect.

An entry is about one (workflow, step, intent hash), the call a governance decision is bound
to; a different intent at the same step is a different entry. It is a Redis hash at
``<prefix>:idem:<workflow>:<step>:<intent hash>`` (see `Entry` for the fields) and moves
through four states:

``running``
    A gateway claimed the step and is running the tool. It holds a lease until
    ``lease_until``, which it renews while the tool runs; a call that finds the lease live
    is told the step is in progress, and nothing runs.
``done``
    The tool's answer is recorded; every later call for the step gets it back, marked
    ``replayed``, and nothing runs. Kept for `DONE_RETENTION_S`. A failure is an answer
    too (bad arguments, an error the tool raised), unless the tool said it may be retried.
``retryable``
    The last attempt failed with ``ToolError(retryable=True)``, the tool's promise that it
    changed nothing. The failure is kept in ``result``; the next call with an unexpired
    decision claims the step again and runs the tool with the same idempotency key. Kept
    for `DONE_RETENTION_S`.
``in_doubt``
    The gateway running a tool that is not idempotent stopped renewing its lease before it
    recorded the answer, so nobody knows whether the effect happened. Nothing runs the tool
    again; a person checks the tool's own records (under the entry's ``idempotency_key``)
    and resolves the step with `Ledger.finish`, or deletes the entry so a fresh decision
    can run it. Kept until then.

Claiming a new entry also marks its decision used (``<prefix>:decision-used:<id>``, for
`DECISION_USED_TTL_S`), in the same script, so two gateways of the queue group never both
run a step and a decision authorises one entry only.

The crash windows, for a gateway that dies (or loses Redis for longer than the lease):

1. before the claim: nothing is recorded; a retry claims the step as new.
2. after the claim, before or after the tool took effect, before the answer is recorded:
   the entry stays ``running`` until its lease lapses, and the ledger cannot tell the two
   apart. A retry then re-runs an idempotent tool with the same idempotency key (the tool
   returns the first effect's result, or takes effect now if it never did); a tool that is
   not idempotent is never re-run: the entry becomes ``in_doubt``.
3. after the answer is recorded, before the reply: a retry gets the recorded answer.

A gateway that is alive but lost its lease (its tool ran past the lease while Redis was
unreachable) may still record its answer: for an idempotent tool it describes the same effect
a re-run would, and for one that is not idempotent it resolves the doubt with the truth. The
first answer recorded wins. Leases compare the gateways' own clocks (`Entry.started_at` is the
claiming gateway's "now"), so those clocks must agree to well within the lease.
"""

from __future__ import annotations

from typing import Final, Literal, cast

import msgspec
import redis.asyncio as aioredis

from govmesh.config import key_prefix
from govmesh.tools.messages import ToolResult

__all__ = [
    "DECISION_USED_TTL_S",
    "DONE_RETENTION_S",
    "LEASE_S",
    "ClaimStatus",
    "Entry",
    "EntryState",
    "Ledger",
]

LEASE_S: Final = 30.0
"""How long a claim on a step lasts without renewal, unless the gateway is told otherwise."""
DONE_RETENTION_S: Final = 7 * 86_400
"""How long a recorded answer is kept for retries."""
DECISION_USED_TTL_S: Final = 86_400
"""How long a used decision is remembered; far longer than any decision is valid."""

EntryState = Literal["running", "done", "retryable", "in_doubt"]
ClaimStatus = Literal[
    "new", "resumed", "retried", "running", "doubted", "in_doubt", "reused", "expired"
]
"""What `Ledger.begin` found, for a step that is not done:

- ``new``: no entry; the caller now holds one, and its decision is used: run the tool.
- ``resumed``: an idempotent tool's lease had lapsed; the caller now holds it: run the tool
  again with the entry's idempotency key.
- ``retried``: the last attempt failed and may be retried; the caller now holds the step:
  run the tool again with the entry's idempotency key.
- ``running``: another attempt holds a live lease; run nothing.
- ``doubted``: a tool that is not idempotent had its lease lapse; the entry is now in doubt
  (the caller is the first to know, and reports it); run nothing.
- ``in_doubt``: the entry was already in doubt; run nothing.
- ``reused``: no entry, but the decision was used (its entry was removed); run nothing.
- ``expired``: the caller's decision may no longer run anything, and the step has no answer.
"""

# KEYS: entry, decision-used. ARGV: now, idempotent, may run, gateway, call, lease until,
# decision-used ttl, then the new entry's field/value pairs.
_BEGIN: Final = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' then return {'done', redis.call('HGET', KEYS[1], 'result')} end
if state == 'in_doubt' then return {'in_doubt'} end
if state == 'retryable' then
  if ARGV[3] ~= '1' then return {'expired'} end
  redis.call('HSET', KEYS[1], 'state', 'running', 'gateway', ARGV[4], 'call', ARGV[5],
    'lease_until', ARGV[6])
  redis.call('HDEL', KEYS[1], 'result', 'finished_at')
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('PERSIST', KEYS[1])
  return {'retried'}
end
if state == 'running' then
  if tonumber(redis.call('HGET', KEYS[1], 'lease_until')) > tonumber(ARGV[1]) then
    return {'running'}
  end
  if ARGV[2] ~= '1' then
    redis.call('HSET', KEYS[1], 'state', 'in_doubt')
    return {'doubted'}
  end
  if ARGV[3] ~= '1' then return {'expired'} end
  redis.call('HSET', KEYS[1], 'gateway', ARGV[4], 'call', ARGV[5], 'lease_until', ARGV[6])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  return {'resumed'}
end
if ARGV[3] ~= '1' then return {'expired'} end
if not redis.call('SET', KEYS[2], ARGV[5], 'NX', 'EX', ARGV[7]) then return {'reused'} end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
return {'new'}
"""

# KEYS: entry. ARGV: call, lease until. Returns 1 while the call holds the lease.
_RENEW: Final = """
if redis.call('HGET', KEYS[1], 'state') == 'running'
    and redis.call('HGET', KEYS[1], 'call') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
  return 1
end
return 0
"""

# KEYS: entry. ARGV: result (JSON), finished at, retention. Returns the recorded result, or
# nil when there is no entry.
_FINISH: Final = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'done' then return redis.call('HGET', KEYS[1], 'result') end
redis.call('HSET', KEYS[1], 'state', 'done', 'result', ARGV[1], 'finished_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return ARGV[1]
"""

# KEYS: entry. ARGV: call, failure (JSON), failed at, retention. Returns the recorded answer
# when the step is done, the failure otherwise, or nil when there is no entry. Only the
# attempt holding the lease releases a running step; one that lost it may still settle a
# doubt, as `_FINISH` does.
_RELEASE: Final = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'done' then return redis.call('HGET', KEYS[1], 'result') end
if state == 'in_doubt'
    or (state == 'running' and redis.call('HGET', KEYS[1], 'call') == ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'retryable', 'result', ARGV[2], 'finished_at', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return ARGV[2]
"""


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One step's tool call, as the ledger keeps it.

    Attributes:
        idempotency_key: what the tool is given to dedupe on (`Ledger.idempotency_key`).
        decision_id: the decision that authorised the first attempt.
        gateway: the gateway holding the lease, or the last one that held it.
        call: the id of that gateway's call message; it renews the lease with it.
        started_at: when the first attempt claimed the step (that gateway's clock).
        lease_until: when the current lease lapses unless renewed.
        attempts: how many attempts have held the lease.
        result: the recorded answer, once ``done``; the last failure, while ``retryable``.
        finished_at: when it was recorded.
    """

    state: EntryState
    workflow: str
    step: int
    intent_hash: str
    tool: str
    idempotency_key: str
    decision_id: str
    gateway: str
    call: str
    started_at: float
    lease_until: float
    attempts: int = 1
    result: ToolResult | None = None
    finished_at: float = 0.0


class Ledger:
    """One tenant's idempotency ledger in Redis (see the module docs).

    Args:
        redis: the connection to use.
        tenant: the tenant whose keys these are.
    """

    def __init__(self, redis: aioredis.Redis, *, tenant: str) -> None:
        self.redis = redis
        self.tenant = tenant
        self._prefix = key_prefix(tenant)
        self._begin = redis.register_script(_BEGIN)
        self._renew = redis.register_script(_RENEW)
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE)
        self._result = msgspec.json.Decoder(ToolResult)

    def key(self, workflow: str, step: int, intent_hash: str) -> str:
        """The Redis key of the entry for this step's call."""
        return f"{self._prefix}:idem:{workflow}:{step}:{intent_hash}"

    def idempotency_key(self, workflow: str, step: int, intent_hash: str) -> str:
        """What the tool dedupes on: the same for every attempt at this step's call and
        unique across tenants; readable, so a person can find the step in a tool's records."""
        return f"{self.tenant}:{workflow}:{step}:{intent_hash}"

    async def begin(
        self, entry: Entry, *, idempotent: bool, may_run: bool
    ) -> ToolResult | ClaimStatus:
        """Claim ``entry``'s step for one attempt, or learn why it must not run now.

        Returns the step's recorded answer when it is done, otherwise what was found (see
        `ClaimStatus`).

        Args:
            entry: the ``running`` entry to create if the step is new; its ``started_at`` is
                the caller's now and ``lease_until`` the end of its lease.
            idempotent: the tool may run again after a lapsed lease.
            may_run: the caller's decision is still valid for running the tool (unexpired);
                without it, only a recorded answer or the step's state is returned.

        Raises:
            ValueError: ``entry`` is not ``running``.
        """
        if entry.state != "running":
            raise ValueError(f"a step begins running, not {entry.state!r}")
        fields: list[str] = []
        for name, value in msgspec.structs.asdict(entry).items():
            if value is not None:
                fields += [name, repr(value) if isinstance(value, float) else str(value)]
        got = cast(
            list[bytes],
            await self._begin(
                keys=[self.key(entry.workflow, entry.step, entry.intent_hash), self._used(entry)],
                args=[
                    repr(entry.started_at),
                    int(idempotent),
                    int(may_run),
                    entry.gateway,
                    entry.call,
                    repr(entry.lease_until),
                    DECISION_USED_TTL_S,
                    *fields,
                ],
            ),
        )
        if got[0] == b"done":
            return self._result.decode(got[1])
        return cast(ClaimStatus, got[0].decode())

    async def renew(self, key: str, *, call: str, lease_until: float) -> bool:
        """Extend the lease of ``call`` on ``key``; False if it no longer holds it."""
        return bool(await self._renew(keys=[key], args=[call, repr(lease_until)]))

    async def finish(self, key: str, result: ToolResult, *, now: float) -> ToolResult | None:
        """Record ``result`` as the step's answer, unless one is recorded already.

        Also how a person resolves an entry in doubt. Returns the answer now recorded (the
        earlier one, if any), or None when there is no entry (a person removed it).
        """
        got = await self._finish(
            keys=[key], args=[msgspec.json.encode(result), repr(now), DONE_RETENTION_S]
        )
        return None if got is None else self._result.decode(got)

    async def release(
        self, key: str, failure: ToolResult, *, call: str, now: float
    ) -> ToolResult | None:
        """Give the step back after ``call``'s attempt failed and may be retried, keeping
        ``failure``; the next call with an unexpired decision runs the tool again.

        Returns the step's recorded answer when another attempt finished it first,
        otherwise ``failure``; None when there is no entry (a person removed it). An
        attempt that no longer holds the lease changes nothing but a doubt: the tool's
        promise that it changed nothing settles that.
        """
        got = await self._release(
            keys=[key], args=[call, msgspec.json.encode(failure), repr(now), DONE_RETENTION_S]
        )
        return None if got is None else self._result.decode(got)

    async def entry(self, key: str) -> Entry | None:
        """The entry at ``key``, or None."""
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(key))
        if not raw:
            return None
        fields: dict[str, object] = {k.decode(): v.decode() for k, v in raw.items()}
        result = raw.get(b"result")
        fields["result"] = None if result is None else self._result.decode(result)
        return msgspec.convert(fields, Entry, strict=False)

    def _used(self, entry: Entry) -> str:
        return f"{self._prefix}:decision-used:{entry.decision_id}"
