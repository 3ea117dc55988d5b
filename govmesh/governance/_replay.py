"""Decision records and replay: every policy decision can be decided again, from its
recorded inputs under its recorded policy version, and must come out the same."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, Final, cast

import msgspec
import redis.asyncio as aioredis

from govmesh.governance._evaluator import EvalContext, Intent, evaluate
from govmesh.governance._policy import PolicySet, compose_policies, parse_policy_text

__all__ = [
    "CONTENDED_REASON",
    "DecisionRecord",
    "PolicySource",
    "ReplayReport",
    "decisions_of",
    "forget_decisions",
    "policy_sources",
    "recorded_policy",
    "replay",
    "replay_url",
]


class PolicySource(msgspec.Struct, frozen=True, kw_only=True):
    """One policy file's text as it was loaded."""

    source: str
    text: str


CONTENDED_REASON: Final = "spend changed under every attempt to decide; denied to stay safe"


class DecisionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a decision depended on, and what it was.

    Attributes:
        contended: governance denied without a policy verdict, because the spend figures
            kept changing under it (`CONTENDED_REASON`); replay checks that the record says
            exactly that, and counts it apart.
        obligations: what the decision obliged the enforcement point to do (empty in
            records written before obligations were recorded).
        unused: the context figures no policy governing the role looks at (of
            ``workflow_spend_usd``, ``day_spend_usd``, ``recent_calls``): governance did not
            read them, and they stand at zero in ``context``.
    """

    intent_id: str
    intent: Intent
    context: EvalContext
    policy_hash: str
    outcome: str
    reasons: tuple[str, ...]
    decided_by: str
    contended: bool = False
    obligations: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()


class ReplayReport(msgspec.Struct, kw_only=True):
    """How many recorded decisions were decided again, and every one that came out
    differently (there must be none)."""

    decisions: int = 0
    matched: int = 0
    contended: int = 0
    policy_versions: int = 0
    mismatches: list[dict[str, Any]] = msgspec.field(default_factory=list)


def policy_sources(paths: Iterable[str]) -> list[PolicySource]:
    """The texts of the policy files at ``paths``, to record with their policy hash."""
    sources = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            sources.append(PolicySource(source=str(path), text=f.read()))
    return sources


def policy_set_of(sources: list[PolicySource]) -> PolicySet:
    """The policy set that ``sources`` compile to."""
    return compose_policies(
        p for s in sources for p in parse_policy_text(s.text, source=s.source).policies
    )


def decisions_key(prefix: str) -> str:
    """The Redis stream of decision records of a tenant."""
    return f"{prefix}:decisions"


def policy_key(prefix: str, policy_hash: str) -> str:
    """Where the policy texts of one policy version are kept."""
    return f"{prefix}:policy:{policy_hash}"


async def replay(
    redis: aioredis.Redis, *, prefix: str, batch: int = 1000, limit_mismatches: int = 50
) -> ReplayReport:
    """Decide every recorded decision of the tenant at ``prefix`` again and compare.

    Args:
        redis: the deployment's Redis.
        prefix: the tenant's key prefix (``gm:<tenant>``).
        batch: records read per round trip.
        limit_mismatches: how many differing decisions to list in full.
    """
    report = ReplayReport()
    sets: dict[str, PolicySet | None] = {}
    async for _, record in _records(redis, prefix, batch):
        report.decisions += 1
        why = await _difference(redis, prefix, record, sets)
        if why:
            _mismatch(report, limit_mismatches, record, why)
        else:
            report.matched += 1
            report.contended += record.contended
    report.policy_versions = len(sets)
    return report


async def decisions_of(
    redis: aioredis.Redis, *, prefix: str, workflow: str
) -> list[tuple[DecisionRecord, str]]:
    """Every recorded decision of ``workflow``, oldest first, each with why deciding it again
    comes out differently ("" when it comes out the same). Reads the tenant's whole record
    stream."""
    sets: dict[str, PolicySet | None] = {}
    return [
        (record, await _difference(redis, prefix, record, sets))
        async for _, record in _records(redis, prefix)
        if record.intent.workflow == workflow
    ]


async def forget_decisions(redis: aioredis.Redis, *, prefix: str, workflows: set[str]) -> int:
    """Delete the decision records of ``workflows``; returns how many there were."""
    doomed = [
        e async for e, record in _records(redis, prefix) if record.intent.workflow in workflows
    ]
    for start in range(0, len(doomed), 1000):
        await redis.xdel(decisions_key(prefix), *doomed[start : start + 1000])
    return len(doomed)


async def _records(
    redis: aioredis.Redis, prefix: str, batch: int = 1000
) -> AsyncIterator[tuple[str, DecisionRecord]]:
    """The tenant's decision records with their stream entry ids, oldest first."""
    decoder = msgspec.msgpack.Decoder(DecisionRecord)
    cursor = "-"
    while True:
        rows = await redis.xrange(decisions_key(prefix), min=cursor, max="+", count=batch)
        if not rows:
            return
        for entry_id, fields in cast(list[tuple[Any, dict[bytes, bytes]]], rows):
            entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            # Exclusive start for the next batch (a "(" range needs Redis 6.2 or Valkey).
            cursor = "(" + entry
            yield entry, decoder.decode(bytes(fields[b"record"]))


async def _difference(
    redis: aioredis.Redis, prefix: str, record: DecisionRecord, sets: dict[str, PolicySet | None]
) -> str:
    """Why deciding ``record`` again comes out differently; "" when it comes out the same."""
    if record.contended:
        # Not a policy verdict: the safe default when figures kept changing.
        plain = record.outcome == "deny" and record.reasons == (CONTENDED_REASON,)
        return "" if plain else "contended but not a plain deny"
    policy_set = await _policy_set(redis, prefix, record.policy_hash, sets)
    if policy_set is None:
        return "policy version not recorded"
    again = evaluate(policy_set, record.intent, record.context)
    if again.outcome == record.outcome and again.reasons == record.reasons:
        return ""
    return f"now {again.outcome}: {'; '.join(again.reasons)}"


async def replay_url(redis_url: str, *, prefix: str) -> ReplayReport:
    """`replay` against the Redis at ``redis_url``, with a connection of its own."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        return await replay(r, prefix=prefix)
    finally:
        await r.aclose()


async def recorded_policy(
    redis: aioredis.Redis, *, prefix: str, policy_hash: str
) -> list[PolicySource]:
    """The policy texts recorded for version ``policy_hash`` (none if not recorded)."""
    raw = await redis.get(policy_key(prefix, policy_hash))
    return msgspec.json.decode(raw, type=list[PolicySource]) if raw else []


async def _policy_set(
    redis: aioredis.Redis, prefix: str, policy_hash: str, cache: dict[str, PolicySet | None]
) -> PolicySet | None:
    if policy_hash not in cache:
        sources = await recorded_policy(redis, prefix=prefix, policy_hash=policy_hash)
        found = policy_set_of(sources) if sources else None
        # Texts that no longer compile to the recorded version cannot vouch for it.
        cache[policy_hash] = found if found is not None and found.hash == policy_hash else None
    return cache[policy_hash]


def _mismatch(report: ReplayReport, limit: int, record: DecisionRecord, why: str) -> None:
    if len(report.mismatches) < limit:
        report.mismatches.append(
            {
                "intent_id": record.intent_id,
                "workflow": record.intent.workflow,
                "recorded": record.outcome,
                "policy_hash": record.policy_hash,
                "difference": why,
            }
        )
