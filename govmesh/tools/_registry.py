"""What a tool gets from the gateway that runs it: `ToolContext`."""

from __future__ import annotations

import redis.asyncio as aioredis

from govmesh.errors import ToolError

__all__ = ["ToolContext"]


class ToolContext:
    """The call a tool runs for, and the resources the gateway lends it.

    The gateway makes one for every run, inside its own process: a tool reaches the
    deployment's Redis through `redis` without importing anything private and without any
    credential travelling to it through Ray, and it never sees the gateway's other secrets.
    Tests make their own to call a tool directly (``redis`` is then optional). Read-only by
    convention; nothing in it is sent on the bus.

    Attributes:
        workflow: the workflow whose step called the tool.
        agent: the agent that called it.
        step: the step of the workflow.
        decision_id: the id of the governance decision that allowed the call.
        approval_id: the approval behind that decision, if a person approved it.
        approved_by: who approved it, if anyone.
        idempotency_key: the same for every attempt at one step's call (tenant, workflow,
            step and intent hash), different for any other call; an idempotent tool passes it
            to the system it changes (or dedupes on it itself) so a repeated attempt has no
            further effect. Empty when the tool is called outside the gateway.
        key_prefix: the deployment's Redis key prefix (``gm:<tenant>``); see `key`.
    """

    __slots__ = (
        "_redis",
        "agent",
        "approval_id",
        "approved_by",
        "decision_id",
        "idempotency_key",
        "key_prefix",
        "step",
        "workflow",
    )

    def __init__(
        self,
        *,
        workflow: str,
        agent: str,
        step: int,
        decision_id: str,
        approval_id: str = "",
        approved_by: str = "",
        idempotency_key: str = "",
        key_prefix: str = "",
        redis: aioredis.Redis | None = None,
    ) -> None:
        self.workflow = workflow
        self.agent = agent
        self.step = step
        self.decision_id = decision_id
        self.approval_id = approval_id
        self.approved_by = approved_by
        self.idempotency_key = idempotency_key
        self.key_prefix = key_prefix
        self._redis = redis

    @property
    def redis(self) -> aioredis.Redis:
        """The gateway's Redis connection (a pool shared by every tool run of that gateway;
        do not close it). Keep a tool's records under `key`.

        Raises:
            ToolError: the context was made without one (not retryable).
        """
        if self._redis is None:
            raise ToolError(
                f"no Redis connection in the context of step {self.step} of "
                f"{self.workflow!r}: make the ToolContext with redis=..."
            )
        return self._redis

    def key(self, *parts: str) -> str:
        """A Redis key of this deployment: ``key_prefix`` and ``parts`` joined by ``:``,
        e.g. ``ctx.key("erp", "orders")`` is ``gm:acme:erp:orders``. A tool's effects
        lister, which gets the prefix, builds the same key with ``":".join``.

        Raises:
            ValueError: a part is empty, or the context has no key prefix.
        """
        if not self.key_prefix:
            raise ValueError("the context has no key_prefix")
        empty = [i for i, part in enumerate(parts) if not part]
        if not parts or empty:
            raise ValueError(f"key parts must be non-empty strings, got {parts!r}")
        return ":".join((self.key_prefix, *parts))

    def __repr__(self) -> str:
        return (
            f"ToolContext(workflow={self.workflow!r}, agent={self.agent!r}, step={self.step}, "
            f"decision_id={self.decision_id!r}, idempotency_key={self.idempotency_key!r})"
        )
