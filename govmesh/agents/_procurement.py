"""The procurement agent: plans a purchase, asks governance, and places the order through
the gateway.

Every step is safe to take again, and that is how a workflow survives a crash anywhere in
it, or a message lost while nats-server restarts:

- a request is recorded in the agent's in-flight hash before any work, and the outcome is
  kept (`AgentService.settle`) before it is sent, so a request asked again is answered from
  what was kept, or resumed from the workflow's latest snapshot;
- governance answers an intent asked again with its first decision (or the settlement of
  its approval), committing no spend twice;
- the gateway's ledger runs a tool once per (workflow, step, intent hash), and answers a
  retried call with the recorded result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, Unpack

import msgspec

from govmesh.agents._base import TRANSIENT, AgentService, RetryPolicy, Thinking
from govmesh.agents.messages import InFlight, PurchaseOutcome, PurchaseRequest
from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.forecasting import BudgetError
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.identity import Identity
from govmesh.llm import ModelProvider
from govmesh.service import being_cancelled
from govmesh.state.messages import SnapshotQuery, SnapshotReply, TimerFired, TimerSet
from govmesh.telemetry._tracing import span
from govmesh.tools import STEP_IN_PROGRESS, ToolCall, ToolResult

__all__ = ["ProcurementAgent"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
ERP_CREATE_PO = "erp.create_purchase_order"
"""The example's ERP tool (``procurement.tools``), which this agent calls by name."""

_SETTLE_GRACE_S = 60.0
"""Beyond an approval's expiry: governance's sweep, or another actor's takeover, settles it."""

_FRESH_S = 5.0
"""A decision closer than this to its expiry is asked for again before a tool call."""

_TIMER_GRACE_S = 5.0
"""Real seconds past a timer's due time after which the agent stops waiting for it to fire:
it fired while this agent was away (its message was lost with the old process)."""

VENDOR_REPLY = "vendor-reply"


