"""The governance actor: the policy decision point on the bus."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Final

import msgspec
from redis.exceptions import RedisError

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import PolicyError, SecurityError
from govmesh.governance._approvals import Answer, ApprovalRecord, ApprovalStore, expiry_answer
from govmesh.governance._evaluator import EvalContext, Intent, Verdict, evaluate, intent_hash
from govmesh.governance._policy import PolicySet
from govmesh.governance._replay import (
    CONTENDED_REASON,
    DecisionRecord,
    PolicySource,
    decisions_key,
    policy_key,
    policy_set_of,
    policy_sources,
)
from govmesh.governance.messages import (
    ApprovalAnswer,
    ApprovalRequest,
    ApprovalResult,
    Decision,
    ToolIntent,
)
from govmesh.identity import Claims, Identity
from govmesh.service import Service, being_cancelled

__all__ = ["OPERATOR_ROLE", "GovernanceService"]

OPERATOR_ROLE = "operator"
GOVERNANCE_ROLE = "governance"
QUEUE = "governance"

log = logging.getLogger(__name__)


def authorize_intent(claims: Claims, intent: ToolIntent) -> None:
    """Refuse an intent for a tool the sender's token does not name, or for an amount above
    the token's budget authority, before it reaches the policy engine."""
    claims.require(intent.tool)
    amount = intent.args.get("amount_usd")
    if (
        isinstance(amount, int | float)
        and not isinstance(amount, bool)
        and amount > claims.budget_usd
    ):
        raise SecurityError(
            "over_budget_authority",
            f"{claims.sub!r} asked for {amount!r} USD with authority {claims.budget_usd!r}",
        )


_MAX_DECIDE_ATTEMPTS = 20

# The figures a decision needs, read in one atomic step: the workflow's committed spend, the
# agent's spend of the UTC day and, with a rate window (ARGV[3] is its start, else ''), the
# agent's calls in it. This call is counted for the next ones, not for itself; on a second
# read for the same call its own entry is already there. A script rather than a MULTI
# pipeline: one command and one reply cost redis-py a quarter to a third less CPU to send and
# parse than MULTI, the reads and EXEC (measured on the bench's two-core machine).
_READ_FIGURES: Final = """
local wf = redis.call('HGET', KEYS[1], ARGV[1])
local day = redis.call('HGET', KEYS[2], ARGV[2])
local recent = 0
if ARGV[3] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[3])
  local own = redis.call('ZSCORE', KEYS[3], ARGV[5])
  recent = redis.call('ZCARD', KEYS[3]) - (own and 1 or 0)
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
return {wf, day, recent}
"""

# Everything a decision writes, in one atomic step. With an amount (ARGV[3]) it is a
# compare-and-commit: the spend figures the decision was made on must still hold, or nothing
# is written and the script returns 0 so that governance decides again. Only the figures
# some policy of the role limits are compared (ARGV[4], ARGV[5]; '' for one no policy
# limits), so decisions that no limit ties together never make each other decide again.
# Then, each only if given: the policy texts of a version not stored yet (before the record
# that refers to them), the decision record, an escalation's pending approval request
# (with its expiry, ARGV[11], in the sweep's sorted set; see `ApprovalStore`).
_WRITE_DECISION: Final = """
if ARGV[3] ~= '' then
  local wf = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
  local day = redis.call('HGET', KEYS[2], ARGV[2]) or '0'
  if (ARGV[4] ~= '' and tonumber(wf) ~= tonumber(ARGV[4]))
      or (ARGV[5] ~= '' and tonumber(day) ~= tonumber(ARGV[5])) then
    return 0
  end
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[3], ARGV[7], 'NX')
end
if ARGV[8] ~= '' then
  redis.call('XADD', KEYS[4], '*', 'record', ARGV[8])
end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[5], ARGV[9], ARGV[10])
  if ARGV[11] ~= '' then
    redis.call('ZADD', KEYS[6], ARGV[11], ARGV[9])
  end
end
return 1
"""

# A day's spend expires a day after its UTC day ends, when no decision can read it any more.
_DAY_SPEND_TTL_S: Final = 2 * 86_400


def _amount(args: dict[str, Any]) -> float | None:
    amount = args.get("amount_usd")
    if isinstance(amount, int | float) and not isinstance(amount, bool):
        return float(amount)
    return None


