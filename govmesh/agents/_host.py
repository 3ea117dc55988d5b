"""`AgentHost`: the one actor that hosts a user's `Agent`, runs its handlers and gives them
the governed, durable primitives of `Workflow`.

Every step is safe to take again, and that is how a workflow survives a crash anywhere in
it, or a message lost while nats-server restarts:

- a start is recorded in the agent's in-flight hash before any work, and the outcome is
  kept (`AgentService.settle`) before it is sent, so a start sent again is answered from
  what was kept, or resumed from the workflow's latest snapshot;
- each finished step is in the journal saved with the snapshot (see `govmesh.agents._sdk`),
  and the handler, run again, gets it back without doing it again;
- governance answers an intent asked again with its first decision (or the settlement of
  its approval), committing no spend twice;
- the gateway's ledger runs a tool once per (workflow, step, intent hash), and answers a
  retried call with the recorded result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, Unpack

import msgspec

from govmesh._load import load_object
from govmesh.agents._base import TRANSIENT, AgentService, RetryPolicy, Thinking
from govmesh.agents._sdk import Agent, Denied, Halted, Handler, Journal, ToolFailed, Workflow
from govmesh.agents.messages import InFlight, Outcome, Result, WorkflowStart
from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import ConfigError
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.identity import Identity
from govmesh.llm import ModelProvider, ModelRequest, ModelResponse
from govmesh.reservations import BudgetError
from govmesh.service import being_cancelled
from govmesh.state.messages import SnapshotQuery, SnapshotReply, TimerFired, TimerSet
from govmesh.telemetry._tracing import span
from govmesh.tools import STEP_IN_PROGRESS, ToolCall, ToolResult

__all__ = ["AgentHost"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_SETTLE_GRACE_S: Final = 60.0
"""Beyond an approval's expiry: governance's sweep, or another actor's takeover, settles it."""

_FRESH_S: Final = 5.0
"""A decision closer than this to its expiry is asked for again before a tool call."""

_TIMER_GRACE_S: Final = 5.0
"""Real seconds past a timer's due time after which the agent stops waiting for it to fire:
it fired while this agent was away (its message was lost with the old process)."""

_MAX_RESEND_S: Final = 60.0
"""The longest wait between two sends of a start to an asked agent that has not answered."""


@dataclass
class _Decisions:
    """The decisions that arrived for one workflow, for every step waiting for one: a step
    may be waiting while another's decision comes, and one that comes between two waits of
    a step (an approval answered at once) must not be lost."""

    seen: list[Delivery] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)


