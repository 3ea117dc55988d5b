"""Durable approvals: escalated intents waiting for a human, kept in Redis.

An escalation lives in a tenant's Redis keys until it is settled (governance stores it
with the decision's record, in one atomic write, before announcing it), so any governance actor
(a restarted one too) can settle it, and ``govmesh approvals`` can list it from another
process:

==========================  ===========================================================
``approvals:pending``       hash: approval id -> the `ApprovalRequest` (msgpack)
``approvals:expiry``        sorted set: approval id scored by when it lapses
``approvals:claims``        hash: approval id -> the `Answer` being settled (JSON)
``approvals:claimed``       sorted set: approval id scored by when it was claimed
``approvals:done``          hash: approval id -> its `ApprovalRecord` (JSON)
==========================  ===========================================================

Settling is claim, decide, publish, finish. The claim is atomic, so two governance actors
(or an answer racing the expiry) never settle one approval twice; a claim left behind by an
actor that died before finishing is taken over, with the answer it carried, once it is
older than the grace period, so an answer once taken is never lost.
"""

from __future__ import annotations

import time
from typing import Any, Final, Literal, cast

import msgspec
import redis.asyncio as aioredis

from govmesh.governance.messages import ApprovalRequest, Outcome

__all__ = [
    "CLAIM_GRACE_S",
    "Answer",
    "ApprovalRecord",
    "ApprovalStore",
    "expiry_answer",
    "is_id_prefix",
]

CLAIM_GRACE_S: Final = 30.0
"""A claim older than this belongs to an actor that died mid-settlement."""

# KEYS: pending, claims, claimed. ARGV: id, answer (JSON, '' to take over only), now,
# stale_before. Returns {request, answer} to settle, or nil.
_CLAIM: Final = """
local request = redis.call('HGET', KEYS[1], ARGV[1])
if not request then return false end
local at = redis.call('ZSCORE', KEYS[3], ARGV[1])
if at then
  if tonumber(at) > tonumber(ARGV[4]) then return false end
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  return {request, redis.call('HGET', KEYS[2], ARGV[1])}
end
if ARGV[2] == '' then return false end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return {request, ARGV[2]}
"""


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """What settles an approval: an operator's answer, or its lapse.

    Attributes:
        approved: the operator approved (or the policy's default on expiry is ``allow``).
        by: the person named by the operator, or ``"policy"`` on expiry.
        operator: the operator identity (token subject) that signed the answer.
        reason: the operator's reason, or why the approval lapsed.
        expired: nobody answered before the approval lapsed.
        causation: id of the message that carried the answer.
        proof: that message as it came over the bus (sealed: envelope, the operator's token,
            their Ed25519 signature), so the answer can be checked later; empty on expiry.
    """

    approved: bool
    by: str
    operator: str = ""
    reason: str = ""
    expired: bool = False
    causation: str = ""
    proof: bytes = b""


class ApprovalRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A settled approval, kept for the audit trail.

    Attributes:
        outcome: the final decision sent to the workflow.
        reasons: that decision's reasons.
    """

    approval_id: str
    workflow: str
    agent: str
    tool: str
    args: dict[str, Any]
    intent_hash: str
    requested_at: float
    answer: Answer
    outcome: Outcome
    reasons: tuple[str, ...]
    settled_at: float


class ApprovalStore:
    """One tenant's approvals in Redis (see the module docs for the keys).

    Args:
        redis: the connection to use.
        prefix: the tenant's key prefix.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self._keys = {
            name: f"{prefix}:approvals:{name}"
            for name in ("pending", "expiry", "claims", "claimed", "done")
        }
        self._request = msgspec.msgpack.Decoder(ApprovalRequest)
        self._answer = msgspec.json.Decoder(Answer)
        self._record = msgspec.json.Decoder(ApprovalRecord)
        self._claim = redis.register_script(_CLAIM)

    def key(self, name: str) -> str:
        """The Redis key `name` (see the module docs), for writers that store a request
        together with other data in one script."""
        return self._keys[name]

    async def pending(self) -> list[ApprovalRequest]:
        """Every pending request, oldest first (those being settled included)."""
        raw = cast(list[bytes], await self.redis.hvals(self._keys["pending"]))
        return sorted((self._request.decode(r) for r in raw), key=lambda r: r.requested_at)

    async def get(self, approval_id: str) -> ApprovalRequest | None:
        """The pending request `approval_id`, or None."""
        raw = cast(bytes | None, await self.redis.hget(self._keys["pending"], approval_id))
        return None if raw is None else self._request.decode(raw)

    async def done(self, approval_id: str) -> ApprovalRecord | None:
        """The record of the settled approval `approval_id`, or None."""
        raw = cast(bytes | None, await self.redis.hget(self._keys["done"], approval_id))
        return None if raw is None else self._record.decode(raw)

    async def add(self, request: ApprovalRequest) -> None:
        """Store a pending request (with its expiry) that no decision record goes with: a
        budget interrupt. Governance stores an escalation's inside its decision's write."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys["pending"], request.approval_id, msgspec.msgpack.encode(request))
            if request.expires_at:
                pipe.zadd(self._keys["expiry"], {request.approval_id: request.expires_at})
            await pipe.execute()

    async def settled(self) -> list[ApprovalRecord]:
        """Every settled approval kept."""
        return [
            self._record.decode(raw) async for _, raw in self.redis.hscan_iter(self._keys["done"])
        ]

    async def of_workflow(self, workflow: str) -> list[ApprovalRecord]:
        """The settled approvals of ``workflow``, oldest request first."""
        found = [r for r in await self.settled() if r.workflow == workflow]
        return sorted(found, key=lambda r: r.requested_at)

    async def forget(self, workflows: set[str]) -> int:
        """Delete the settled approvals of ``workflows``; returns how many there were."""
        doomed = [r.approval_id for r in await self.settled() if r.workflow in workflows]
        if doomed:
            await self.redis.hdel(self._keys["done"], *doomed)
        return len(doomed)

    async def done_matching(self, id_prefix: str) -> list[ApprovalRecord]:
        """Settled approvals whose id starts with `id_prefix` (hex digits only).

        Raises:
            ValueError: `id_prefix` cannot begin an approval id (`is_id_prefix`).
        """
        if not is_id_prefix(id_prefix):
            raise ValueError(f"approval ids are lowercase hex, got {id_prefix!r}")
        return [
            self._record.decode(raw)
            async for _, raw in self.redis.hscan_iter(self._keys["done"], match=f"{id_prefix}*")
        ]

    async def claim(
        self, approval_id: str, answer: Answer | None, *, now: float | None = None
    ) -> tuple[ApprovalRequest, Answer] | None:
        """Take `approval_id` to settle it with `answer`; None if it is not pending or
        another actor is settling it.

        With ``answer=None`` only a claim abandoned for `CLAIM_GRACE_S` is taken over; the
        answer it carried is returned.
        """
        now = time.time() if now is None else now
        k = self._keys
        got: list[bytes] | None = await self._claim(
            keys=[k["pending"], k["claims"], k["claimed"]],
            args=[
                approval_id,
                b"" if answer is None else msgspec.json.encode(answer),
                repr(now),
                repr(now - CLAIM_GRACE_S),
            ],
        )
        if not got:
            return None
        return self._request.decode(got[0]), self._answer.decode(got[1])

    async def due(self, *, now: float | None = None, limit: int = 100) -> list[str]:
        """Approval ids that lapsed by `now`, and those whose claim was abandoned."""
        now = time.time() if now is None else now
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(self._keys["expiry"], "-inf", now, start=0, num=limit)
            pipe.zrangebyscore(
                self._keys["claimed"], "-inf", now - CLAIM_GRACE_S, start=0, num=limit
            )
            lapsed, abandoned = await pipe.execute()
        return [i.decode() for i in (*abandoned, *lapsed)]

    async def finish(self, record: ApprovalRecord) -> None:
        """Move a settled approval from pending to done, in one transaction."""
        k, approval_id = self._keys, record.approval_id
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(k["done"], approval_id, msgspec.json.encode(record))
            pipe.hdel(k["pending"], approval_id)
            pipe.hdel(k["claims"], approval_id)
            pipe.zrem(k["claimed"], approval_id)
            pipe.zrem(k["expiry"], approval_id)
            await pipe.execute()


def is_id_prefix(text: str) -> bool:
    """Whether `text` can begin an approval id: lowercase hex digits, at least one."""
    return bool(text) and all(c in "0123456789abcdef" for c in text)


def expiry_answer(request: ApprovalRequest) -> Answer:
    """The answer of the policy in force at escalation time, for a request that lapsed."""
    waited = max(0.0, request.expires_at - request.requested_at)
    verdict: Literal["allow", "deny"] = request.on_expiry
    return Answer(
        approved=verdict == "allow",
        by="policy",
        reason=f"approval expired unanswered after {waited:g} s; policy default is {verdict}",
        expired=True,
    )
