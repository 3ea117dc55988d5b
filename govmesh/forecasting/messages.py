"""Message bodies of cost accounting."""

from __future__ import annotations

from typing import Literal

import msgspec

from govmesh.forecasting._prices import Price

__all__ = [
    "BudgetInterrupt",
    "BudgetQuery",
    "BudgetReport",
    "InterruptAck",
    "RoleUsage",
    "Usage",
    "WorkflowBurn",
]


class Usage(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Token use of one model call, reported by the agent that made it.

    Attributes:
        cost_usd: what the call cost at the agent's price, for those who watch the stream;
            the budget actor prices the tokens itself and does not trust this figure.
        thought_sha256: sha256 (hex) of the answer's text, the agent's reasoning on this
            call: the audit trail proves what was thought without keeping it.
        thought: the answer's text itself, only from an agent told to keep thoughts.
        failure: why the call got no answer (``rate_limited``, ``server_error``,
            ``timeout``, ``connection``); such a call is an ``error`` the agent retried,
            with the tokens the provider reported for it (none, mostly).
    """

    model: str
    input_tokens: int
    output_tokens: int
    error: bool = False
    reservation: str = ""
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    thought_sha256: str = ""
    thought: str = ""
    failure: str = ""

    def cost(self, price: Price) -> float:
        """What this usage costs at ``price``."""
        return price.cost(
            self.input_tokens,
            self.output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens,
        )


class BudgetInterrupt(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An agent's workflow reached its soft threshold: the agent asks the budget actor to
    put the interrupt to a person (the workflow is the envelope's)."""

    reason: str
    settled_usd: float
    cap_usd: float


class InterruptAck(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The budget actor's answer to `BudgetInterrupt`: the approval the workflow waits on.

    Attributes:
        expires_at: when the approval lapses and the workflow halts (0: never).
        settled: the workflow's interrupt was answered already (asked again after a
            restart); ``outcome`` is that answer.
    """

    approval_id: str
    expires_at: float = 0.0
    settled: bool = False
    outcome: str = ""


class BudgetQuery(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Ask the budget actor for totals of ``workflows``; none means the whole tenant.

    Attributes:
        agents: also the burn of these agents (`BudgetReport.burn`, scope ``agent``).
        detail: also the burn of each workflow and of the tenant.
    """

    workflows: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    detail: bool = False


BurnScope = Literal["workflow", "agent", "tenant"]


class RoleUsage(msgspec.Struct, frozen=True, kw_only=True):
    """One agent role's model use in one workflow.

    Attributes:
        errors: calls whose answer was unusable (each reflected on and retried).
    """

    role: str
    model: str
    calls: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class WorkflowBurn(msgspec.Struct, frozen=True, kw_only=True):
    """The model use so far of one workflow, one agent, or the tenant (``scope``).

    Attributes:
        workflow: the workflow, for scope ``workflow``.
        agent: the agent, for scope ``agent``.
        reflections: unusable answers, each reflected on and retried.
        tokens_per_min: tokens over the time from its first call to its last (at least a
            second).
    """

    workflow: str
    calls: int
    reflections: int
    tokens: int
    cost_usd: float
    tokens_per_min: float
    roles: tuple[RoleUsage, ...] = ()
    scope: BurnScope = "workflow"
    agent: str = ""
    input_tokens: int = 0
    output_tokens: int = 0


class BudgetReport(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Counted spend."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    burn: tuple[WorkflowBurn, ...] = ()

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens
