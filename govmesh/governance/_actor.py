"""The governance actor: the policy decision point on the bus."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
from redis.exceptions import RedisError

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import PolicyError, SecurityError
from govmesh.governance._approvals import Answer, ApprovalRecord, ApprovalStore, expiry_answer
from govmesh.governance._evaluator import EvalContext, Intent, Verdict, evaluate, intent_hash
from govmesh.governance._policy import PolicySet
from govmesh.governance._replay import (
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
from govmesh.service import Service

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

# Compare-and-commit: the spend figures a decision was made on must still hold. Only the
# figures some policy of the role limits are compared (ARGV[7], ARGV[8]), so decisions
# that no limit ties together never make each other decide again.
_COMMIT_IF_UNCHANGED = """
local wf = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
local day = redis.call('HGET', KEYS[2], ARGV[2]) or '0'
if (ARGV[7] == '1' and tonumber(wf) ~= tonumber(ARGV[3]))
    or (ARGV[8] == '1' and tonumber(day) ~= tonumber(ARGV[4])) then
  return 0
end
redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[5])
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[2], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 1
"""


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
        self._commit_script = self.redis.register_script(_COMMIT_IF_UNCHANGED)
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

    async def _record(
        self,
        d: Delivery,
        intent: Intent,
        ctx: EvalContext,
        v: Verdict,
        sources: list[PolicySource],
    ) -> None:
        prefix = self.deployment.key_prefix
        if v.policy_hash not in self._recorded_versions:
            await self.redis.set(
                policy_key(prefix, v.policy_hash), msgspec.json.encode(sources), nx=True
            )
            self._recorded_versions.add(v.policy_hash)
        record = DecisionRecord(
            intent_id=d.envelope.id,
            intent=intent,
            context=ctx,
            policy_hash=v.policy_hash,
            outcome=v.outcome,
            reasons=v.reasons,
            decided_by=self.identity.agent_id,
        )
        await self.redis.xadd(decisions_key(prefix), {"record": self._codec.encode(record)})

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
        now = time.time()
        verdict, ctx, sources = await self._decide(
            intent, body.reflections, now, call_id=d.envelope.id, commit=("allow",)
        )
        await self._record(d, intent, ctx, verdict, sources)
        self.decided[verdict.outcome] += 1
        request = None
        if verdict.outcome == "escalate":
            request = await self._escalate(d, intent, ihash, verdict, body.reflections)
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
            approval_id=request.approval_id if request else "",
            approval_expires_at=request.expires_at if request else 0.0,
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
        """The figures the policy needs, read in one round trip: committed spend of the
        workflow and of the agent's current UTC day, and the agent's calls in the rate
        window (this call is counted for the next ones, not for itself)."""
        window = self.policies.rate_window_s(intent.role)
        calls_key = self.key("calls", intent.agent)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(self.key("spend"), intent.workflow)
            pipe.hget(self.key("day-spend", _utc_day(now)), intent.agent)
            if window is not None:
                pipe.zremrangebyscore(calls_key, "-inf", now - window)
                pipe.zscore(calls_key, call_id)
                pipe.zcard(calls_key)
                pipe.zadd(calls_key, {call_id: now})
                pipe.expire(calls_key, int(window) + 1)
            results = await pipe.execute()
        recent = 0
        if window is not None:
            # On a second read for the same call its own entry is already there.
            recent = int(results[4]) - (0 if results[3] is None else 1)
        return EvalContext(
            reflections=reflections,
            workflow_spend_usd=float(results[0] or 0.0),
            day_spend_usd=float(results[1] or 0.0),
            recent_calls=recent,
            now=now,
        )

    async def _commit_if_unchanged(
        self, intent: Intent, ctx: EvalContext, amount: float, policies: PolicySet
    ) -> bool:
        """Commit ``amount`` to the workflow's and the day's spend only if the figures the
        role's policies limit are still what the decision saw; atomic in Redis, so
        concurrent decisions cannot pass a limit together."""
        governing = policies.for_agent(intent.role)
        per_workflow = any(p.spending_limit_usd is not None for p in governing)
        per_day = any(p.daily_limit_usd is not None for p in governing)
        committed = await self._commit_script(
            keys=[self.key("spend"), self.key("day-spend", _utc_day(ctx.now))],
            args=[
                intent.workflow,
                intent.agent,
                repr(ctx.workflow_spend_usd),
                repr(ctx.day_spend_usd),
                repr(amount),
                2 * 86_400,
                "1" if per_workflow else "0",
                "1" if per_day else "0",
            ],
        )
        return bool(committed)

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
        # The call was counted for the rate limit when it was first decided.
        verdict, _, _ = await self._decide(
            intent,
            request.reflections,
            time.time(),
            call_id=request.intent_id,
            commit=("allow", "escalate"),
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
    ) -> tuple[Verdict, EvalContext, list[PolicySource]]:
        """Evaluate on fresh figures and, for an outcome in ``commit``, commit the amount.

        If another decision committed spend since the figures were read, decide again on
        the new ones: that is what keeps a limit exact under concurrency.
        """
        amount = _amount(intent.args)
        for _ in range(_MAX_DECIDE_ATTEMPTS):
            ctx = await self._context(intent, reflections, now, call_id=call_id)
            sources, policies = self._sources, self.policies  # one version, even across a reload
            verdict = evaluate(policies, intent, ctx)
            if verdict.outcome not in commit or amount is None:
                return verdict, ctx, sources
            if await self._commit_if_unchanged(intent, ctx, amount, policies):
                return verdict, ctx, sources
        denied = Verdict(
            outcome="deny",
            reasons=(f"spend changed under {_MAX_DECIDE_ATTEMPTS} decisions in a row",),
            obligations=(),
            policy_hash=policies.hash,
        )
        return denied, ctx, sources

    async def _escalate(
        self, d: Delivery, intent: Intent, ihash: str, verdict: Verdict, reflections: int
    ) -> ApprovalRequest:
        now = time.time()
        request = ApprovalRequest(
            approval_id=uuid.uuid4().hex,
            workflow=intent.workflow,
            agent=intent.agent,
            tool=intent.tool,
            args=intent.args,
            intent_id=d.envelope.id,
            intent_hash=ihash,
            reasons=verdict.reasons,
            escalation=verdict.escalation or "human_review",
            policy_hash=verdict.policy_hash,
            requested_at=now,
            role=intent.role,
            step=intent.step,
            reflections=reflections,
            expires_at=now + verdict.approval_expiry_s if verdict.approval_expiry_s else 0.0,
            on_expiry=verdict.on_expiry,
            trace=d.envelope.trace,
        )
        await self.approvals.add(request)
        await self.bus.publish(
            self.subjects.approval(intent.workflow),
            request,
            workflow=intent.workflow,
            causation=d.envelope.id,
            trace=d.envelope.trace,
        )
        return request

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
                # Redis restarting: the approvals wait there, the next sweep settles them.
                log.warning("approval sweep postponed: %s", exc)
