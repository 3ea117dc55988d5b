"""What every agent does: think with a model (usage reported), snapshot its state."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Mapping
from typing import Any, Final, TypedDict

import msgspec
from nats.errors import Error as NatsError
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.errors import BusError, ConfigError, ModelError, StateError
from govmesh.forecasting import BudgetError
from govmesh.forecasting._prices import Price, PriceTable
from govmesh.forecasting.messages import BudgetInterrupt, InterruptAck, Usage
from govmesh.governance.messages import Decision
from govmesh.identity import Identity
from govmesh.llm import ModelProvider, ModelRequest, ModelResponse, schema_problem
from govmesh.reservations import BudgetCaps, Granted, ReservationBook
from govmesh.service import Service
from govmesh.state._tiers import encode_goal
from govmesh.state.messages import Snapshot, SnapshotStored
from govmesh.telemetry._metrics import (
    BUDGET_INTERRUPTS,
    MODEL_CALL_DURATION,
    measured,
    record_model_usage,
)
from govmesh.telemetry._tracing import span

__all__ = ["TRANSIENT", "AgentService", "RetryPolicy", "Thinking"]

TRANSIENT: Final = (BusError, NatsError, RedisError, ConnectionError)
"""What a restarting nats-server or Redis-protocol server, or a restarting actor that does
not answer yet, looks like to an agent: worth trying again."""

_KEEP_OUTCOME_S: Final = 8 * 86_400
"""How long an agent keeps a workflow's outcome to answer a repeated request with: longer
than a workflow (up to 7 days) may take to ask again."""


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How an agent retries a tool call that failed with ``ToolError(retryable=True)``, or
    a model call that failed retryably (a rate limit, a server error, a timeout), as
    Temporal's ``RetryPolicy``: the n-th retry waits ``initial_s * backoff ** (n - 1)``
    seconds, at most ``maximum_s``, and the call is made at most ``maximum_attempts`` times.
    Scenario files give it as a mapping of these fields (``tool_retry:``, ``model_retry:``).

    Raises:
        ConfigError: a figure is out of range; the message quotes it.
    """

    initial_s: float = 0.5
    backoff: float = 2.0
    maximum_s: float = 10.0
    maximum_attempts: int = 5

    def __post_init__(self) -> None:
        figures = {
            "initial_s": (self.initial_s, 0.0),
            "backoff": (self.backoff, 1.0),
            "maximum_s": (self.maximum_s, self.initial_s),
        }
        for name, (value, least) in figures.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not least <= value < math.inf:
                raise ConfigError(f"retry policy {name} must be in [{least}, inf), got {value!r}")
        attempts = self.maximum_attempts
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ConfigError(f"retry policy maximum_attempts must be >= 1, got {attempts!r}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (from 1)."""
        return float(min(self.initial_s * self.backoff ** (retry - 1), self.maximum_s))


class Thinking(TypedDict, total=False):
    """How an agent thinks, passed through by every agent to `AgentService`."""

    max_tokens: int
    prices: Mapping[str, Price] | None
    budget: BudgetCaps | None
    keep_thoughts: bool
    model_retry: RetryPolicy | None


class AgentService(Service):
    """An agent: one actor serving many workflows at once, each in its own handler task.

    Args:
        deployment: where the services are and whom to trust.
        identity: the agent's identity; its token names its role and capabilities.
        model: the model provider it thinks with.
        max_tokens: completion cap per model call.
        prices: the price table; the model's price prices each call's reservation.
        budget: the model-spend caps each call is reserved against (needs ``prices``);
            None reserves nothing.
        keep_thoughts: put each answer's text in its usage event, and so in the event
            stream and the audit index; by default only its hash goes there.
        model_retry: how a model call that failed with a retryable `ModelError` is
            retried (by default, `RetryPolicy`'s defaults).

    Raises:
        ConfigError: ``budget`` without ``prices``, or the model has no price.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        model: ModelProvider,
        max_tokens: int = 1024,
        prices: Mapping[str, Price] | None = None,
        budget: BudgetCaps | None = None,
        keep_thoughts: bool = False,
        model_retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(deployment, identity)
        self.keep_thoughts = keep_thoughts
        self.model_retry = model_retry or RetryPolicy()
        self.model = model
        self.max_tokens = max_tokens
        self._versions: dict[str, int] = {}
        if budget is not None and prices is None:
            raise ConfigError(f"{identity.agent_id}: model-spend caps need a price table")
        # Checked here, at start-up: a model with no price is never free.
        self.price = None if prices is None else PriceTable(dict(prices)).price(model.model)
        self.budget = budget
        self._book: ReservationBook | None = None
        self.interrupts = {"asked": 0, "released": 0, "halted": 0}
        self._interrupted: dict[str, tuple[dict[str, Decision], asyncio.Event]] = {}
        self._watching = False

    async def watch_decisions(self) -> None:
        """Subscribe (once) to this agent's decisions; each goes to `on_decision`, and a
        final one on an interrupt this agent waits for goes to that wait. One subscription
        per agent: a second would see every decision twice, which the bus reports as a
        replay."""
        if self._watching:
            return
        self._watching = True
        await self.bus.subscribe(
            self.subjects.decisions(self.agent_id), self._route, accepts=Decision
        )

    async def _route(self, d: Delivery) -> None:
        decision: Decision = d.body
        waiting = self._interrupted.get(decision.workflow)
        if waiting is not None and decision.approval_id and decision.final:
            seen, arrived = waiting
            seen[decision.approval_id] = decision
            arrived.set()
        await self.on_decision(d)

    async def on_decision(self, d: Delivery) -> None:
        """A decision for this agent, for agents that `watch_decisions`."""

    def stats(self) -> dict[str, Any]:
        """Counters, plus budget interrupts asked, released and halted."""
        return {**super().stats(), "interrupts": dict(self.interrupts)}

    async def close(self) -> None:
        """Leave (see `Service.close`), then close the model's client if it has one. Safe
        to call twice."""
        await super().close()
        closing = getattr(self.model, "close", None)
        if closing is not None:
            await closing()

    @property
    def book(self) -> ReservationBook | None:
        """The tenant's model-spend reservations, if this agent has caps; after `start`."""
        if self.budget is not None and self._book is None:
            self._book = ReservationBook(self.redis, self.deployment.key_prefix, self.budget)
        return self._book

    @property
    def agent_id(self) -> str:
        """This agent's id."""
        return self.identity.agent_id

    async def think(
        self, workflow: str, prompt: str, *, key: str, trace: str = ""
    ) -> ModelResponse:
        """Make one model call (retried on a rate limit, a server error or a timeout) and
        report its usage to the budget actor; see `call_model`.

        Raises:
            BudgetError: the reservation was refused; the call did not run.
            ModelError: the call failed, and retrying did not help or cannot.
        """
        request = ModelRequest(prompt=prompt, max_tokens=self.max_tokens, key=f"{workflow}:{key}")
        return await self.call_model(workflow, request, trace=trace)

    async def call_model(
        self, workflow: str, request: ModelRequest, *, trace: str = ""
    ) -> ModelResponse:
        """Make one model call and report its usage to the budget actor.

        An attempt that fails with a retryable `ModelError` (a rate limit, a server error,
        a timeout) is made again after ``model_retry``'s backoff, or after the provider's
        ``retry-after`` when that is longer. Every attempt is a call of its own: reserved
        first (with caps), settled with its actual cost, counted in a usage event (a
        failed one as an ``error`` with its ``failure``, so the ATFM history sees it as a
        retry) and traced. An answer that does not follow ``request.schema`` is unusable
        (``error``). Cancelled mid-call, the attempt's reservation is left to lapse and is
        settled at its full amount: the provider may have charged for it.

        Raises:
            BudgetError: an attempt's reservation was refused; it did not run.
            ModelError: the last attempt failed, and it is not retryable or the attempts
                ran out.
        """
        attempt = 1
        while True:
            try:
                response = await self._attempt(workflow, request, trace=trace)
            except ModelError as exc:
                if not exc.retryable or attempt >= self.model_retry.maximum_attempts:
                    raise
                await asyncio.sleep(max(self.model_retry.delay(attempt), exc.retry_after_s or 0.0))
                attempt += 1
            else:
                return msgspec.structs.replace(response, retries=attempt - 1)

    async def _attempt(self, workflow: str, request: ModelRequest, *, trace: str) -> ModelResponse:
        granted: Granted | None = None
        book = self.book
        if book is not None and self.price is not None:
            most = self.price.max_cost(self.model.max_input_tokens(request), request.max_tokens)
            answer = await book.reserve(workflow, self.agent_id, most)
            if not isinstance(answer, Granted):
                raise BudgetError(answer)
            granted = answer
        genai = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": getattr(self.model, "provider", "unknown"),
            "gen_ai.request.model": self.model.model,
        }
        failed: ModelError | None = None
        with (
            span(
                f"chat {self.model.model}",
                kind=SpanKind.CLIENT,
                attributes={
                    **genai,
                    "gen_ai.request.max_tokens": request.max_tokens,
                    "gen_ai.agent.name": self.agent_id,
                    "govmesh.workflow": workflow,
                    "govmesh.reservation": None if granted is None else granted.reservation_id,
                },
            ) as call,
            measured(MODEL_CALL_DURATION, dict(genai)) as timing,
        ):
            try:
                response = await self.model.complete(request)
            except ModelError as exc:
                failed = exc
                call.set_attribute("error.type", exc.kind)
                response = ModelResponse(
                    text="", model=self.model.model, input_tokens=0, output_tokens=0, error=True
                )
            if request.schema is not None and not response.error and not response.tool_calls:
                problem = schema_problem(response.text, request.schema)
                if problem:
                    response = msgspec.structs.replace(response, error=True, problem=problem)
            timing["gen_ai.response.model"] = response.model
            call.set_attribute("gen_ai.response.model", response.model)
            call.set_attribute("gen_ai.usage.input_tokens", response.prompt_tokens)
            call.set_attribute("gen_ai.usage.output_tokens", response.output_tokens)
            if response.stop_reason:
                call.set_attribute("gen_ai.response.finish_reasons", (response.stop_reason,))
            call.set_attribute("govmesh.answer.usable", not response.error)
        usage = Usage(
            # As priced: the budget actor prices by it, and a server may name its model
            # otherwise (a dated version, a file path).
            model=self.model.model,
            input_tokens=response.input_tokens,
            output_tokens=response.output_tokens,
            error=response.error,
            reservation="" if granted is None else granted.reservation_id,
            cache_read_tokens=response.cache_read_tokens,
            cache_write_tokens=response.cache_write_tokens,
            reasoning_tokens=response.reasoning_tokens,
            thought_sha256=hashlib.sha256(response.text.encode()).hexdigest(),
            thought=response.text if self.keep_thoughts else "",
            failure="" if failed is None else failed.kind,
        )
        cost = usage.cost(self.price) if self.price is not None else 0.0
        record_model_usage(
            timing,
            input_tokens=response.prompt_tokens,
            output_tokens=response.output_tokens,
            cost_usd=None if self.price is None else cost,
        )
        usage = msgspec.structs.replace(usage, cost_usd=cost)
        if book is not None and granted is not None:
            await book.settle(granted, cost)
        await self.bus.publish(
            self.subjects.usage(self.agent_id), usage, workflow=workflow, trace=trace
        )
        if failed is not None:
            raise failed
        return response

    async def think_until_usable(
        self,
        workflow: str,
        request: ModelRequest,
        *,
        max_reflections: int,
        trace: str = "",
    ) -> tuple[ModelResponse, int]:
        """Call the model (`call_model`), reflecting and retrying on unusable answers.

        Returns the last answer (its ``retries`` those of every call made for it) and the
        number of reflections used; stops after
        ``max_reflections`` so a looping model cannot spin forever (policy caps it lower).
        Reflection ``n`` is asked with key ``<request.key>:<n>``, telling the model why
        the answer before was unusable. At the workflow's soft threshold it asks a person
        (`interrupt`) and goes on if they agree.

        Raises:
            BudgetError: a call's reservation was refused (the cap, or a person said no);
                its ``calls`` says how many calls ran.
            ModelError: a call failed, and retrying did not help or cannot.
        """
        reflections = retries = 0
        asked = request
        while True:
            try:
                response = await self.call_model(
                    workflow,
                    msgspec.structs.replace(asked, key=f"{request.key}:{reflections}"),
                    trace=trace,
                )
            except BudgetError as exc:
                if exc.refusal.kind == "soft" and await self.interrupt(workflow, exc, trace=trace):
                    continue  # a person let the workflow spend on, up to its cap
                exc.calls = reflections  # the calls that ran; the refused one did not
                raise
            retries += response.retries
            if not response.error or reflections >= max_reflections:
                return msgspec.structs.replace(response, retries=retries), reflections
            reflections += 1
            asked = asked.reflected(response.text, response.problem)

    async def interrupt(self, workflow: str, refused: BudgetError, *, trace: str = "") -> bool:
        """Pause ``workflow`` at its soft threshold and ask a person, through the budget
        actor, whether it may spend on; returns their answer (False also when the interrupt
        lapses unanswered). The answer comes as governance's final decision on the
        interrupt's approval, like an escalation's."""
        self.interrupts["asked"] += 1
        await self.watch_decisions()
        refusal = refused.refusal
        seen: dict[str, Decision] = {}
        arrived = asyncio.Event()
        # Listening before asking: the answer may come before the acknowledgement does.
        self._interrupted[workflow] = (seen, arrived)
        try:
            reply = await self.bus.request(
                self.subjects.ctl("budget"),
                BudgetInterrupt(
                    reason=refusal.reason(),
                    settled_usd=refusal.settled_usd,
                    cap_usd=refusal.cap_usd,
                ),
                accepts=InterruptAck,
                workflow=workflow,
                trace=trace,
            )
            ack: InterruptAck = reply.body
            if ack.settled:
                allowed = ack.outcome == "allow"
            else:
                deadline = (
                    None
                    if not ack.expires_at
                    else time.monotonic() + ack.expires_at - time.time() + 60.0
                )
                while ack.approval_id not in seen:
                    arrived.clear()
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    await asyncio.wait_for(arrived.wait(), timeout)
                allowed = seen[ack.approval_id].outcome == "allow"
        finally:
            self._interrupted.pop(workflow, None)
        self.interrupts["released" if allowed else "halted"] += 1
        BUDGET_INTERRUPTS.add(1, {"govmesh.interrupt.outcome": "released" if allowed else "halted"})
        return allowed

    async def snapshot(
        self,
        workflow: str,
        goal: dict[str, Any],
        *,
        policy_hash: str = "",
        tool: bytes = b"",
        reflections: tuple[str, ...] = (),
        durable: bool = False,
    ) -> int:
        """Send the next version of this workflow's state to the state actor; with
        ``durable``, return only once the state actor has stored it.

        Raises:
            StateError: the goal state is not JSON or is over the 10 KB limit; checked
                here so the agent, not the state actor, fails with the clear message. With
                ``durable``, also the state actor's refusal.
            BusError: with ``durable``, the state actor did not answer.
        """
        encode_goal(goal, f"{workflow}/{self.agent_id}")
        version = self._versions.get(workflow, 0) + 1
        self._versions[workflow] = version
        snapshot = Snapshot(
            workflow=workflow,
            version=version,
            goal=goal,
            policy_hash=policy_hash,
            tool=tool,
            reflections=reflections,
        )
        subject = self.subjects.state(self.agent_id)
        if not durable:
            await self.bus.publish(subject, snapshot, workflow=workflow)
            return version
        reply = await self.bus.request(subject, snapshot, accepts=SnapshotStored, workflow=workflow)
        stored: SnapshotStored = reply.body
        if not stored.stored:
            raise StateError(f"snapshot {version} of {workflow}/{self.agent_id}: {stored.error}")
        return version

    @property
    def in_flight_key(self) -> str:
        """The Redis hash of this agent's workflows in flight (workflow -> what to resume)."""
        return self.key("in-flight", self.agent_id)

    def _outcome_key(self, workflow: str) -> str:
        return self.key("outcome", self.agent_id, workflow)

    async def outcome_of(self, workflow: str) -> bytes | None:
        """The outcome this agent already sent for `workflow`, if any (see `settle`)."""
        found: bytes | None = await self.redis.get(self._outcome_key(workflow))  # type: ignore[assignment]
        return found

    async def settle(self, workflow: str, outcome: bytes) -> None:
        """Keep `workflow`'s outcome and take it off the in-flight hash, in one transaction.

        Done before the outcome is sent: if the message is lost, the requester asks again
        and gets the kept outcome, and the work is never done twice.
        """
        async with self.redis.pipeline(transaction=True) as tx:
            tx.set(self._outcome_key(workflow), outcome, ex=_KEEP_OUTCOME_S)
            tx.hdel(self.in_flight_key, workflow)
            await tx.execute()

    def forget(self, workflow: str) -> None:
        """Drop in-memory bookkeeping of a finished workflow."""
        self._versions.pop(workflow, None)
