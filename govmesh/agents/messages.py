"""Message bodies exchanged between agents and the swarm coordinator."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "InFlight",
    "PurchaseOutcome",
    "PurchaseRequest",
    "Started",
    "WorkflowDone",
    "WorkflowStart",
]

Result = Literal["executed", "denied", "rejected", "failed", "halted"]


class WorkflowStart(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The coordinator asks a requester agent to start a purchase workflow."""

    item: str
    vendor: str
    amount_usd: float


class PurchaseRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A requester asks the procurement agent to buy something."""

    item: str
    vendor: str
    amount_usd: float


class InFlight(msgspec.Struct, frozen=True, kw_only=True):
    """A request an agent has taken on and not answered yet, kept in Redis so a restarted
    agent finds it again.

    Attributes:
        request: the request.
        requester: who asked, and gets the outcome.
        causation: the request's message id, which the outcome answers.
        trace: the workflow's trace context.
    """

    request: PurchaseRequest
    requester: str
    causation: str
    trace: str = ""


class Started(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow the requester started and has not told the end of yet, kept in Redis.

    Attributes:
        coordinator: who started it, and is told how it ended.
        causation: the start's message id.
        trace: the workflow's trace context.
        calls: the requester's model calls for it.
    """

    coordinator: str
    causation: str
    trace: str = ""
    calls: int = 0


class PurchaseOutcome(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """What became of a purchase request.

    Attributes:
        result: ``executed`` (an order was placed), ``denied`` (by policy), ``rejected``
            (an approver said no), ``failed`` (an error; see ``reasons``), ``halted`` (its
            model spend reached a cap, or a person stopped it at the soft threshold; its
            state is saved).
        first_decision: governance's first answer: allow, deny or escalate.
        governance_ms: intent-to-first-decision latency seen by the agent.
    """

    result: Result
    first_decision: str = ""
    reasons: tuple[str, ...] = ()
    order_id: str = ""
    approval_id: str = ""
    approved_by: str = ""
    reflections: int = 0
    governance_ms: float = 0.0
    model_calls: int = 0


class WorkflowDone(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A requester tells the coordinator its workflow ended.

    Attributes:
        model_calls: model calls all agents made for the workflow, which the coordinator
            checks against the budget actor's count.
    """

    outcome: PurchaseOutcome
    model_calls: int = 0
