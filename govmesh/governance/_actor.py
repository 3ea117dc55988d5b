"""The governance actor: the policy decision point on the bus."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import ConfigError, PolicyError, SecurityError
from govmesh.governance._approvals import (
    CLAIM_GRACE_S,
    Answer,
    ApprovalRecord,
    ApprovalStore,
    expiry_answer,
    is_id_prefix,
)
from govmesh.governance._decider import (
    Decider,
    FirstDecision,
    first_decision,
    nonce_key,
)
from govmesh.governance._evaluator import Intent, Verdict, intent_hash, spend_of
from govmesh.governance._policy import PolicySet
from govmesh.governance._replay import (
    PolicySource,
    policy_set_of,
    policy_sources,
)
from govmesh.governance._starts import (
    START_RECORD_FIELD,
    checked_start,
    coordinator_only,
    start_key,
)
from govmesh.governance._terms import ToolTerms
from govmesh.governance.messages import (
    ApprovalAnswer,
    ApprovalListing,
    ApprovalQuery,
    ApprovalRequest,
    ApprovalResult,
    Decision,
    SettledApproval,
    StartRecord,
    StartRecorded,
    ToolIntent,
)
from govmesh.identity import Claims, Identity
from govmesh.reservations import INTERRUPT_TOOL, BudgetCaps, ReservationBook
from govmesh.roles import OPERATOR_ROLE
from govmesh.runtime._resp import RespConnection
from govmesh.service import Service, being_cancelled, raise_if_cancelled
from govmesh.subjects import GOVERNANCE_SERVICE
from govmesh.telemetry._metrics import record_decision
from govmesh.telemetry._tracing import current_traceparent, span

__all__ = ["GovernanceService"]

QUEUE = "governance"

log = logging.getLogger(__name__)

_FINISH_PATIENCE_S: Final = CLAIM_GRACE_S / 2
"""How long the record of a settled approval is retried through a Redis outage; within the
claim's grace period, so no other actor takes the claim over meanwhile."""
_FINISH_PAUSES_S: Final = (0.05, 0.1, 0.2, 0.5, 1.0)
"""Pauses between those attempts; the last repeats."""


def authorize_intent(claims: Claims, intent: ToolIntent, spend_args: tuple[str, ...] = ()) -> None:
    """Refuse an intent for a tool the sender's token does not name, or whose spend (the
    sum of its tool's ``spend_args``) is above the token's budget authority, before it
    reaches the policy engine (which checks the authority again against what the agent was
    allowed today)."""
    claims.require(intent.tool)
    amount = spend_of(intent.args, spend_args)
    if amount is not None and amount > claims.budget_usd:
        raise SecurityError(
            "over_budget_authority",
            f"{claims.sub!r} asked to spend {amount!r} USD with authority {claims.budget_usd!r}",
        )


def tool_terms(tools: Sequence[ToolTerms]) -> dict[str, ToolTerms]:
    """The tools' terms by name.

    Raises:
        ConfigError: two different terms name one tool.
    """
    terms: dict[str, ToolTerms] = {}
    for term in tools:
        known = terms.setdefault(term.name, term)
        if known != term:
            raise ConfigError(f"tool {term.name!r} has two different terms: {known!r} and {term!r}")
    return terms


def operators_only(claims: Claims, _query: ApprovalQuery) -> None:
    """Refuse a query for the approvals from anyone but an operator: the ``ctl`` subjects
    are open to agents and the coordinator too."""
    if claims.role != OPERATOR_ROLE:
        raise SecurityError(
            "not_an_operator", f"{claims.sub!r} (role {claims.role!r}) asked for the approvals"
        )


def _authorize_ctl(claims: Claims, body: ApprovalQuery | StartRecord) -> None:
    """Start records only from the coordinator, queries for the approvals only from
    operators."""
    match body:
        case StartRecord():
            coordinator_only(claims, body)
        case ApprovalQuery():
            operators_only(claims, body)


