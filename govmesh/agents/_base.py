"""What every agent does: think with a model (usage reported), snapshot its state."""

from __future__ import annotations

from typing import Any, Final

from nats.errors import Error as NatsError
from redis.exceptions import RedisError

from govmesh.config import Deployment
from govmesh.errors import BusError
from govmesh.forecasting.messages import Usage
from govmesh.identity import Identity
from govmesh.llm import ModelProvider, ModelRequest, ModelResponse
from govmesh.service import Service
from govmesh.state._tiers import encode_goal
from govmesh.state.messages import Snapshot

__all__ = ["TRANSIENT", "AgentService"]

TRANSIENT: Final = (BusError, NatsError, RedisError, ConnectionError)
"""What a restarting nats-server or Redis-protocol server, or a restarting actor that does
not answer yet, looks like to an agent: worth trying again."""

_KEEP_OUTCOME_S: Final = 8 * 86_400
"""How long an agent keeps a workflow's outcome to answer a repeated request with: longer
than a workflow (up to 7 days) may take to ask again."""


class AgentService(Service):
    """An agent: one actor serving many workflows at once, each in its own handler task.

    Args:
        deployment: where the services are and whom to trust.
        identity: the agent's identity; its token names its role and capabilities.
        model: the model provider it thinks with.
        max_tokens: completion cap per model call.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        model: ModelProvider,
        max_tokens: int = 1024,
    ) -> None:
        super().__init__(deployment, identity)
        self.model = model
        self.max_tokens = max_tokens
        self._versions: dict[str, int] = {}

    @property
    def agent_id(self) -> str:
        """This agent's id."""
        return self.identity.agent_id

    async def think(
        self, workflow: str, prompt: str, *, key: str, trace: str = ""
    ) -> ModelResponse:
        """Make one model call and report its usage to the budget actor."""
        response = await self.model.complete(
            ModelRequest(prompt=prompt, max_tokens=self.max_tokens, key=f"{workflow}:{key}")
        )
        await self.bus.publish(
            self.subjects.usage(self.agent_id),
            Usage(
                model=response.model,
                input_tokens=response.input_tokens,
                output_tokens=response.output_tokens,
                error=response.error,
            ),
            workflow=workflow,
            trace=trace,
        )
        return response

    async def think_until_usable(
        self, workflow: str, prompt: str, *, key: str, max_reflections: int, trace: str = ""
    ) -> tuple[ModelResponse, int]:
        """Call the model, reflecting and retrying on unusable answers.

        Returns the last answer and the number of reflections used; stops after
        ``max_reflections`` so a looping model cannot spin forever (policy caps it lower).
        """
        reflections = 0
        while True:
            response = await self.think(workflow, prompt, key=f"{key}:{reflections}", trace=trace)
            if not response.error or reflections >= max_reflections:
                return response, reflections
            reflections += 1
            prompt = f"{prompt}\n(previous answer was unusable; reflect and retry)"

    async def snapshot(
        self,
        workflow: str,
        goal: dict[str, Any],
        *,
        policy_hash: str = "",
        tool: bytes = b"",
        reflections: tuple[str, ...] = (),
    ) -> int:
        """Send the next version of this workflow's state to the state actor.

        Raises:
            StateError: the goal state is not JSON or is over the 10 KB limit; checked
                here so the agent, not the state actor, fails with the clear message.
        """
        encode_goal(goal, f"{workflow}/{self.agent_id}")
        version = self._versions.get(workflow, 0) + 1
        self._versions[workflow] = version
        await self.bus.publish(
            self.subjects.state(self.agent_id),
            Snapshot(
                workflow=workflow,
                version=version,
                goal=goal,
                policy_hash=policy_hash,
                tool=tool,
                reflections=reflections,
            ),
            workflow=workflow,
        )
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
