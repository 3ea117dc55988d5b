"""What the audit trail tells about one workflow, put together: its cost, its evidence
bundle, and retention of finished workflows.

The audit index holds the events; the decision records, policy texts, approvals and spend
live under their own keys (governance, budget). This module reads them together:

- `costed_trace`: a workflow's causal trace with each model call's cost (`audit show`).
- `export_bundle`: the evidence bundle of one workflow (`audit export`), one JSON object
  whose ``digest`` member is the sha256 of the rest (see `bundle_digest`).
- `prune_index`: retention; removes workflows that finished before a cutoff (`audit prune`).

Not re-exported by ``govmesh.observability``: it reads governance and budget records, and
those packages import the observability package for tracing.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, cast

import jwt
import msgspec
import redis.asyncio as aioredis

from govmesh.bus._codec import Codec
from govmesh.errors import SecurityError
from govmesh.forecasting._budget import workflow_spend_keys
from govmesh.governance._approvals import ApprovalRecord, ApprovalStore
from govmesh.governance._replay import (
    PolicySource,
    decisions_of,
    forget_decisions,
    policy_set_of,
    recorded_policy,
)
from govmesh.governance.messages import ApprovalAnswer
from govmesh.identity import VerifyKey
from govmesh.observability._audit import (
    AuditIndex,
    AuditRecord,
    AuditTrace,
    Scalar,
    VerifyReport,
    declared_fields,
    workflow_end,
)

__all__ = [
    "BUNDLE_FORMAT",
    "CallCost",
    "CostedTrace",
    "PruneReport",
    "WorkflowCost",
    "bundle_digest",
    "costed_trace",
    "export_bundle",
    "prune_index",
]

BUNDLE_FORMAT: Final = "govmesh-evidence-bundle/1"
"""The bundle's format name and version; a change of meaning gets a new version."""

_DIGEST_RULE: Final = (
    "sha256 of the bundle without its 'digest' member, as JSON with keys sorted, separators "
    "',' and ':', no other whitespace, UTF-8 (Python: json.dumps(b, sort_keys=True, "
    "separators=(',', ':'), ensure_ascii=False))"
)


class CallCost(msgspec.Struct, frozen=True, kw_only=True):
    """One model call, from its usage event, and what the budget actor counted for it.

    Attributes:
        id: the usage event's id.
        seq: its place in the workflow's chain.
        ts: when it was reported.
        agent: who made the call.
        model: the model.
        input_tokens: prompt tokens.
        output_tokens: completion tokens.
        reasoning_tokens: reasoning tokens, if the model reports them.
        error: the answer was unusable.
        cost_usd: what the budget actor counted, at its prices; None when it recorded no
            cost for this call (a record from before per-call costs were kept).
    """

    id: str
    seq: int
    ts: float
    agent: str
    model: str
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int = 0
    error: bool = False
    cost_usd: float | None = None