def _settled_approval(record: ApprovalRecord) -> SettledApproval:
    return SettledApproval(
        approval_id=record.approval_id,
        approved=record.answer.approved,
        by=record.answer.by,
        expired=record.answer.expired,
        outcome=record.outcome,
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


class GovernanceService(Service):
    """Answers every tool intent with a signed allow, deny or escalate decision.

    Several instances share intents as one NATS queue group; what they must agree on
    (committed spend per workflow and per agent and day, pending approvals, the workflows
    started and the nonces of the messages decided) lives in Redis.

    An intent is decided only for a workflow the coordinator recorded as started
    (`record_start`), and only for an agent its start record names; others are denied,
    recorded and reported as security events, as is a message whose nonce any actor of the
    group has seen before.

    Args:
        deployment: where the services are and whom to trust.
        identity: this actor's identity (role ``governance``).
        policy_paths: the policy files in force; re-read when they change.
        decision_ttl_s: how long an allow decision may be presented to the gateway.
        reload_interval_s: how often to look at the policy files for changes.
        sweep_interval_s: how often to settle lapsed approvals.
        tools: the terms each tool declares (`ToolTerms`): which arguments are spend, and
            which an approval shows. A tool without terms spends nothing and shows all of
            its arguments.

    Raises:
        ConfigError: two different terms name one tool.
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
        tools: Sequence[ToolTerms] = (),
    ) -> None:
        super().__init__(deployment, identity)
        self._terms = tool_terms(tools)
        self._paths = [Path(p) for p in policy_paths]
        self._stamp = self._file_stamp()
        self._sources, self.policies = self._load()
        self._reload_interval_s = reload_interval_s
        self._watch: asyncio.Task[None] | None = None
        self._sweep: asyncio.Task[None] | None = None
        self._sweep_interval_s = sweep_interval_s
        self._approvals: ApprovalStore | None = None
        self.reloads = 0
        self.reload_errors = 0
        self._decision_ttl_s = decision_ttl_s
        self._decider: Decider | None = None
        # Decisions go over a lean connection of their own (see `RespConnection`).
        self._decisions_redis = RespConnection(deployment.redis_url)
        self.decided: Counter[str] = Counter()

    async def on_start(self) -> None:
        """Subscribe to intents, approval answers, operators' queries and the coordinator's
        start records as a queue group."""
        await self.bus.subscribe(
            self.subjects.all("intent"),
            self._on_intent,
            accepts=ToolIntent,
            queue=QUEUE,
            authorize=self._authorize_intent,
        )
        await self.bus.subscribe(
            self.subjects.all("approval"),
            self._on_approval,
            accepts=ApprovalRequest | ApprovalAnswer,
            queue=QUEUE,
        )
        await self.bus.subscribe(
            self.subjects.ctl(GOVERNANCE_SERVICE),
            self._on_ctl,
            accepts=ApprovalQuery | StartRecord,
            queue=QUEUE,
            authorize=_authorize_ctl,
            concurrent=False,
        )
        self._decider = Decider(
            self._decisions_redis,
            prefix=self.deployment.key_prefix,
            member=self.identity.agent_id,
            policies=lambda: (self._sources, self.policies),
            key=self.key,
            approval_keys=(self.approvals.key("pending"), self.approvals.key("expiry")),
            nonce_ttl_s=self.bus.verifier.nonce_ttl_s,
            terms=self._terms,
        )
        self._watch = asyncio.create_task(self._watch_policies(), name="policy-reload")
        await self.redecide_pending()
        self._sweep = asyncio.create_task(self._sweep_approvals(), name="approval-sweep")

    def _authorize_intent(self, claims: Claims, intent: ToolIntent) -> None:
        terms = self._terms.get(intent.tool)
        authorize_intent(claims, intent, () if terms is None else terms.spend)

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
            raise_if_cancelled()
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
            # Decided on today's figures, committing and recording nothing.
            decided = await self.decider.decide(
                intent,
                request.reflections,
                time.time(),
                call_id=request.intent_id,
                commit=(),
                authority=request.budget_authority_usd,
            )
            assert not isinstance(decided, FirstDecision)  # only with a first_key
            verdict = decided.verdict
            if verdict.outcome == "escalate":
                continue
            answer = Answer(
                approved=verdict.outcome == "allow",
                by="policy",
                operator=self.identity.agent_id,
                reason=f"policy changed to {verdict.policy_hash[:12]}: "
                + "; ".join(verdict.reasons),
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
            **(
                {}
                if self._decider is None
                else {
                    "decide_round_trips": self._decider.round_trips,
                    "decide_attempts": self._decider.attempts,
                }
            ),
        }

    async def close(self) -> None:
        """Stop watching the policy files and sweeping approvals, then leave. Safe to call
        twice; an approval being settled is finished by another actor's sweep."""
        tasks = [t for t in (self._watch, self._sweep) if t is not None]
        self._watch = self._sweep = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._decider is not None:
            await self._decider.close()
        await self._decisions_redis.close()
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
        subject = self.subjects.decision(intent.agent, workflow)
        # This handler's span context. The decision carries it wherever it is signed: the
        # decider may call `seal` from the task of another intent of the same group.
        trace = current_traceparent() or d.envelope.trace

        def sealed(decision: Decision) -> bytes:
            return self.bus.codec.seal(
                self.identity,
                subject=subject,
                body=decision,
                workflow=workflow,
                causation=d.envelope.id,
                trace=trace,
            )[1]

        def seal(verdict: Verdict, request: ApprovalRequest | None) -> bytes:
            # Signed while the decision is being written: it goes out as soon as it stands.
            return sealed(self._decision(d, ihash, first_decision(d.envelope.id, verdict, request)))

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
            try:
                decided = await self.decider.decide(
                    intent,
                    body.reflections,
                    time.time(),
                    call_id=d.envelope.id,
                    commit=("allow",),
                    first_key=self.key("intent", ihash),
                    trace=d.envelope.trace,
                    seal=seal,
                    authority=d.claims.budget_usd,
                    check_start=True,
                    nonce=d.envelope.nonce,
                )
            except SecurityError as exc:  # a replay, seen by another actor of the group
                self.bus.report(exc, subject=d.envelope.subject, data=d.data)
                return
            stands = decided if isinstance(decided, FirstDecision) else decided.verdict
            deciding.set_attributes(
                {
                    "govmesh.decision.outcome": stands.outcome,
                    "govmesh.policy.hash": stands.policy_hash,
                    "govmesh.decision.repeated": isinstance(decided, FirstDecision),
                }
            )
        if isinstance(decided, FirstDecision):
            await self.bus.send(subject, sealed(await self._answer_again(decided, d, ihash)))
            return
        verdict, request, signed = decided
        await self.bus.send(subject, signed if signed is not None else seal(verdict, request))
        # The connection's writer task puts the decision on the wire once this task yields:
        # yield now, so the counting and the announcement below do not hold the agent up.
        await asyncio.sleep(0)
        self.decided[verdict.outcome] += 1
        record_decision(verdict.outcome, source="policy", started=started)
        if verdict.refused:
            self.bus.report(
                SecurityError(verdict.refused, "; ".join(verdict.reasons)),
                subject=d.envelope.subject,
                data=d.data,
            )
        if request is not None:
            # Stored with the record before either message, so an answer can never arrive for
            # an unknown request; an announcement lost to a crash here is made again when the
            # agent asks again (`_answer_again`).
            await self._announce(request, causation=d.envelope.id)

    def _decision(self, d: Delivery, ihash: str, stands: FirstDecision) -> Decision:
        """The signed answer to the intent ``d`` (whose hash is ``ihash``): the decision that
        stands on it, fresh or kept from the first time it was asked."""
        return Decision(
            intent_id=d.envelope.id,
            intent_hash=ihash,
            workflow=d.envelope.workflow,
            agent=d.claims.sub,
            outcome=stands.outcome,
            reasons=stands.reasons,
            obligations=stands.obligations,
            policy_hash=stands.policy_hash,
            expires_at=time.time() + self._decision_ttl_s,
            final=stands.outcome != "escalate",
            approval_id=stands.approval_id,
            approval_expires_at=stands.approval_expires_at,
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
        decision = self._decision(d, ihash, first)
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

    async def _within_limits(self, request: ApprovalRequest) -> tuple[bool, tuple[str, ...]]:
        """Decide an approved escalation again on today's figures and commit its spend.

        A human's approval lifts the escalation, not the limits: spend committed while the
        request waited may leave no room for it, and then the approval becomes a deny.

        Decided once per approval: a settlement taken over from an actor that died after
        this step (its decision may be out already) gets the same answer, and the spend is
        committed once, rather than its own commitment leaving it no room.
        """
        intent = _intent_of(request)
        # The call was counted for the rate limit when it was first decided, and recorded.
        decided = await self.decider.decide(
            intent,
            request.reflections,
            time.time(),
            call_id=request.intent_id,
            commit=("allow", "escalate"),
            first_key=self.key("within-limits", request.approval_id),
            record=False,
            authority=request.budget_authority_usd,
        )
        outcome, reasons = (
            (decided.outcome, decided.reasons)
            if isinstance(decided, FirstDecision)
            else (decided.verdict.outcome, decided.verdict.reasons)
        )
        if outcome == "deny":
            return False, ("no longer within policy: " + "; ".join(reasons),)
        return True, ()

    @property
    def decider(self) -> Decider:
        """Decides intents and writes the decisions; available after `start`."""
        if self._decider is None:
            raise RuntimeError(f"{self.identity.agent_id} is not started")
        return self._decider

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

    async def _on_ctl(self, d: Delivery) -> None:
        match d.body:
            case StartRecord():
                await self._on_start_record(d)
            case ApprovalQuery():
                await self._on_query(d)

    async def _on_query(self, d: Delivery) -> None:
        query: ApprovalQuery = d.body
        if not d.reply:
            return
        settled: list[ApprovalRecord] = []
        if is_id_prefix(query.settled_prefix):
            settled = await self.approvals.done_matching(query.settled_prefix)
        listing = ApprovalListing(
            pending=tuple(await self.approvals.pending()),
            settled=tuple(_settled_approval(r) for r in settled),
        )
        await self.bus.respond(d, listing)

    async def _first_sighting(self, d: Delivery) -> bool:
        """Claim the nonce of ``d`` for every actor of the group; False, and reported, when
        one of them saw it first (intents claim theirs as they are decided)."""
        claimed = await self.redis.set(
            nonce_key(self.deployment.key_prefix, d.envelope.nonce),
            b"1",
            nx=True,
            px=int(self.bus.verifier.nonce_ttl_s * 1000) + 1,
        )
        if not claimed:
            self.bus.report(
                SecurityError("replay", f"nonce {d.envelope.nonce.hex()} seen before"),
                subject=d.envelope.subject,
                data=d.data,
            )
        return bool(claimed)

    async def _on_start_record(self, d: Delivery) -> None:
        """Keep a coordinator's start record where every actor's decisions read it, then
        answer (the coordinator starts the workflow only once answered)."""
        record: StartRecord = d.body
        workflow = d.envelope.workflow
        try:
            checked_start(workflow, record)
        except ValueError as exc:
            self.bus.report(
                SecurityError("bad_start_record", str(exc)), subject=d.envelope.subject, data=d.data
            )
            return
        if not await self._first_sighting(d):
            return
        fields: dict[FieldT, EncodableT] = {START_RECORD_FIELD: d.data}
        fields.update(dict.fromkeys(record.agents, "1"))
        await self.redis.hset(start_key(self.deployment.key_prefix, workflow), mapping=fields)
        if d.reply:
            await self.bus.respond(d, StartRecorded(workflow=workflow))

    async def _on_answer(self, d: Delivery, answer: ApprovalAnswer) -> None:
        if not await self._first_sighting(d):
            return
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
            self.subjects.decision(request.agent, request.workflow),
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
        await self._finish(record)
        return record

    async def _finish(self, record: ApprovalRecord) -> None:
        """Record a settled approval as done, trying again through a Redis restart: its
        final decision is already out, so until the record lands the approval reads as
        pending, and only another actor's takeover, a grace period later, would settle it."""
        deadline = time.monotonic() + _FINISH_PATIENCE_S
        for pause in itertools.chain(_FINISH_PAUSES_S, itertools.repeat(_FINISH_PAUSES_S[-1])):
            try:
                await self.approvals.finish(record)
                return
            except (RedisError, OSError) as exc:
                if being_cancelled() or time.monotonic() + pause > deadline:
                    raise
                log.warning(
                    "recording approval %s as settled: %s; trying again in %g s",
                    record.approval_id,
                    exc,
                    pause,
                )
                await asyncio.sleep(pause)

    async def _sweep_approvals(self) -> None:
        """Settle lapsed approvals with their policy's default, and take over abandoned
        claims; every governance actor sweeps, and the claim lets only one settle each."""
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self._sweep_interval_s)
            try:
                for approval_id in await self.approvals.due():
                    await self._settle(approval_id, None)
            except (RedisError, OSError) as exc:
                if being_cancelled():
                    raise
                # Redis restarting: the approvals wait there, the next sweep settles them.
                log.warning("approval sweep postponed: %s", exc)