class ProcurementAgent(AgentService):
    """Turns purchase requests into governed purchase orders.

    Args:
        retry_s: how long to wait for an answer (governance's decision, the gateway's
            result) before asking again.
        recheck_s: while an approval is pending, how often to ask governance again, in case
            its final decision was lost.
        give_up_s: how long a workflow may take to get a decision and run its tool before it
            is reported failed; the wait for a person's answer is not counted.
        approval_timeout_s: how long to wait for a human's answer to an escalation whose
            approval never lapses; one that lapses is waited for until it does.
        vendor_wait_s: how long each workflow waits for the vendor's quote before it asks
            governance, on the deployment's clock (a durable timer kept by the state actor);
            0 for no wait.
        max_reflections: the agent's own stop for a model that keeps failing.
        tool_retry: how a tool call that failed with ``ToolError(retryable=True)`` is
            retried (by default, `RetryPolicy`'s defaults); every retry is a governed call,
            under the same decision while it is valid, and the gateway's ledger still runs
            the step to effect once.
        thinking: max_tokens, prices, budget, keep_thoughts (see `AgentService`).
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        model: ModelProvider,
        retry_s: float = 5.0,
        recheck_s: float = 10.0,
        give_up_s: float = 600.0,
        approval_timeout_s: float = 300.0,
        vendor_wait_s: float = 0.0,
        max_reflections: int = 40,
        tool_retry: RetryPolicy | None = None,
        **thinking: Unpack[Thinking],
    ) -> None:
        super().__init__(deployment, identity, model=model, **thinking)
        self._retry_s = retry_s
        self._recheck_s = recheck_s
        self._give_up_s = give_up_s
        self._approval_timeout_s = approval_timeout_s
        self._vendor_wait_s = vendor_wait_s
        self._timers: dict[tuple[str, str], asyncio.Future[TimerFired]] = {}
        self.timers = {"fired": 0, "missed": 0}
        self._max_reflections = max_reflections
        self._tool_retry = tool_retry or RetryPolicy()
        self._decisions: defaultdict[str, asyncio.Queue[Delivery]] = defaultdict(asyncio.Queue)
        self._active: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.resumed: Counter[str] = Counter()
        self.answered_again = 0

    async def on_start(self) -> None:
        """Subscribe to purchase requests and to decisions, then take up the workflows a
        previous process of this agent left unfinished."""
        await self.bus.subscribe(
            self.subjects.msg(self.agent_id),
            self._on_message,
            accepts=PurchaseRequest | TimerFired,
        )
        await self.watch_decisions()
        self._spawn(self._resume_in_flight())

    def stats(self) -> dict[str, Any]:
        """Counters, plus workflows resumed by the phase they were in, and requests answered
        again from a kept outcome."""
        return {
            **super().stats(),
            "resumed": dict(self.resumed),
            "answered_again": self.answered_again,
            "timers": dict(self.timers),
        }

    async def _on_message(self, d: Delivery) -> None:
        match d.body:
            case PurchaseRequest():
                await self._on_request(d)
            case TimerFired() as fired:
                # At least once: only the first firing of a wait counts.
                waiting = self._timers.get((d.envelope.workflow, fired.name))
                if waiting is not None and not waiting.done():
                    waiting.set_result(fired)

    async def on_decision(self, d: Delivery) -> None:
        """Hand a decision on one of this agent's workflows to the step waiting for it."""
        decision: Decision = d.body
        if decision.agent == self.agent_id and decision.workflow in self._decisions:
            self._decisions[decision.workflow].put_nowait(d)

    async def _on_request(self, d: Delivery) -> None:
        workflow = d.envelope.workflow
        if workflow in self._active:
            return  # asked again while this process works on it
        self._active.add(workflow)
        job = InFlight(
            request=d.body,
            requester=d.envelope.sender,
            causation=d.envelope.id,
            trace=d.envelope.trace,
        )
        try:
            kept = await self.outcome_of(workflow)
            if kept is not None:
                self.answered_again += 1
                await self._send(workflow, job, msgspec.msgpack.decode(kept, type=PurchaseOutcome))
                self._active.discard(workflow)
                return
            # Recorded before any work, removed only once the outcome is kept: a workflow
            # this process dies in the middle of is found again by the next one.
            new = await self.redis.hsetnx(self.in_flight_key, workflow, msgspec.msgpack.encode(job))
        except BaseException:
            self._active.discard(workflow)
            raise
        # The workflow outlives this handler (it waits for timers that arrive on this same
        # subscription, and for people), so it runs in a task of its own and the bounded
        # subscription's slot is free for the next message.
        self._spawn(self._serve(workflow, job, resume=not new))

    async def _resume_in_flight(self) -> None:
        """Take up every workflow in this agent's in-flight hash, each from its latest
        snapshot (see `_purchase`)."""
        raw: dict[bytes, bytes] = await self._again(
            lambda: self.redis.hgetall(self.in_flight_key),  # type: ignore[arg-type,return-value]
            until=time.monotonic() + self._give_up_s,
        )
        decoder = msgspec.msgpack.Decoder(InFlight)
        for key, value in raw.items():
            workflow = key.decode()
            if workflow in self._active:
                continue
            self._active.add(workflow)
            self._spawn(self._serve(workflow, decoder.decode(value), resume=True))

    async def _serve(self, workflow: str, job: InFlight, *, resume: bool) -> None:
        """Work on one workflow, from its latest snapshot with ``resume``, and answer."""
        self._decisions[workflow]
        try:
            goal: dict[str, Any] | None = None
            if resume:
                latest = await self._latest_snapshot(workflow)
                if latest.snapshot is not None:
                    # Versions go on from the last one stored, so "latest" stays the newest.
                    self._versions[workflow] = latest.snapshot.version
                    goal = latest.snapshot.goal
                self.resumed[str(goal.get("phase") if goal else None)] += 1
            until = time.monotonic() + self._give_up_s
            while True:
                try:
                    with span(
                        f"invoke_agent {self.agent_id}",
                        traceparent=job.trace if resume else "",
                        attributes={
                            "gen_ai.operation.name": "invoke_agent",
                            "gen_ai.agent.name": self.agent_id,
                            "govmesh.workflow": workflow,
                            "govmesh.resumed_from": (goal or {}).get("phase") if resume else None,
                        },
                    ):
                        outcome = await self._purchase(
                            workflow, job.request, trace=job.trace, resume=goal
                        )
                    break
                except (TimeoutError, *TRANSIENT) as exc:
                    if being_cancelled():
                        raise
                    if isinstance(exc, TimeoutError) or time.monotonic() >= until:
                        outcome = PurchaseOutcome(
                            result="failed", reasons=(f"{type(exc).__name__}: {exc}",)
                        )
                        break
                    # A server restarting under the step: take it up again from the latest
                    # snapshot; what was done already is answered from what was recorded.
                    log.info("%s interrupted (%s); resuming from its snapshot", workflow, exc)
                    await asyncio.sleep(0.5)
                    latest = await self._latest_snapshot(workflow)
                    goal = latest.snapshot.goal if latest.snapshot is not None else None
            await self._again(
                lambda: self.settle(workflow, msgspec.msgpack.encode(outcome)),
                until=time.monotonic() + self._give_up_s,
            )
            await self._send(workflow, job, outcome)
        finally:
            self._active.discard(workflow)
            self._decisions.pop(workflow, None)
            self.forget(workflow)

    async def _send(self, workflow: str, job: InFlight, outcome: PurchaseOutcome) -> None:
        try:
            await self.bus.publish(
                self.subjects.msg(job.requester),
                outcome,
                workflow=workflow,
                causation=job.causation,
                trace=job.trace,
            )
        except TRANSIENT as exc:
            # Kept already: the requester asks again and is answered from what was kept.
            log.warning("outcome of %s not sent (%s); kept for the next request", workflow, exc)

    async def _latest_snapshot(self, workflow: str) -> SnapshotReply:
        """The state actor's latest snapshot of `workflow`, asking until it answers (it may
        be restarting too)."""
        reply = await self._again(
            lambda: self.bus.request(
                self.subjects.ctl("state"),
                SnapshotQuery(workflow=workflow, agent=self.agent_id),
                accepts=SnapshotReply,
                timeout=self._retry_s,
            ),
            until=time.monotonic() + self._give_up_s,
        )
        answer: SnapshotReply = reply.body
        return answer

    async def _again(self, attempt: Callable[[], Awaitable[_T]], *, until: float) -> _T:
        """``attempt()``, tried again after transient failures until ``until`` (monotonic)."""
        while True:
            try:
                return await attempt()
            except TRANSIENT as exc:
                if being_cancelled() or time.monotonic() >= until:
                    raise
                log.info("%s: %s; trying again", self.agent_id, exc)
                await asyncio.sleep(0.5)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a workflow of %s failed", self.agent_id, exc_info=exc)

    async def close(self) -> None:
        """Stop resumed workflows (they stay in flight for the next start), then leave."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await super().close()

    async def _wait_timer(self, workflow: str, name: str, due_at: float) -> None:
        """Set the durable timer ``name`` for ``due_at`` (deployment clock) and wait until
        it fires. Setting it again (a resumed workflow) moves nothing, and a timer that
        fired while this agent was away is noticed from its due time."""
        clock = self.deployment.clock
        key = (workflow, name)
        fired = self._timers[key] = asyncio.get_running_loop().create_future()
        try:
            await self.bus.publish(
                self.subjects.state(self.agent_id),
                TimerSet(name=name, due_at=due_at),
                workflow=workflow,
            )
            while True:
                wait = clock.real_seconds(max(0.0, due_at - clock.now())) + _TIMER_GRACE_S
                try:
                    await asyncio.wait_for(asyncio.shield(fired), wait)
                    self.timers["fired"] += 1
                    return
                except TimeoutError:
                    if clock.now() >= due_at:
                        log.warning("%s: timer %r fired unseen; going on", workflow, name)
                        self.timers["missed"] += 1
                        return
        finally:
            self._timers.pop(key, None)

    def _approval_wait_s(self, escalated: Decision) -> float:
        """Wait for a human until the approval lapses (then governance settles it with the
        policy's default, a sweep later), or `approval_timeout_s` for one that never does."""
        if not escalated.approval_expires_at:
            return self._approval_timeout_s
        return max(0.0, escalated.approval_expires_at - time.time()) + _SETTLE_GRACE_S

    async def _ask(
        self,
        workflow: str,
        intent: ToolIntent,
        sent: set[str],
        *,
        trace: str,
        final: bool,
        wait_s: float,
        every_s: float,
        approval_id: str = "",
        ask_first: bool = True,
    ) -> Delivery:
        """Send ``intent`` and wait for governance's answer, sending it again every
        ``every_s`` until one comes, for at most ``wait_s``.

        An answer to any intent in ``sent`` (the ids of every time it was sent) will do, and
        for a pending approval its settlement (``approval_id``): governance answers the same
        intent asked again with its first decision, or the approval's settlement.

        Raises:
            TimeoutError: no answer within ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        while True:
            if ask_first:
                try:
                    envelope = await self.bus.publish(
                        self.subjects.intent(self.agent_id), intent, workflow=workflow, trace=trace
                    )
                    sent.add(envelope.id)
                except TRANSIENT as exc:
                    if being_cancelled():
                        raise
                    log.info("intent of %s not sent (%s); sending again", workflow, exc)
            ask_first = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no decision on {workflow} step {intent.step} in {wait_s}s")
            try:
                return await self._next_decision(
                    workflow,
                    sent,
                    approval_id,
                    final=final,
                    timeout=min(every_s, remaining),
                )
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise

    async def _next_decision(
        self, workflow: str, sent: set[str], approval_id: str, *, final: bool, timeout: float
    ) -> Delivery:
        queue = self._decisions[workflow]
        async with asyncio.timeout(timeout):
            while True:
                d = await queue.get()
                decision: Decision = d.body
                ours = decision.intent_id in sent or (
                    approval_id and decision.approval_id == approval_id
                )
                if ours and (decision.final or not final):
                    return d

    async def _run_tool(
        self,
        workflow: str,
        intent: ToolIntent,
        decided: Delivery,
        sent: set[str],
        *,
        trace: str,
        until: float,
    ) -> ToolResult:
        """Call the tool through the gateway with ``decided`` (an allow), trying again
        until it answers, and after a retryable failure as `tool_retry` says; a decision
        about to expire is asked for again first."""
        expired = False
        attempts = 1
        while True:
            decision: Decision = decided.body
            if expired or decision.expires_at - time.time() < _FRESH_S:
                expired = False
                decided = await self._ask(
                    workflow,
                    intent,
                    sent,
                    trace=trace,
                    final=True,
                    wait_s=max(0.0, until - time.monotonic()),
                    every_s=self._retry_s,
                )
                continue
            try:
                reply = await self.bus.request(
                    self.subjects.tool(intent.tool),
                    ToolCall(
                        tool=intent.tool, args=intent.args, step=intent.step, decision=decided.data
                    ),
                    accepts=ToolResult,
                    workflow=workflow,
                    causation=decided.envelope.id,
                    trace=trace,
                    timeout=self._retry_s * 2,
                )
            except TRANSIENT as exc:
                if being_cancelled() or time.monotonic() >= until:
                    raise
                log.info("tool call of %s not answered (%s); calling again", workflow, exc)
                await asyncio.sleep(0.5)
                continue
            result: ToolResult = reply.body
            if not result.ok and result.error == STEP_IN_PROGRESS and time.monotonic() < until:
                await asyncio.sleep(0.5)  # another call of this step is running; ask again
                continue
            if not result.ok and "decision_expired" in result.error:
                expired = True
                continue
            retry = self._tool_retry
            if result.retryable and attempts < retry.maximum_attempts:
                log.info("%s of %s failed (%s); retrying", intent.tool, workflow, result.error)
                await asyncio.sleep(retry.delay(attempts))
                attempts += 1
                continue
            return result

    async def _purchase(
        self,
        workflow: str,
        req: PurchaseRequest,
        *,
        trace: str,
        resume: dict[str, Any] | None = None,
    ) -> PurchaseOutcome:
        """Plan, ask governance, wait for an approval if escalated, place the order.

        ``resume`` is the goal state of the workflow's latest snapshot: past planning, the
        plan's reflection count is taken from it instead of planning again; the rest is
        asked again, and governance and the gateway answer with what they decided and did.
        """
        until = time.monotonic() + self._give_up_s
        goal = {"item": req.item, "vendor": req.vendor, "amount_usd": req.amount_usd}
        if resume is not None and resume.get("phase") not in (None, "planning"):
            reflections = int(resume.get("reflections", 0))
        else:
            await self.snapshot(workflow, {**goal, "phase": "planning"})
            try:
                _, reflections = await self.think_until_usable(
                    workflow,
                    f"Plan a purchase of {req.item} from {req.vendor} for ${req.amount_usd:,.2f}.",
                    key=f"{self.agent_id}:plan",
                    max_reflections=self._max_reflections,
                    trace=trace,
                )
            except BudgetError as exc:
                # Halted with its state saved: the snapshot says where and why.
                await self.snapshot(
                    workflow, {**goal, "phase": "halted", "reason": str(exc), "calls": exc.calls}
                )
                return PurchaseOutcome(
                    result="halted",
                    reasons=(str(exc),),
                    reflections=exc.calls,
                    model_calls=exc.calls,
                )
        goal["reflections"] = reflections
        authority = self.bus.tokens.verify(self.identity.token).budget_usd
        if req.amount_usd > authority:
            # Governance would drop the intent as a security event; a well-behaved agent
            # never asks beyond the authority its own token states.
            return PurchaseOutcome(
                result="denied",
                reasons=(f"amount {req.amount_usd} is over this agent's authority {authority}",),
                reflections=reflections,
                model_calls=reflections + 1,
            )
        phase = (resume or {}).get("phase")
        if self._vendor_wait_s and phase in (None, "planning", "waiting_for_vendor"):
            # The vendor's quote takes days: a durable timer wakes the workflow, through
            # restarts of this agent, the state actor or the whole deployment.
            clock = self.deployment.clock
            due = float((resume or {}).get("reply_due") or clock.now() + self._vendor_wait_s)
            await self.snapshot(workflow, {**goal, "phase": "waiting_for_vendor", "reply_due": due})
            await self._wait_timer(workflow, VENDOR_REPLY, due)
        intent = ToolIntent(
            tool=ERP_CREATE_PO,
            args={"item": req.item, "vendor": req.vendor, "amount_usd": req.amount_usd},
            step=1,
            reflections=reflections,
        )
        sent: set[str] = set()
        started = time.perf_counter()
        first = await self._ask(
            workflow,
            intent,
            sent,
            trace=trace,
            final=False,
            wait_s=max(0.0, until - time.monotonic()),
            every_s=self._retry_s,
        )
        governance_ms = (time.perf_counter() - started) * 1000
        first_decision: Decision = first.body
        paused = not first_decision.final
        # Resumed past its first decision, governance now answers with the decision that
        # stands (an approval's settlement); the first one is the snapshot's.
        first_outcome = str((resume or {}).get("decision") or first_decision.outcome)
        await self.snapshot(
            workflow,
            {
                **goal,
                "phase": "awaiting_approval" if paused else "decided",
                "decision": first_outcome,
                "approval_id": first_decision.approval_id,
            },
            policy_hash=first_decision.policy_hash,
        )
        final = first
        if paused:
            final = await self._ask(
                workflow,
                intent,
                sent,
                trace=trace,
                final=True,
                wait_s=self._approval_wait_s(first_decision),
                every_s=self._recheck_s,
                approval_id=first_decision.approval_id,
                ask_first=False,
            )
            until = time.monotonic() + self._give_up_s
        decision: Decision = final.body
        outcome = PurchaseOutcome(
            result="denied",
            first_decision=first_outcome,
            reasons=decision.reasons,
            approval_id=decision.approval_id,
            approved_by=decision.approved_by,
            reflections=reflections,
            governance_ms=governance_ms,
            model_calls=reflections + 1,
        )
        if decision.outcome != "allow":
            return msgspec.structs.replace(
                outcome, result="rejected" if decision.approval_id else "denied"
            )
        tool_result = await self._run_tool(workflow, intent, final, sent, trace=trace, until=until)
        await self.snapshot(
            workflow,
            {**goal, "phase": "done", "ok": tool_result.ok, "order": tool_result.result},
            policy_hash=decision.policy_hash,
        )
        if not tool_result.ok:
            return msgspec.structs.replace(outcome, result="failed", reasons=(tool_result.error,))
        return msgspec.structs.replace(
            outcome, result="executed", order_id=str(tool_result.result.get("po_id", ""))
        )