class WorkflowCost(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow's model calls and what they cost.

    Attributes:
        calls: each call, in chain order.
        model_calls: how many.
        input_tokens: prompt tokens of all of them.
        output_tokens: completion tokens of all of them.
        cost_usd: the sum of the calls' recorded costs.
        unpriced: calls without a recorded cost (not in ``cost_usd``).
        counted_usd: the budget actor's running total for the workflow, which matches
            ``cost_usd`` unless calls went unrecorded.
    """

    calls: list[CallCost]
    model_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    unpriced: int
    counted_usd: float


class CostedTrace(AuditTrace, kw_only=True):
    """A workflow's causal trace and its cost.

    Attributes:
        cost: its model calls and what they cost.
    """

    cost: WorkflowCost


async def _workflow_cost(
    redis: aioredis.Redis, prefix: str, workflow: str, records: Sequence[AuditRecord]
) -> WorkflowCost:
    totals_key, calls_key = workflow_spend_keys(prefix, workflow)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(calls_key)
        pipe.hget(totals_key, "cost_usd")
        raw_costs, counted = await pipe.execute()
    costs = {k.decode(): float(v) for k, v in cast(dict[bytes, bytes], raw_costs).items()}
    calls = []
    for r in records:
        if r.kind != "Usage":
            continue
        s = r.summary
        calls.append(
            CallCost(
                id=r.id,
                seq=r.seq,
                ts=r.ts,
                agent=r.sender,
                model=str(s.get("model", "")),
                input_tokens=int(s.get("input_tokens") or 0),
                output_tokens=int(s.get("output_tokens") or 0),
                reasoning_tokens=int(s.get("reasoning_tokens") or 0),
                error=bool(s.get("error", False)),
                cost_usd=costs.get(r.id),
            )
        )
    priced = [c.cost_usd for c in calls if c.cost_usd is not None]
    return WorkflowCost(
        calls=calls,
        model_calls=len(calls),
        input_tokens=sum(c.input_tokens for c in calls),
        output_tokens=sum(c.output_tokens for c in calls),
        cost_usd=round(sum(priced), 9),
        unpriced=len(calls) - len(priced),
        counted_usd=float(counted or 0.0),
    )


async def costed_trace(index: AuditIndex, workflow: str) -> CostedTrace:
    """``workflow`` 's causal trace (`AuditIndex.show`) with each model call's cost."""
    trace = await index.show(workflow)
    cost = await _workflow_cost(index.redis, index.prefix, workflow, trace.records)
    return CostedTrace(**msgspec.structs.asdict(trace), cost=cost)


def bundle_digest(bundle: dict[str, Any]) -> str:
    """The sha256 (hex) a bundle's ``digest`` must hold: over the bundle without that
    member, as canonical JSON (keys sorted, no whitespace, UTF-8)."""
    content = {k: v for k, v in bundle.items() if k != "digest"}
    canonical = json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _generator() -> str:
    try:
        return f"govmesh {version('govmesh')}"
    except PackageNotFoundError:
        return "govmesh"


def _answer_proof(record: ApprovalRecord) -> dict[str, Any]:
    """What the sealed message that carried an operator's answer proves: who signed it,
    with which key, and whether the signature and content match the recorded answer."""
    answer = record.answer
    if not answer.proof:
        return {"kept": False}
    codec = Codec()
    try:
        sealed = codec.open(answer.proof)
        envelope = codec.envelope(sealed.envelope)
        body = codec.body(envelope, ApprovalAnswer)
        claims = jwt.decode(sealed.token, options={"verify_signature": False})
        x = str(claims["cnf"]["x"])
        key = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    except (SecurityError, jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
        return {"kept": True, "readable": False, "error": str(exc)}
    return {
        "kept": True,
        "readable": True,
        "message_id": envelope.id,
        "signer": envelope.sender,
        "signed_at": envelope.ts,
        "operator_key": key.hex(),
        "signature": sealed.signature.hex(),
        "signature_valid": VerifyKey(key).verify(sealed.signature, sealed.envelope),
        "matches_answer": (
            envelope.id == answer.causation
            and body.approval_id == record.approval_id
            and (body.approved, body.by, body.reason) == (answer.approved, answer.by, answer.reason)
        ),
        "token_claims": {k: claims.get(k) for k in ("sub", "role", "iss", "aud", "iat", "exp")},
        "sealed_message_b64": base64.b64encode(answer.proof).decode(),
    }


def _approval(record: ApprovalRecord, shown: dict[str, Scalar] | None) -> dict[str, Any]:
    answer = record.answer
    return {
        "approval_id": record.approval_id,
        "agent": record.agent,
        "tool": record.tool,
        "args": record.args,
        "shown": shown,
        "intent_hash": record.intent_hash,
        "requested_at": record.requested_at,
        "settled_at": record.settled_at,
        "approved": answer.approved,
        "by": answer.by,
        "reason": answer.reason,
        "operator": answer.operator,
        "expired": answer.expired,
        "outcome": record.outcome,
        "reasons": list(record.reasons),
        "proof": _answer_proof(record),
    }


def _outcome(end: AuditRecord) -> dict[str, Any]:
    """How the workflow ended, from the outcome its entry agent sent whoever started it."""
    s = end.summary
    return {
        "event": end.id,
        "ts": end.ts,
        "agent": end.sender,
        "result": s.get("result"),
        "first_decision": s.get("first_decision", ""),
        "tool": s.get("tool", ""),
        "fields": declared_fields(end.kind, s),
    }


async def _checkpoint(index: AuditIndex, workflow: str) -> dict[str, Any] | None:
    signed = await index.latest_checkpoint()
    if signed is None:
        return None
    cp = signed.checkpoint()
    head = cp.heads.get(workflow)
    return {
        "ts": cp.ts,
        "signer": cp.signer,
        "key": cp.key.hex(),
        "signature": signed.signature.hex(),
        "signature_valid": signed.signed_by_its_key(),
        "workflow_head": None if head is None else {"seq": head[0], "hash": head[1]},
        "signed_doc_b64": base64.b64encode(signed.doc).decode(),
    }


async def _policies(
    redis: aioredis.Redis, prefix: str, hashes: Sequence[str]
) -> list[dict[str, Any]]:
    found = []
    for h in hashes:
        sources: list[PolicySource] = await recorded_policy(redis, prefix=prefix, policy_hash=h)
        found.append(
            {
                "policy_hash": h,
                "recorded": bool(sources),
                "texts_compile_to_hash": bool(sources) and policy_set_of(sources).hash == h,
                "sources": [msgspec.to_builtins(s) for s in sources],
            }
        )
    return found


async def export_bundle(
    redis: aioredis.Redis,
    *,
    tenant: str,
    prefix: str,
    workflow: str,
    source: dict[str, Any],
    now: float | None = None,
) -> dict[str, Any]:
    """The evidence bundle of ``workflow`` as a JSON-ready object (see "Evidence bundles"
    in docs/operations.md for each member), its ``digest`` set.

    Args:
        redis: the deployment's Redis (or a kept run's).
        tenant: the workflow's tenant.
        prefix: the tenant's key prefix.
        workflow: the workflow.
        source: where the records come from (a kept run's manifest, or a Redis URL), as
            written into the bundle.
        now: the generation time (now if None).
    """
    now = time.time() if now is None else now
    index = AuditIndex(redis, prefix=prefix)
    trace = await costed_trace(index, workflow)
    verify: VerifyReport = await index.verify(workflow)
    decided = await decisions_of(redis, prefix=prefix, workflow=workflow)
    approvals = await ApprovalStore(redis, prefix).of_workflow(workflow)
    hashes = sorted(
        {d.policy_hash for d, _ in decided}
        | {str(r.summary["policy_hash"]) for r in trace.records if r.summary.get("policy_hash")}
    )
    pruned = (await index.pruned()).get(workflow)
    # What people were shown of each request: the arguments its tool declares to show.
    shown = {
        str(r.summary["approval_id"]): declared_fields(r.kind, r.summary)
        for r in trace.records
        if r.kind == "ApprovalRequest" and r.summary.get("approval_id")
    }
    end = workflow_end(trace.records)
    bundle: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "generated_at": now,
        "generated_at_utc": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(),
        "generator": _generator(),
        "source": {"tenant": tenant, "key_prefix": prefix, **source},
        "workflow": workflow,
        "period": {
            "first_event": trace.records[0].ts if trace.records else None,
            "last_event": trace.records[-1].ts if trace.records else None,
            "events": len(trace.records),
        },
        "pruned": None if pruned is None else msgspec.to_builtins(pruned),
        "outcome": None if end is None else _outcome(end),
        "events": [msgspec.structs.asdict(r) for r in trace.records],
        # Messages that claimed this workflow and failed verification: evidence of an
        # attempt, never events of the workflow.
        "refused": [msgspec.to_builtins(m) for m in trace.refused],
        "decisions": [
            {
                "intent_id": d.intent_id,
                "agent": d.intent.agent,
                "role": d.intent.role,
                "tool": d.intent.tool,
                "args": d.intent.args,
                "step": d.intent.step,
                "context": msgspec.to_builtins(d.context),
                "outcome": d.outcome,
                "reasons": list(d.reasons),
                "obligations": list(d.obligations),
                "policy_hash": d.policy_hash,
                "decided_by": d.decided_by,
                "contended": d.contended,
                "replay": why or "same outcome and reasons",
            }
            for d, why in decided
        ],
        "policies": await _policies(redis, prefix, hashes),
        "approvals": [_approval(a, shown.get(a.approval_id)) for a in approvals],
        "costs": msgspec.to_builtins(trace.cost),
        "integrity": {
            "verify": {**msgspec.to_builtins(verify), "ok": verify.ok},
            "checkpoint": await _checkpoint(index, workflow),
        },
    }
    bundle = cast(dict[str, Any], msgspec.to_builtins(bundle))
    bundle["digest"] = {"algorithm": "sha256", "rule": _DIGEST_RULE, "value": ""}
    bundle["digest"]["value"] = bundle_digest(bundle)
    return bundle


class PruneReport(msgspec.Struct, kw_only=True):
    """What `prune_index` removed (or, with ``dry_run``, would remove).

    Attributes:
        cutoff: workflows whose latest event is older than this (unix seconds) qualify.
        dry_run: nothing was removed.
        workflows: the ended workflows concerned.
        decisions: their decision records removed.
        approvals: their settled approvals removed.
        refused: refused messages the stream stored before the cutoff, removed.
    """

    cutoff: float
    dry_run: bool
    workflows: list[str] = msgspec.field(default_factory=list)
    decisions: int = 0
    approvals: int = 0
    refused: int = 0


async def prune_index(
    redis: aioredis.Redis,
    *,
    prefix: str,
    older_than_s: float,
    now: float | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Remove the workflows that ended (`workflow_end`) and whose latest event is older
    than ``older_than_s``: their decision records, settled approvals and spend, then their
    chains, each leaving a `PruneMark` so verify does not take them for tampering; and the
    refused messages the stream stored before the cutoff.

    The chains go last, so a prune cut short leaves them to be found by the next one.
    """
    now = time.time() if now is None else now
    report = PruneReport(cutoff=now - older_than_s, dry_run=dry_run)
    index = AuditIndex(redis, prefix=prefix)
    report.workflows = await index.finished_before(report.cutoff)
    old = [m for m in await index.refused() if m.stored_at < report.cutoff]
    report.refused = len(old)
    if dry_run:
        return report
    await index.forget_refused(old)
    if not report.workflows:
        return report
    doomed = set(report.workflows)
    report.decisions = await forget_decisions(redis, prefix=prefix, workflows=doomed)
    report.approvals = await ApprovalStore(redis, prefix).forget(doomed)
    await redis.delete(*(k for wf in report.workflows for k in workflow_spend_keys(prefix, wf)))
    await index.prune(
        report.workflows, reason=f"ended, latest event older than {older_than_s:g} s", now=now
    )
    return report
