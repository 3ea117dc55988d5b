"""The requester agent: drafts a purchase request and hands it to procurement."""

from __future__ import annotations

import logging
from typing import Unpack

import msgspec

from govmesh.agents._base import TRANSIENT, AgentService, Thinking
from govmesh.agents.messages import (
    PurchaseOutcome,
    PurchaseRequest,
    Started,
    WorkflowDone,
    WorkflowStart,
)
from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.forecasting import BudgetError
from govmesh.identity import Identity
from govmesh.llm import ModelProvider

__all__ = ["RequesterAgent"]

log = logging.getLogger(__name__)


class RequesterAgent(AgentService):
    """Starts purchase workflows for the coordinator and reports how they ended.

    A workflow started is recorded in Redis (`Started`) and its end kept
    (`AgentService.settle`), so the coordinator may send the same start again, after a
    restart of this agent or a lost message, and get the workflow driven on or its end
    told again, never a second draft.

    Args:
        procurement: the agent id of the procurement agent it asks.
        max_reflections: the agent's own stop for a model that keeps failing.
        thinking: max_tokens, prices, budget, keep_thoughts (see `AgentService`).
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        model: ModelProvider,
        procurement: str,
        max_reflections: int = 40,
        **thinking: Unpack[Thinking],
    ) -> None:
        super().__init__(deployment, identity, model=model, **thinking)
        self._procurement = procurement
        self._max_reflections = max_reflections
        self._drafting: set[str] = set()
        self._started = msgspec.msgpack.Decoder(Started)

    async def on_start(self) -> None:
        """Subscribe to this agent's inbox."""
        await self.bus.subscribe(
            self.subjects.msg(self.agent_id),
            self._on_message,
            accepts=WorkflowStart | PurchaseOutcome,
        )

    async def _on_message(self, d: Delivery) -> None:
        match d.body:
            case WorkflowStart() as start:
                await self._on_start(d, start)
            case PurchaseOutcome() as outcome:
                await self._on_outcome(d, outcome)

    async def _on_start(self, d: Delivery, start: WorkflowStart) -> None:
        workflow = d.envelope.workflow
        if workflow in self._drafting:
            return
        kept = await self.outcome_of(workflow)
        if kept is not None:
            await self._tell(workflow, self._started_of(d), kept)
            return
        raw = await self.redis.hget(self.in_flight_key, workflow)
        if raw is not None:
            started = self._started.decode(raw)  # type: ignore[arg-type]
        else:
            self._drafting.add(workflow)
            try:
                await self.snapshot(workflow, {"phase": "drafting", "item": start.item})
                try:
                    _, reflections = await self.think_until_usable(
                        workflow,
                        f"Draft a purchase request for {start.item} from {start.vendor}.",
                        key=f"{self.agent_id}:draft",
                        max_reflections=self._max_reflections,
                        trace=d.envelope.trace,
                    )
                except BudgetError as exc:
                    await self._halt(d, start, exc)
                    return
                started = msgspec.structs.replace(self._started_of(d), calls=reflections + 1)
                await self.redis.hset(self.in_flight_key, workflow, msgspec.msgpack.encode(started))
            finally:
                self._drafting.discard(workflow)
        # Sent again for a workflow started before: procurement answers a request it has
        # seen with what it did, or goes on with it.
        await self.bus.publish(
            self.subjects.msg(self._procurement),
            PurchaseRequest(item=start.item, vendor=start.vendor, amount_usd=start.amount_usd),
            workflow=workflow,
            causation=d.envelope.id,
            trace=d.envelope.trace,
        )

    async def _halt(self, d: Delivery, start: WorkflowStart, exc: BudgetError) -> None:
        """End a workflow whose draft was refused its model spend, with its state saved."""
        workflow = d.envelope.workflow
        await self.snapshot(
            workflow,
            {"phase": "halted", "item": start.item, "reason": str(exc), "calls": exc.calls},
        )
        done = msgspec.msgpack.encode(
            WorkflowDone(
                outcome=PurchaseOutcome(result="halted", reasons=(str(exc),)),
                model_calls=exc.calls,
            )
        )
        await self.settle(workflow, done)
        await self._tell(workflow, self._started_of(d), done)

    @staticmethod
    def _started_of(d: Delivery) -> Started:
        return Started(
            coordinator=d.envelope.sender, causation=d.envelope.id, trace=d.envelope.trace
        )

    async def _on_outcome(self, d: Delivery, outcome: PurchaseOutcome) -> None:
        workflow = d.envelope.workflow
        raw = await self.redis.hget(self.in_flight_key, workflow)
        if raw is None:
            return  # told already; procurement answered a repeated request
        started = self._started.decode(raw)  # type: ignore[arg-type]
        done = msgspec.msgpack.encode(
            WorkflowDone(outcome=outcome, model_calls=started.calls + outcome.model_calls)
        )
        await self.settle(workflow, done)
        self.forget(workflow)
        await self._tell(workflow, started, done)

    async def _tell(self, workflow: str, started: Started, done: bytes) -> None:
        try:
            await self.bus.publish(
                self.subjects.msg(started.coordinator),
                msgspec.msgpack.decode(done, type=WorkflowDone),
                workflow=workflow,
                causation=started.causation,
                trace=started.trace,
            )
        except TRANSIENT as exc:
            log.warning("end of %s not told (%s); kept for the next start", workflow, exc)
