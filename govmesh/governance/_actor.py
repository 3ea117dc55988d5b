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
from govmesh.forecasting._reservations import INTERRUPT_TOOL, BudgetCaps, ReservationBook
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
    Outcome,
    ToolIntent,
)
from govmesh.identity import Claims, Identity
from govmesh.observability._metrics import record_decision
from govmesh.observability._tracing import span
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
#
# An intent governance has decided before (KEYS[4] holds its `FirstDecision`) is not decided
# again: the script returns just that first decision, counting nothing.
_READ_FIGURES: Final = """
local first = redis.call('GET', KEYS[4])
if first then return {first} end
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
# (with its expiry, ARGV[11], in the sweep's sorted set; see `ApprovalStore`), and the
# intent's `FirstDecision` (ARGV[12], kept ARGV[13] seconds, or for good with '').
# With a first decision to keep, an intent some other actor decided in the meantime (a
# retried intent racing its original) writes nothing: the script returns that actor's first
# decision, so the spend of one intent is committed once.
_WRITE_DECISION: Final = """
if ARGV[12] ~= '' then
  local first = redis.call('GET', KEYS[7])
  if first then return first end
end
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
if ARGV[12] ~= '' then
  if ARGV[13] ~= '' then
    redis.call('SET', KEYS[7], ARGV[12], 'EX', ARGV[13])
  else
    redis.call('SET', KEYS[7], ARGV[12])
  end
end
return 1
"""

# How long governance remembers its first decision on an intent: longer than the longest
# workflow waits (7 days) between a step and its retry. One escalated with an approval that
# never lapses is remembered for as long as the approval stays pending, and beyond.
_FIRST_DECISION_TTL_S: Final = 8 * 86_400


class FirstDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Governance's first decision on an intent (workflow, step, intent hash), kept so that
    the same intent asked again (an agent resuming after a crash, or retrying after a lost
    reply) gets the same answer, and its spend is never committed twice.

    Attributes:
        intent_id: the intent message that was decided.
        approval_id: an escalation's approval; its settlement is the decision that stands.
    """

    intent_id: str
    outcome: Outcome
    reasons: tuple[str, ...]
    obligations: tuple[str, ...]
    policy_hash: str
    approval_id: str = ""
    approval_expires_at: float = 0.0


# A day's spend expires a day after its UTC day ends, when no decision can read it any more.
_DAY_SPEND_TTL_S: Final = 2 * 86_400


def _first(call_id: str, verdict: Verdict, request: ApprovalRequest | None) -> FirstDecision:
    return FirstDecision(
        intent_id=call_id,
        outcome=verdict.outcome,
        reasons=verdict.reasons,
        obligations=verdict.obligations,
        policy_hash=verdict.policy_hash,
        approval_id="" if request is None else request.approval_id,
        approval_expires_at=0.0 if request is None else request.expires_at,
    )