def _utc_day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


class GovernanceService(Service):
    """Answers every tool intent with a signed allow, deny or escalate decision.

    Several instances share intents as one NATS queue group; what they must agree on
    (committed spend per workflow, pending approvals) lives in Redis.

    Args:
        deployment: where the services are and whom to trust.
        identity: this actor's identity (role ``governance``).
        policy_paths: the policy files in force; re-read when they change.
        decision_ttl_s: how long an allow decision may be presented to the gateway.
        reload_interval_s: how often to look at the policy files for changes.
        sweep_interval_s: how often to settle lapsed approvals.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        policy_paths: list[str],
        decision_ttl_s: float = 60.0,
        reload_interval_s: float = 1.0,
        sweep_interval_s: float = 1.0,
    ) -> None:
        super().__init__(deployment, identity)
        self._paths = [Path(p) for p in policy_paths]
        self._stamp = self._file_stamp()
        self._sources, self.policies = self._load()
        self._recorded_versions: set[str] = set()
        self._reload_interval_s = reload_interval_s
        self._watch: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None
        self._sweep_interval_s = sweep_interval_s
        self._approvals: ApprovalStore | None = None
        self.reloads = 0
        self.reload_errors = 0
        self._decision_ttl_s = decision_ttl_s
        self._codec = msgspec.msgpack.Encoder()
        self.decided: Counter[str] = Counter()

    async def on_start(self) -> None:
        """Subscribe to intents and approval answers as a queue group."""
        await self.bus.subscribe(
            self.subjects.all("intent"),
            self._on_intent,
            accepts=ToolIntent,
            queue=QUEUE,
            authorize=authorize_intent,
        )
        await self.bus.subscribe(
            self.subjects.all("approval"),
            self._on_approval,
            accepts=ApprovalRequest | ApprovalAnswer,
            queue=QUEUE,
        )
        self._read_script = self.redis.register_script(_READ_FIGURES)
        self._write_script = self.redis.register_script(_WRITE_DECISION)
        self._watch = asyncio.create_task(self._watch_policies(), name="policy-reload")
        self._sweep = asyncio.create_task(self._sweep_approvals(), name="approval-sweep")

    def _load(self) -> tuple[list[PolicySource], PolicySet]:
        # Compiled from the very texts that are recorded, so a replay sees what was decided.
        try:
            sources = policy_sources(str(p) for p in self._paths)
        except OSError as exc:
            raise PolicyError(
                f"cannot read policy file: {exc.strerror}", path=exc.filename
            ) from None
        return sources, policy_set_of(sources)

    def _file_stamp(self) -> tuple[tuple[str, int, int], ...]:
        stamps = []
        for path in self._paths:
            try:
                st = path.stat()
                stamps.append((str(path), st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append((str(path), -1, -1))
        return tuple(stamps)

    async def _watch_policies(self) -> None:
        while True:
            await asyncio.sleep(self._reload_interval_s)
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """Load the policy files again if they changed; returns whether a new policy set is
        now in force.

        A file that no longer loads leaves the policy set in force untouched (a half-saved
        or mistyped edit must never open or close the gate by accident); the error is
        logged with its file and line and counted in `reload_errors`.
        """
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            sources, fresh = self._load()
        except PolicyError as exc:
            self.reload_errors += 1
            log.error("policy reload refused, %s stays in force: %s", self.policies.hash, exc)
            return False
        if fresh.hash == self.policies.hash:
            return False
        log.info("policy %s replaces %s", fresh.hash, self.policies.hash)
        self._sources, self.policies = sources, fresh
        self.reloads += 1
        return True

    def stats(self) -> dict[str, Any]:
        """Counters, plus decisions by outcome and the policy hash in force."""
        return {
            **super().stats(),
            "decided": dict(self.decided),
            "policy": self.policies.hash,
            "reloads": self.reloads,
            "reload_errors": self.reload_errors,
        }

    async def close(self) -> None:
        """Stop watching the policy files and sweeping approvals, then leave. Safe to call
        twice; an approval being settled is finished by another actor's sweep."""
        tasks = [t for t in (self._watch, self._sweep) if t is not None]
        self._watch = self._sweep = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().close()

    async def _on_intent(self, d: Delivery) -> None:
        body: ToolIntent = d.body
        workflow = d.envelope.workflow
        intent = Intent(
            agent=d.claims.sub,
            role=d.claims.role,
            tool=body.tool,
            args=body.args,
            workflow=workflow,
            step=body.step,
        )
        ihash = intent_hash(intent)
        verdict, request = await self._decide(
            intent,
            body.reflections,
            time.time(),
            call_id=d.envelope.id,
            commit=("allow",),
            record=True,
            trace=d.envelope.trace,
        )
        self.decided[verdict.outcome] += 1
        if request is not None:
            # Stored with the record, before it is announced, so an answer can never arrive
            # for an unknown request.
            await self.bus.publish(
                self.subjects.approval(workflow),
                request,
                workflow=workflow,
                causation=d.envelope.id,
                trace=d.envelope.trace,
            )
        decision = Decision(
            intent_id=d.envelope.id,
            intent_hash=ihash,
            workflow=workflow,
            agent=intent.agent,
            outcome=verdict.outcome,
            reasons=verdict.reasons,
            obligations=verdict.obligations,
            policy_hash=verdict.policy_hash,
            expires_at=time.time() + self._decision_ttl_s,
            final=verdict.outcome != "escalate",
            approval_id="" if request is None else request.approval_id,
            approval_expires_at=0.0 if request is None else request.expires_at,
        )
        await self.bus.publish(
            self.subjects.decision(workflow),
            decision,
            workflow=workflow,
            causation=d.envelope.id,
            trace=d.envelope.trace,
        )

    async def _context(
        self, intent: Intent, reflections: int, now: float, *, call_id: str
    ) -> EvalContext:
        """The figures the policy needs, read in one round trip (see `_READ_FIGURES`)."""
        window = self.policies.rate_window_s(intent.role)
        workflow_spend, day_spend, recent = await self._read_script(
            keys=[
                self.key("spend"),
                self.key("day-spend", _utc_day(now)),
                self.key("calls", intent.agent),
            ],
            args=[
                intent.workflow,
                intent.agent,
                b"" if window is None else repr(now - window),
                repr(now),
                call_id,
                0 if window is None else int(window) + 1,
            ],
        )
        return EvalContext(
            reflections=reflections,
            workflow_spend_usd=float(workflow_spend or 0.0),
            day_spend_usd=float(day_spend or 0.0),
            recent_calls=int(recent),
            now=now,
        )

    async def _write(
        self,
        intent: Intent,
        ctx: EvalContext,
        *,
        policies: PolicySet,
        spend: float | None,
        record: DecisionRecord | None,
        sources: list[PolicySource],
        request: ApprovalRequest | None,
    ) -> bool:
        """Write what a decision writes, in one round trip (see `_WRITE_DECISION`).

        Args:
            intent: the intent decided.
            ctx: the figures it was decided on.
            policies: the policy set that decided; says which figures must still hold.
            spend: the amount to commit, or None to commit nothing.
            record: the decision record to append, if any.
            sources: the texts of the record's policy version, stored with its first record.
            request: an escalation's approval request, to store as pending.

        Returns:
            False, having written nothing, if ``spend`` was to be committed and a spend figure
            the role's policies limit is no longer what the decision saw; else True.
        """
        if spend is None and record is None:
            return True
        prefix = self.deployment.key_prefix
        commit: list[str | bytes] = [b"", b"", b""]
        if spend is not None:
            governing = policies.for_agent(intent.role)
            per_workflow = any(p.spending_limit_usd is not None for p in governing)
            per_day = any(p.daily_limit_usd is not None for p in governing)
            commit = [
                repr(spend),
                repr(ctx.workflow_spend_usd) if per_workflow else b"",
                repr(ctx.day_spend_usd) if per_day else b"",
            ]
        policy_hash = policies.hash if record is None else record.policy_hash
        texts = b""
        if record is not None and policy_hash not in self._recorded_versions:
            texts = msgspec.json.encode(sources)
        written = await self._write_script(
            keys=[
                self.key("spend"),
                self.key("day-spend", _utc_day(ctx.now)),
                policy_key(prefix, policy_hash),
                decisions_key(prefix),
                self.approvals.key("pending"),
                self.approvals.key("expiry"),
            ],
            args=[
                intent.workflow,
                intent.agent,
                *commit,
                _DAY_SPEND_TTL_S,
                texts,
                b"" if record is None else self._codec.encode(record),
                b"" if request is None else request.approval_id,
                b"" if request is None else self._codec.encode(request),
                repr(request.expires_at) if request is not None and request.expires_at else b"",
            ],
        )
        if written and texts:
            self._recorded_versions.add(policy_hash)
        return bool(written)

    async def _within_limits(self, request: ApprovalRequest) -> tuple[bool, tuple[str, ...]]:
        """Decide an approved escalation again on today's figures and commit its spend.

        A human's approval lifts the escalation, not the limits: spend committed while the
        request waited may leave no room for it, and then the approval becomes a deny.
        """
        intent = Intent(
            agent=request.agent,
            role=request.role,
            tool=request.tool,
            args=request.args,
            workflow=request.workflow,
            step=request.step,
        )
        # The call was counted for the rate limit when it was first decided, and recorded.
        verdict, _ = await self._decide(
            intent,
            request.reflections,
            time.time(),
            call_id=request.intent_id,
            commit=("allow", "escalate"),
            record=False,
        )
        if verdict.outcome == "deny":
            return False, ("no longer within policy: " + "; ".join(verdict.reasons),)
        return True, ()

    async def _decide(
        self,
        intent: Intent,
        reflections: int,
        now: float,
        *,
        call_id: str,
        commit: tuple[str, ...],
        record: bool,
        trace: str = "",
    ) -> tuple[Verdict, ApprovalRequest | None]:
        """Evaluate on fresh figures and write the decision in one atomic step: for an
        outcome in ``commit`` the amount is committed, and with ``record`` the decision
        record is appended (and an escalation's approval request stored).

        If another decision committed spend since the figures were read, nothing is written
        and governance decides again on the new ones: that is what keeps a limit exact under
        concurrency, and what makes the one record written that of the attempt that stands,
        with the figures it was decided on.

        Args:
            intent: the intent to decide.
            reflections: the agent's reflection count, part of the figures.
            now: the decision time.
            call_id: the intent's id; counts the call for the rate limit and names the record.
            commit: the outcomes whose amount is committed to the spend.
            record: record the decision (the first decision on an intent).
            trace: the workflow's trace context, kept with an approval request.

        Returns:
            The verdict, and for a recorded escalation the approval request now pending, to
            announce.
        """
        amount = _amount(intent.args)
        for _ in range(_MAX_DECIDE_ATTEMPTS):
            ctx = await self._context(intent, reflections, now, call_id=call_id)
            sources, policies = self._sources, self.policies  # one version, even across a reload
            verdict = evaluate(policies, intent, ctx)
            request = (
                self._approval_request(intent, verdict, reflections, call_id, trace)
                if record and verdict.outcome == "escalate"
                else None
            )
            if await self._write(
                intent,
                ctx,
                policies=policies,
                spend=amount if verdict.outcome in commit else None,
                record=self._record(call_id, intent, ctx, verdict) if record else None,
                sources=sources,
                request=request,
            ):
                return verdict, request
        denied = Verdict(
            outcome="deny",
            reasons=(CONTENDED_REASON,),
            obligations=(),
            policy_hash=policies.hash,
        )
        contended = self._record(call_id, intent, ctx, denied)
        await self._write(
            intent,
            ctx,
            policies=policies,
            spend=None,
            record=msgspec.structs.replace(contended, contended=True) if record else None,
            sources=sources,
            request=None,
        )
        return denied, None

    def _record(
        self, intent_id: str, intent: Intent, ctx: EvalContext, verdict: Verdict
    ) -> DecisionRecord:
        """The record of ``verdict`` on ``intent``, decided on ``ctx``, for replay."""
        return DecisionRecord(
            intent_id=intent_id,
            intent=intent,
            context=ctx,
            policy_hash=verdict.policy_hash,
            outcome=verdict.outcome,
            reasons=verdict.reasons,
            decided_by=self.identity.agent_id,
        )

    def _approval_request(
        self, intent: Intent, verdict: Verdict, reflections: int, intent_id: str, trace: str
    ) -> ApprovalRequest:
        """The approval request an escalation of ``intent`` puts to its escalation target."""
        now = time.time()
        return ApprovalRequest(
            approval_id=uuid.uuid4().hex,
            workflow=intent.workflow,
            agent=intent.agent,
            tool=intent.tool,
            args=intent.args,
            intent_id=intent_id,
            intent_hash=intent_hash(intent),
            reasons=verdict.reasons,
            escalation=verdict.escalation or "human_review",
            policy_hash=verdict.policy_hash,
            requested_at=now,
            role=intent.role,
            step=intent.step,
            reflections=reflections,
            expires_at=now + verdict.approval_expiry_s if verdict.approval_expiry_s else 0.0,
            on_expiry=verdict.on_expiry,
            trace=trace,
        )

    @property
    def approvals(self) -> ApprovalStore:
        """The tenant's durable approvals; available after `start`."""
        if self._approvals is None:
            self._approvals = ApprovalStore(self.redis, self.deployment.key_prefix)
        return self._approvals

    async def _on_approval(self, d: Delivery) -> None:
        match d.body:
            case ApprovalRequest():
                return  # our own announcement, seen through the wildcard
            case ApprovalAnswer() as answer:
                await self._on_answer(d, answer)

    async def _on_answer(self, d: Delivery, answer: ApprovalAnswer) -> None:
        if d.claims.role != OPERATOR_ROLE:
            self.bus.report(
                SecurityError(
                    "not_an_operator",
                    f"{d.claims.sub!r} (role {d.claims.role!r}) answered an approval",
                ),
                subject=d.envelope.subject,
                data=d.data,
            )
            return
        record = await self._settle(
            answer.approval_id,
            Answer(
                approved=answer.approved,
                by=answer.by,
                operator=d.claims.sub,
                reason=answer.reason,
                causation=d.envelope.id,
            ),
        )
        if d.reply:
            await self.bus.respond(
                d,
                ApprovalResult(approval_id=answer.approval_id, found=False)
                if record is None
                else ApprovalResult(
                    approval_id=answer.approval_id,
                    found=True,
                    outcome=record.outcome,
                    reasons=record.reasons,
                    by=record.answer.by,
                ),
            )

    async def _settle(self, approval_id: str, answer: Answer | None) -> ApprovalRecord | None:
        """Claim, decide, publish and finish one approval; None if it was not ours to settle.

        ``answer=None`` takes over a claim abandoned by an actor that died, or settles a
        lapsed approval with its policy's default.
        """
        claimed = await self.approvals.claim(approval_id, answer)
        if claimed is None and answer is None:
            request = await self.approvals.get(approval_id)
            if request is None or not request.expires_at or request.expires_at > time.time():
                return None
            claimed = await self.approvals.claim(approval_id, expiry_answer(request))
        if claimed is None:
            return None
        request, taken = claimed
        allowed, why = (await self._within_limits(request)) if taken.approved else (False, ())
        verb = "expired" if taken.expired else "approved" if taken.approved else "rejected"
        decision = Decision(
            intent_id=request.intent_id,
            intent_hash=request.intent_hash,
            workflow=request.workflow,
            agent=request.agent,
            outcome="allow" if allowed else "deny",
            reasons=(
                *request.reasons,
                taken.reason if taken.expired else f"{verb} by {taken.by}",
                *why,
            ),
            policy_hash=request.policy_hash,
            expires_at=time.time() + self._decision_ttl_s,
            approval_id=request.approval_id,
            approved_by=taken.by if taken.approved and not taken.expired else "",
        )
        self.decided[verb] += 1
        await self.bus.publish(
            self.subjects.decision(request.workflow),
            decision,
            workflow=request.workflow,
            causation=taken.causation or request.intent_id,
            trace=request.trace,
        )
        record = ApprovalRecord(
            approval_id=request.approval_id,
            workflow=request.workflow,
            agent=request.agent,
            tool=request.tool,
            args=request.args,
            intent_hash=request.intent_hash,
            requested_at=request.requested_at,
            answer=taken,
            outcome=decision.outcome,
            reasons=decision.reasons,
            settled_at=time.time(),
        )
        await self.approvals.finish(record)
        return record

    async def _sweep_approvals(self) -> None:
        """Settle lapsed approvals with their policy's default, and take over abandoned
        claims; every governance actor sweeps, and the claim lets only one settle each."""
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                for approval_id in await self.approvals.due():
                    await self._settle(approval_id, None)
            except (RedisError, OSError) as exc:
                if being_cancelled():
                    raise
                # Redis restarting: the approvals wait there, the next sweep settles them.
                log.warning("approval sweep postponed: %s", exc)
