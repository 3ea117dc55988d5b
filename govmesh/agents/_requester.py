"""The requester agent: drafts a purchase request and hands it to procurement."""

from __future__ import annotations

from govmesh.agents._base import AgentService
from govmesh.agents.messages import PurchaseOutcome, PurchaseRequest, WorkflowDone, WorkflowStart
from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.identity import Identity
from govmesh.llm import ModelProvider

__all__ = ["RequesterAgent"]


class RequesterAgent(AgentService):
    """Starts purchase workflows for the coordinator and reports how they ended.

    Args:
        procurement: the agent id of the procurement agent it asks.
        max_reflections: the agent's own stop for a model that keeps failing.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        model: ModelProvider,
        procurement: str,
        max_tokens: int = 1024,
        max_reflections: int = 40,
    ) -> None:
        super().__init__(deployment, identity, model=model, max_tokens=max_tokens)
        self._procurement = procurement
        self._max_reflections = max_reflections
        self._coordinators: dict[str, tuple[str, int]] = {}

    async def on_start(self) -> None:
        """Subscribe to this agent's inbox."""
        await self.bus.subscribe(
            self.subjects.msg(self.agent_id),
            self._on_message,
            accepts=WorkflowStart | PurchaseOutcome,
        )

    async def _on_message(self, d: Delivery) -> None:
        workflow = d.envelope.workflow
        match d.body:
            case WorkflowStart() as start:
                await self.snapshot(workflow, {"phase": "drafting", "item": start.item})
                _, reflections = await self.think_until_usable(
                    workflow,
                    f"Draft a purchase request for {start.item} from {start.vendor}.",
                    key=f"{self.agent_id}:draft",
                    max_reflections=self._max_reflections,
                    trace=d.envelope.trace,
                )
                self._coordinators[workflow] = (d.envelope.sender, reflections + 1)
                await self.bus.publish(
                    self.subjects.msg(self._procurement),
                    PurchaseRequest(
                        item=start.item, vendor=start.vendor, amount_usd=start.amount_usd
                    ),
                    workflow=workflow,
                    causation=d.envelope.id,
                    trace=d.envelope.trace,
                )
            case PurchaseOutcome() as outcome:
                started = self._coordinators.pop(workflow, None)
                self.forget(workflow)
                if started is not None:
                    coordinator, calls = started
                    await self.bus.publish(
                        self.subjects.msg(coordinator),
                        WorkflowDone(outcome=outcome, model_calls=calls + outcome.model_calls),
                        workflow=workflow,
                        causation=d.envelope.id,
                        trace=d.envelope.trace,
                    )
