"""Message bodies exchanged between agents and the swarm coordinator."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "InFlight",
    "Outcome",
    "PurchaseOutcome",
    "PurchaseRequest",
    "Started",
    "WorkflowDone",
    "WorkflowStart",
]

Result = Literal["completed", "executed", "denied", "rejected", "failed", "halted"]


class WorkflowStart(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Start a workflow at an agent: the coordinator at the workflow's entry agent, or one
    agent asking another to take part (``Workflow.ask``). Answered with an `Outcome`.

    Attributes:
        kind: the payload's type name; picks the receiving agent's handler.
        body: the payload, msgpack-encoded (a msgspec Struct of the handler's argument type).
    """

    kind: str
    body: bytes


class Outcome(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """How an agent's part of a workflow ended, sent to whoever started it.

    Attributes:
        result: ``completed`` (the handler returned), ``denied`` (by policy), ``rejected``
            (an approver said no), ``failed`` (an error; see ``reasons``), ``halted`` (its
            model spend reached a cap, or a person stopped it; its state is saved).
        first_decision: governance's first answer to the workflow's first governed call:
            allow, deny or escalate; empty when it made none.
        reasons: why, for anything but ``completed``.
        approval_id: the approval the workflow waited for, if any.
        approved_by: who approved it.
        reflections: unusable model answers reflected on.
        governance_ms: intent-to-first-decision latency seen by the agent.
        model_calls: model calls made for the workflow, by this agent and the agents it
            asked; the coordinator checks the sum against the budget actor's count.
        shown: the workflow's first governed call as people see it: ``tool`` and the
            arguments the tool declares to show.
        value: the handler's return value, msgpack-encoded; empty when it returned None or
            did not return.
    """

    result: Result
    first_decision: str = ""
    reasons: tuple[str, ...] = ()
    approval_id: str = ""
    approved_by: str = ""
    reflections: int = 0
    governance_ms: float = 0.0
    model_calls: int = 0
    shown: dict[str, Any] = {}
    value: bytes = b""


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