class AgentHost(AgentService):
    """Hosts a user's `Agent` class: takes `WorkflowStart`s on its inbox, runs the handler of
    each start's kind in a task of its own, and answers with an `Outcome`.

    Args:
        deployment: where the services are and whom to trust.
        identity: the agent's identity; its token names its role and capabilities.
        agent: the `Agent` class, as ``"package.module:Class"``; imported here, in the
            actor's process.
        options: keyword arguments of the class.
        model: a factory of the model provider, called here so clients and keys never
            travel through Ray (e.g. ``functools.partial(SimulatedModel, settings, seed=7)``).
        search_path: folders put on ``sys.path`` before the class is imported.
        max_reflections: the agent's own stop for a model that keeps failing.
        give_up_s: how long a step may take to get a decision or a tool's answer before
            the workflow is reported failed; the wait for a person is not counted.
        tool_retry: how a tool call that failed with ``ToolError(retryable=True)`` is
            retried (by default, `RetryPolicy`'s defaults); every retry is a governed call,
            under the same decision while it is valid, and the gateway's ledger still runs
            the step to effect once.
        retry_s: how long to wait for an answer (governance's decision, the gateway's
            result) before asking again.
        recheck_s: while an approval is pending, how often to ask governance again, in case
            its final decision was lost.
        approval_timeout_s: how long to wait for a person's answer to an escalation whose
            approval never lapses; one that lapses is waited for until it does.
        peers: the agents of the deployment; a workflow that asks or sends to another
            fails at once, naming it, where it would wait for an answer that never comes.
            None lets it ask any agent.
        thinking: max_tokens, prices, budget, keep_thoughts (see `AgentService`).

    Raises:
        ConfigError: ``agent`` does not name an `Agent` class with a handler, or the class
            does not take ``options``.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        agent: str,
        options: Mapping[str, Any] | None = None,
        model: Callable[[], ModelProvider],
        search_path: Sequence[str] = (),
        max_reflections: int = 40,
        give_up_s: float = 600.0,
        tool_retry: RetryPolicy | None = None,
        retry_s: float = 5.0,
        recheck_s: float = 10.0,
        approval_timeout_s: float = 300.0,
        peers: Collection[str] | None = None,
        **thinking: Unpack[Thinking],
    ) -> None:
        found = load_object(agent, search_path=search_path, what="agent")
        if not (isinstance(found, type) and issubclass(found, Agent)):
            raise ConfigError(f"agent {agent!r} is {found!r}, not a govmesh.Agent class")
        if not found.handlers():
            raise ConfigError(f"agent {agent!r} has no method marked @govmesh.handler")
        try:
            self.agent: Agent = found(**dict(options or {}))
        except TypeError as exc:
            raise ConfigError(f"agent {agent!r}: options {dict(options or {})!r}: {exc}") from None
        super().__init__(deployment, identity, model=model(), **thinking)
        self.handlers: Mapping[str, Handler] = found.handlers()
        self._max_reflections = max_reflections
        self._give_up_s = give_up_s
        self._tool_retry = tool_retry or RetryPolicy()
        self._retry_s = retry_s
        self._recheck_s = recheck_s
        self._approval_timeout_s = approval_timeout_s
        self._peers = None if peers is None else frozenset(peers)
        self._decisions: dict[str, _Decisions] = {}
        self._timers: dict[tuple[str, str], asyncio.Future[TimerFired]] = {}
        self._asks: dict[tuple[str, str], asyncio.Future[Outcome]] = {}
        self._active: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._journal = msgspec.msgpack.Decoder(Journal)
        self.timers = {"fired": 0, "missed": 0}
        self.resumed: Counter[str] = Counter()
        self.answered_again = 0

    async def on_start(self) -> None:
        """Subscribe to starts, outcomes of agents asked, timers and decisions, then take up
        the workflows a previous process of this agent left unfinished."""
        await self.bus.subscribe(
            self.subjects.msg(self.agent_id),
            self._on_message,
            accepts=WorkflowStart | Outcome | TimerFired,
        )
        await self.watch_decisions()
        self._spawn(self._resume_in_flight())

    def stats(self) -> dict[str, Any]:
        """Counters, plus workflows resumed by the phase they were in, starts answered again
        from a kept outcome, and timers fired or missed."""
        return {
            **super().stats(),
            "resumed": dict(self.resumed),
            "answered_again": self.answered_again,
            "timers": dict(self.timers),
        }

    async def close(self) -> None:
        """Stop the workflows in progress (they stay in flight for the next start), then
        leave. Safe to call twice."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await super().close()

    # -- the Runtime a Workflow uses -------------------------------------------------------

    def now(self) -> float:
        """The deployment's clock."""
        return self.deployment.clock.now()

    def may(self, tool: str) -> bool:
        """Whether this agent's token grants the capability ``tool``."""
        return self.bus.tokens.verify(self.identity.token).may(tool)

    def authority_usd(self) -> float:
        """This agent's budget authority, as its token states it."""
        return self.bus.tokens.verify(self.identity.token).budget_usd

    async def answer(
        self, workflow: str, request: ModelRequest, *, trace: str
    ) -> tuple[ModelResponse, int]:
        """A usable answer and the reflections it took (see `think_until_usable`); the
        request's key is named after the workflow and this agent."""
        keyed = msgspec.structs.replace(request, key=f"{workflow}:{self.agent_id}:{request.key}")
        return await self.think_until_usable(
            workflow, keyed, max_reflections=self._max_reflections, trace=trace
        )

    async def decide(
        self,
        workflow: str,
        intent: ToolIntent,
        sent: set[str],
        *,
        trace: str,
        pending: Decision | None = None,
    ) -> Delivery:
        """Governance's first decision on ``intent``; with ``pending`` (its escalation), the
        final one, waited for until the approval lapses."""
        if pending is None:
            return await self._decision(
                workflow,
                intent,
                sent,
                trace=trace,
                final=False,
                wait_s=self._give_up_s,
                every_s=self._retry_s,
            )
        return await self._decision(
            workflow,
            intent,
            sent,
            trace=trace,
            final=True,
            wait_s=self._approval_wait_s(pending),
            every_s=self._recheck_s,
            approval_id=pending.approval_id,
            ask_first=False,
        )

    async def run_tool(
        self, workflow: str, intent: ToolIntent, decided: Delivery, sent: set[str], *, trace: str
    ) -> ToolResult:
        """Call the tool through the gateway with ``decided`` (an allow), trying again
        until it answers, and after a retryable failure as `tool_retry` says; a decision
        about to expire is asked for again first."""
        until = time.monotonic() + self._give_up_s
        expired = False
        attempts = 1
        while True:
            decision: Decision = decided.body
            if expired or decision.expires_at - time.time() < _FRESH_S:
                expired = False
                decided = await self._decision(
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

    async def wait_timer(self, workflow: str, name: str, due_at: float) -> None:
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

    async def ask(self, workflow: str, agent: str, start: WorkflowStart, *, trace: str) -> Outcome:
        """Send ``start`` to ``agent`` for ``workflow`` and wait for its outcome, sending it
        again, less and less often, until one comes: the agent answers a start it works on
        with nothing, and one it finished with the outcome it kept.

        Raises:
            ConfigError: ``agent`` is not one of the deployment's agents (``peers``).
        """
        if self._peers is not None and agent not in self._peers:
            raise ConfigError(
                f"{agent!r} is not an agent of this deployment, so nothing would answer; "
                f"its agents are {sorted(self._peers)}"
            )
        key = (workflow, agent)
        answered = self._asks[key] = asyncio.get_running_loop().create_future()
        wait = self._retry_s
        try:
            while True:
                try:
                    await self.bus.publish(
                        self.subjects.msg(agent), start, workflow=workflow, trace=trace
                    )
                except TRANSIENT as exc:
                    if being_cancelled():
                        raise
                    log.info("start of %s at %s not sent (%s); sending again", workflow, agent, exc)
                try:
                    return await asyncio.wait_for(asyncio.shield(answered), wait)
                except TimeoutError:
                    wait = min(wait * 2, _MAX_RESEND_S)
        finally:
            self._asks.pop(key, None)

    async def save(self, wf: Workflow) -> None:
        """Save the workflow's phase, user state and journal as its next snapshot, and wait
        until the state actor has stored it (asking again while it restarts)."""
        goal = {"phase": wf.phase, **wf.where, "state": wf.state}
        journal = msgspec.msgpack.encode(wf.journal)
        policy_hash = wf.facts.policy_hash
        await self._again(
            lambda: self.snapshot(wf.id, goal, policy_hash=policy_hash, tool=journal, durable=True)
        )

    # -- serving workflows -----------------------------------------------------------------

    async def _on_message(self, d: Delivery) -> None:
        match d.body:
            case WorkflowStart():
                await self._on_start(d)
            case Outcome() as outcome:
                waiting = self._asks.get((d.envelope.workflow, d.claims.sub))
                if waiting is not None and not waiting.done():
                    waiting.set_result(outcome)
            case TimerFired() as fired:
                # At least once: only the first firing of a wait counts.
                waiting_timer = self._timers.get((d.envelope.workflow, fired.name))
                if waiting_timer is not None and not waiting_timer.done():
                    waiting_timer.set_result(fired)

    async def on_decision(self, d: Delivery) -> None:
        """Hand a decision on one of this agent's workflows to the steps waiting for one."""
        decision: Decision = d.body
        box = self._decisions.get(decision.workflow)
        if decision.agent == self.agent_id and box is not None:
            async with box.arrived:
                box.seen.append(d)
                box.arrived.notify_all()

    async def _on_start(self, d: Delivery) -> None:
        workflow = d.envelope.workflow
        if workflow in self._active:
            return  # sent again while this process works on it
        self._active.add(workflow)
        job = InFlight(
            start=d.body,
            requester=d.claims.sub,
            causation=d.envelope.id,
            trace=d.envelope.trace,
        )
        try:
            kept = await self.outcome_of(workflow)
            if kept is not None:
                self.answered_again += 1
                await self._send(workflow, job, msgspec.msgpack.decode(kept, type=Outcome))
                self._active.discard(workflow)
                return
            # Recorded before any work, removed only once the outcome is kept: a workflow
            # this process dies in the middle of is found again by the next one.
            new = await self.redis.hsetnx(self.in_flight_key, workflow, msgspec.msgpack.encode(job))
        except BaseException:
            self._active.discard(workflow)
            raise
        # The workflow outlives this handler (it waits for timers and outcomes that arrive
        # on this same subscription, and for people), so it runs in a task of its own and
        # the bounded subscription's slot is free for the next message.
        self._spawn(self._serve(workflow, job, resume=not new))

    async def _resume_in_flight(self) -> None:
        """Take up every workflow in this agent's in-flight hash from its latest snapshot."""
        raw: dict[bytes, bytes] = await self._again(
            lambda: self.redis.hgetall(self.in_flight_key),  # type: ignore[arg-type,return-value]
        )
        decoder = msgspec.msgpack.Decoder(InFlight)
        for key, value in raw.items():
            workflow = key.decode()
            if workflow in self._active:
                continue
            self._active.add(workflow)
            self._spawn(self._serve(workflow, decoder.decode(value), resume=True))

    async def _serve(self, workflow: str, job: InFlight, *, resume: bool) -> None:
        """Run one workflow's handler, from its latest snapshot with ``resume``, and answer."""
        self._decisions[workflow] = _Decisions()
        try:
            journal: Journal | None = None
            state: dict[str, Any] | None = None
            phase = None
            if resume:
                latest = await self._latest_snapshot(workflow)
                if latest.snapshot is not None:
                    # Versions go on from the last one stored, so "latest" stays the newest.
                    self._versions[workflow] = latest.snapshot.version
                    phase = latest.snapshot.goal.get("phase")
                    state = latest.snapshot.goal.get("state")
                    if latest.snapshot.tool:
                        journal = self._journal.decode(latest.snapshot.tool)
                self.resumed[str(phase)] += 1
            until = time.monotonic() + self._give_up_s
            while True:
                wf = Workflow(self, id=workflow, trace=job.trace, journal=journal, state=state)
                try:
                    with span(
                        f"invoke_agent {self.agent_id}",
                        traceparent=job.trace if resume else "",
                        attributes={
                            "gen_ai.operation.name": "invoke_agent",
                            "gen_ai.agent.name": self.agent_id,
                            "govmesh.workflow": workflow,
                            "govmesh.workflow.kind": job.start.kind,
                            "govmesh.resumed_from": phase if resume else None,
                        },
                    ):
                        outcome = await self._handle(wf, job.start)
                    break
                except TRANSIENT as exc:
                    if being_cancelled():
                        raise
                    if time.monotonic() >= until:
                        outcome = self._ended(wf, "failed", (f"{type(exc).__name__}: {exc}",))
                        break
                    # A server restarting under a step: run the handler again; what was
                    # done already is answered from the journal.
                    log.info("%s interrupted (%s); running it again", workflow, exc)
                    await asyncio.sleep(0.5)
                    journal, state = wf.journal, wf.state
            await self._again(lambda: self.settle(workflow, msgspec.msgpack.encode(outcome)))
            await self._send(workflow, job, outcome)
        finally:
            self._active.discard(workflow)
            self._decisions.pop(workflow, None)
            self.forget(workflow)

    async def _handle(self, wf: Workflow, start: WorkflowStart) -> Outcome:
        """Run the handler of ``start``'s kind; its end, or the error that ended it, is the
        outcome."""
        spec = self.handlers.get(start.kind)
        if spec is None:
            return self._ended(
                wf,
                "failed",
                (
                    f"{self.agent_id} has no handler of kind {start.kind!r}; "
                    f"it handles {sorted(self.handlers)}",
                ),
            )
        try:
            payload = msgspec.msgpack.decode(start.body, type=spec.payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return self._ended(wf, "failed", (f"{start.kind}: {exc}",))
        method: Callable[[Workflow, Any], Awaitable[Any]] = getattr(self.agent, spec.name)
        try:
            try:
                value = await method(wf, payload)
            finally:
                # The parts it sent end before its own outcome is told, with theirs in it.
                await wf.parts_ended()
            body = b"" if value is None else msgspec.msgpack.encode(value)
        except Denied as exc:
            outcome = self._ended(wf, "rejected" if exc.rejected else "denied", exc.reasons)
        except ToolFailed as exc:
            outcome = self._ended(wf, "failed", (exc.error,))
        except Halted as exc:
            outcome = self._ended(wf, "halted", exc.reasons)
        except BudgetError as exc:
            # Halted with its state saved: the snapshot says where and why.
            wf.at("halted", reason=str(exc), calls=exc.calls)
            await self.save(wf)
            return self._ended(wf, "halted", (str(exc),))
        except TRANSIENT:
            raise
        except Exception as exc:
            # The handler's own error (a bug, or a step that gave up): the workflow fails
            # with it, and the traceback stays in this agent's log.
            log.exception("handler %s of %s failed on %s", spec.name, self.agent_id, wf.id)
            outcome = self._ended(wf, "failed", (f"{type(exc).__qualname__}: {exc}",))
        else:
            # Completed: the reasons are those of the approval it went on with, if any.
            completed = self._ended(wf, "completed", wf.facts.approval_reasons)
            outcome = msgspec.structs.replace(completed, value=body)
        wf.at("done", result=outcome.result)
        await self.save(wf)
        return outcome

    @staticmethod
    def _ended(wf: Workflow, result: Result, reasons: tuple[str, ...]) -> Outcome:
        facts = wf.facts
        return Outcome(
            result=result,
            first_decision=facts.first_decision,
            reasons=reasons,
            approval_id=facts.approval_id,
            approved_by=facts.approved_by,
            reflections=facts.reflections,
            governance_ms=facts.governance_ms,
            model_calls=facts.model_calls,
            shown=facts.shown,
        )

    async def _send(self, workflow: str, job: InFlight, outcome: Outcome) -> None:
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
            log.warning("outcome of %s not sent (%s); kept for the next start", workflow, exc)

    async def _latest_snapshot(self, workflow: str) -> SnapshotReply:
        """The state actor's latest snapshot of `workflow`, asking until it answers (it may
        be restarting too)."""
        reply = await self._again(
            lambda: self.bus.request(
                self.subjects.ctl("state"),
                SnapshotQuery(workflow=workflow, agent=self.agent_id),
                accepts=SnapshotReply,
                timeout=self._retry_s,
            )
        )
        answer: SnapshotReply = reply.body
        return answer

    async def _again(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """``attempt()``, tried again after transient failures for up to `give_up_s`."""
        until = time.monotonic() + self._give_up_s
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

    def _approval_wait_s(self, escalated: Decision) -> float:
        """Wait for a person until the approval lapses (then governance settles it with the
        policy's default, a sweep later), or `approval_timeout_s` for one that never does."""
        if not escalated.approval_expires_at:
            return self._approval_timeout_s
        return max(0.0, escalated.approval_expires_at - time.time()) + _SETTLE_GRACE_S

    async def _decision(
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
        box = self._decisions.setdefault(workflow, _Decisions())
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
                async with asyncio.timeout(min(every_s, remaining)), box.arrived:
                    while True:
                        for d in box.seen:
                            decision: Decision = d.body
                            ours = decision.intent_id in sent or (
                                approval_id and decision.approval_id == approval_id
                            )
                            if ours and (decision.final or not final):
                                return d
                        await box.arrived.wait()
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
