"""Message bodies exchanged between agents and the swarm coordinator."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["InFlight", "Outcome", "Result", "WorkflowStart"]

Result = Literal["completed", "denied", "rejected", "failed", "halted"]


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
        reasons: why it ended so; for a ``completed`` workflow, why the approval it waited
            for let it go on (a person's answer, or the policy's default when it lapsed).
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


class InFlight(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow start an agent has taken on and not answered yet, kept in Redis so a
    restarted agent finds it again.

    Attributes:
        start: the start.
        requester: who sent it, and gets the outcome.
        causation: the start's message id, which the outcome answers.
        trace: the workflow's trace context.
    """

    start: WorkflowStart
    requester: str
    causation: str
    trace: str = ""