def _intent_of(request: ApprovalRequest) -> Intent:
    """The intent an approval request was escalated on, to decide it again."""
    return Intent(
        agent=request.agent,
        role=request.role,
        tool=request.tool,
        args=request.args,
        workflow=request.workflow,
        step=request.step,
    )


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
        self._first_decision = msgspec.msgpack.Decoder(FirstDecision)
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
        await self.redecide_pending()
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
            if self.reload_if_changed():
                try:
                    await self.redecide_pending()
                except (RedisError, OSError) as exc:
                    if being_cancelled():
                        raise
                    log.warning("pending approvals not re-decided yet: %s", exc)

    async def redecide_pending(self) -> int:
        """Decide again, under the policy set in force, every pending approval that was
        escalated under another one; returns how many that settled.

        A workflow may sleep for days on an approval while its policy changes. What the new
        policy allows or denies outright no longer waits for a person: it is settled as
        approved or rejected ``by policy`` (an approval still goes through `_within_limits`),
        and the sleeping workflow gets that final decision. What the new policy escalates
        too stays pending. Decisions already final stand: an allow's spend is committed.
        """
        settled = 0
        policies = self.policies
        for request in await self.approvals.pending():
            if request.policy_hash == policies.hash or request.tool == INTERRUPT_TOOL:
                continue
            intent = _intent_of(request)
            figures = await self._context(
                intent, request.reflections, time.time(), call_id=request.intent_id, first_key=""
            )
            assert isinstance(figures, EvalContext)  # no first decision without a first_key
            verdict = evaluate(policies, intent, figures)
            if verdict.outcome == "escalate":
                continue
            answer = Answer(
                approved=verdict.outcome == "allow",
                by="policy",
                operator=self.identity.agent_id,
                reason=f"policy changed to {policies.hash[:12]}: " + "; ".join(verdict.reasons),
            )
            if await self._settle(request.approval_id, answer) is not None:
                settled += 1
        return settled

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
        started = time.perf_counter()
        with span(
            "govmesh.decide",
            attributes={
                "govmesh.workflow": workflow,
                "govmesh.agent": intent.agent,
                "gen_ai.tool.name": intent.tool,
                "govmesh.intent.hash": ihash,
            },
        ) as deciding:
            decided = await self._decide(
                intent,
                body.reflections,
                time.time(),
                call_id=d.envelope.id,
                commit=("allow",),
                first_key=self.key("intent", ihash),
                trace=d.envelope.trace,
            )
            stands = decided if isinstance(decided, FirstDecision) else decided[0]
            deciding.set_attributes(
                {
                    "govmesh.decision.outcome": stands.outcome,
                    "govmesh.policy.hash": stands.policy_hash,
                    "govmesh.decision.repeated": isinstance(decided, FirstDecision),
                }
            )
        if isinstance(decided, FirstDecision):
            decision = await self._answer_again(decided, d, ihash)
        else:
            verdict, request = decided
            self.decided[verdict.outcome] += 1
            record_decision(verdict.outcome, source="policy", started=started)
            if request is not None:
                # Stored with the record, before it is announced, so an answer can never
                # arrive for an unknown request.
                await self._announce(request, causation=d.envelope.id)
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

    async def _announce(self, request: ApprovalRequest, *, causation: str) -> None:
        await self.bus.publish(
            self.subjects.approval(request.workflow),
            request,
            workflow=request.workflow,
            causation=causation,
            trace=request.trace,
        )

    async def _answer_again(self, first: FirstDecision, d: Delivery, ihash: str) -> Decision:
        """The decision that stands on an intent decided before, signed afresh for the
        intent asked now: nothing is committed or recorded again.

        An escalation answers with its approval's settlement once it is settled; while it is
        pending, with the escalation again, and the approval request is announced again (the
        first announcement may be what was lost).
        """
        self.decided["repeated"] += 1
        decision = Decision(
            intent_id=d.envelope.id,
            intent_hash=ihash,
            workflow=d.envelope.workflow,
            agent=d.claims.sub,
            outcome=first.outcome,
            reasons=first.reasons,
            obligations=first.obligations,
            policy_hash=first.policy_hash,
            expires_at=time.time() + self._decision_ttl_s,
            final=first.outcome != "escalate",
            approval_id=first.approval_id,
            approval_expires_at=first.approval_expires_at,
        )
        if not first.approval_id:
            return decision
        settled = await self.approvals.done(first.approval_id)
        if settled is not None:
            answer = settled.answer
            return msgspec.structs.replace(
                decision,
                outcome=settled.outcome,
                reasons=settled.reasons,
                final=True,
                approved_by=answer.by if answer.approved and not answer.expired else "",
            )
        pending = await self.approvals.get(first.approval_id)
        if pending is not None:
            await self._announce(pending, causation=d.envelope.id)
        return decision

    async def _context(
        self, intent: Intent, reflections: int, now: float, *, call_id: str, first_key: str
    ) -> EvalContext | FirstDecision:
        """The figures the policy needs, read in one round trip (see `_READ_FIGURES`); or,
        for an intent decided before (under ``first_key``), that first decision."""
        window = self.policies.rate_window_s(intent.role)
        figures = await self._read_script(
            keys=[
                self.key("spend"),
                self.key("day-spend", _utc_day(now)),
                self.key("calls", intent.agent),
                first_key or self.key("intent", ""),
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
        if len(figures) == 1:
            return self._first_decision.decode(figures[0])
        workflow_spend, day_spend, recent = figures
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
        first: FirstDecision | None = None,
        first_key: str = "",
    ) -> bool | FirstDecision:
        """Write what a decision writes, in one round trip (see `_WRITE_DECISION`).

        Args:
            intent: the intent decided.
            ctx: the figures it was decided on.
            policies: the policy set that decided; says which figures must still hold.
            spend: the amount to commit, or None to commit nothing.
            record: the decision record to append, if any.
            sources: the texts of the record's policy version, stored with its first record.
            request: an escalation's approval request, to store as pending.
            first: the intent's first decision, to keep under ``first_key``.

        Returns:
            False, having written nothing, if ``spend`` was to be committed and a spend figure
            the role's policies limit is no longer what the decision saw; the first decision,
            having written nothing, if another actor decided the intent meanwhile; else True.
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
        kept, ttl = b"", b""
        if first is not None:
            kept = self._codec.encode(first)
            if first.approval_id and not first.approval_expires_at:
                ttl = b""  # kept while its approval may be answered, however late
            else:
                ttl = repr(
                    int(max(0.0, first.approval_expires_at - ctx.now)) + _FIRST_DECISION_TTL_S
                ).encode()
        written = await self._write_script(
            keys=[
                self.key("spend"),
                self.key("day-spend", _utc_day(ctx.now)),
                policy_key(prefix, policy_hash),
                decisions_key(prefix),
                self.approvals.key("pending"),
                self.approvals.key("expiry"),
                first_key or self.key("intent", ""),
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
                kept,
                ttl,
            ],
        )
        if isinstance(written, bytes):
            return self._first_decision.decode(written)
        if written and texts:
            self._recorded_versions.add(policy_hash)
        return bool(written)

    async def _within_limits(self, request: ApprovalRequest) -> tuple[bool, tuple[str, ...]]:
        """Decide an approved escalation again on today's figures and commit its spend.

        A human's approval lifts the escalation, not the limits: spend committed while the
        request waited may leave no room for it, and then the approval becomes a deny.
        """
        intent = _intent_of(request)
        # The call was counted for the rate limit when it was first decided, and recorded.
        decided = await self._decide(
            intent,
            request.reflections,
            time.time(),
            call_id=request.intent_id,
            commit=("allow", "escalate"),
        )
        assert not isinstance(decided, FirstDecision)  # only with a first_key
        verdict, _ = decided
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
        first_key: str = "",
        trace: str = "",
    ) -> tuple[Verdict, ApprovalRequest | None] | FirstDecision:
        """Evaluate on fresh figures and write the decision in one atomic step: for an
        outcome in ``commit`` the amount is committed, and with ``first_key`` the decision
        is recorded and kept there as the intent's first decision (and an escalation's
        approval request stored).

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
            first_key: record the decision, as the intent's first decision, under this key;
                empty to decide again without recording (an approved escalation).
            trace: the workflow's trace context, kept with an approval request.

        Returns:
            The verdict, and for a recorded escalation the approval request now pending, to
            announce; or, for an intent decided before, its first decision, and nothing was
            committed or recorded.
        """
        amount = _amount(intent.args)
        record = bool(first_key)
        for _ in range(_MAX_DECIDE_ATTEMPTS):
            figures = await self._context(
                intent, reflections, now, call_id=call_id, first_key=first_key
            )
            if isinstance(figures, FirstDecision):
                return figures
            ctx = figures
            sources, policies = self._sources, self.policies  # one version, even across a reload
            verdict = evaluate(policies, intent, ctx)
            request = (
                self._approval_request(intent, verdict, reflections, call_id, trace)
                if record and verdict.outcome == "escalate"
                else None
            )
            written = await self._write(
                intent,
                ctx,
                policies=policies,
                spend=amount if verdict.outcome in commit else None,
                record=self._record(call_id, intent, ctx, verdict) if record else None,
                sources=sources,
                request=request,
                first=_first(call_id, verdict, request) if record else None,
                first_key=first_key,
            )
            if isinstance(written, FirstDecision):
                return written
            if written:
                return verdict, request
        denied = Verdict(
            outcome="deny",
            reasons=(CONTENDED_REASON,),
            obligations=(),
            policy_hash=policies.hash,
        )
        contended = self._record(call_id, intent, ctx, denied)
        written = await self._write(
            intent,
            ctx,
            policies=policies,
            spend=None,
            record=msgspec.structs.replace(contended, contended=True) if record else None,
            sources=sources,
            request=None,
            first=_first(call_id, denied, None) if record else None,
            first_key=first_key,
        )
        if isinstance(written, FirstDecision):
            return written
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
            obligations=verdict.obligations,
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
                proof=d.data,
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
        why: tuple[str, ...] = ()
        if request.tool == INTERRUPT_TOOL:
            # A budget interrupt: approving it lets the workflow spend on, up to its cap.
            allowed = taken.approved
            if allowed:
                await ReservationBook(self.redis, self.deployment.key_prefix, BudgetCaps()).release(
                    request.workflow
                )
        elif taken.approved:
            allowed, why = await self._within_limits(request)
        else:
            allowed = False
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
                *((taken.reason,) if taken.by == "policy" and not taken.expired else ()),
                *why,
            ),
            policy_hash=request.policy_hash,
            expires_at=time.time() + self._decision_ttl_s,
            approval_id=request.approval_id,
            approved_by=taken.by if taken.approved and not taken.expired else "",
        )
        self.decided[verb] += 1
        record_decision(decision.outcome, source="approval")
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
