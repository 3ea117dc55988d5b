"""Message bodies of the governance path: intents, decisions, approvals."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "ApprovalAnswer",
    "ApprovalListing",
    "ApprovalQuery",
    "ApprovalRequest",
    "ApprovalResult",
    "Decision",
    "SettledApproval",
    "StartRecord",
    "StartRecorded",
    "ToolIntent",
]

Outcome = Literal["allow", "deny", "escalate"]


class ToolIntent(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An agent asks to call ``tool`` with ``args`` at ``step`` of its workflow.

    The agent and role come from the sender's verified token and the workflow from the
    envelope, never from the body, so an agent cannot ask in another's name.
    """

    tool: str
    args: dict[str, Any]
    step: int
    reflections: int = 0


class Decision(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Governance's signed answer to one intent, bound to the intent's hash.

    Attributes:
        final: False for an escalation, which a final decision follows once answered.
        approval_expires_at: for an escalation, when its approval lapses and the policy's
            default (``on_expiry``) decides instead; the agent waits until then.
    """

    intent_id: str
    intent_hash: str
    workflow: str
    agent: str
    outcome: Outcome
    reasons: tuple[str, ...] = ()
    obligations: tuple[str, ...] = ()
    policy_hash: str
    expires_at: float
    final: bool = True
    approval_id: str = ""
    approved_by: str = ""
    approval_expires_at: float = 0.0


class ApprovalRequest(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An escalated intent waiting for a human.

    Attributes:
        role, step, reflections: what governance needs to decide the intent again when
            it is approved, since spend may have moved while it waited.
        expires_at: when the request lapses unanswered (0: never).
        on_expiry: what it becomes then, by the policy in force when it was escalated.
        trace: the workflow's trace context, so the decision that ends the wait, perhaps
            days later, continues the same trace.
        budget_authority_usd: the budget authority of the agent's token when it asked,
            checked again on the day's spend when the request is approved (None for
            requests stored before it was kept).
        shown: the arguments people see, as the tool declares them (`ToolTerms.show`):
            what ``approvals list``, watch and reports print; empty for requests stored
            before it was kept, which show ``args``.
    """

    approval_id: str
    workflow: str
    agent: str
    tool: str
    args: dict[str, Any]
    intent_id: str
    intent_hash: str
    reasons: tuple[str, ...]
    escalation: str
    policy_hash: str
    requested_at: float
    role: str = ""
    step: int = 0
    reflections: int = 0
    expires_at: float = 0.0
    on_expiry: Literal["allow", "deny"] = "deny"
    trace: str = ""
    budget_authority_usd: float | None = None
    shown: dict[str, Any] = {}


class ApprovalAnswer(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An operator's signed answer to an approval request."""

    approval_id: str
    approved: bool
    by: str
    reason: str = ""


class ApprovalResult(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Governance's reply to an operator who answered an approval request.

    Attributes:
        found: the request was pending; False when it is unknown or already settled
            (answered by someone else, or expired), and then nothing changed.
        outcome: the final decision now sent to the workflow; an approval can still end in
            ``deny`` when the limits no longer leave room for it.
        reasons: the final decision's reasons.
        by: whose answer settled it (another operator's, if theirs was first).
    """

    approval_id: str
    found: bool
    outcome: Outcome | None = None
    reasons: tuple[str, ...] = ()
    by: str = ""


class ApprovalQuery(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An operator asks governance for the approvals (``ctl.governance``), so operator
    tools need no access to Redis.

    Attributes:
        settled_prefix: also list the settled approvals whose id starts with it (lowercase
            hex); empty lists none.
    """

    settled_prefix: str = ""


class SettledApproval(msgspec.Struct, frozen=True, kw_only=True):
    """How an approval was settled, as an operator is told.

    Attributes:
        approved: the answer that settled it approved.
        by: who answered (``policy`` when it expired).
        expired: it lapsed unanswered and the policy's default settled it.
        outcome: the final decision sent to the workflow.
    """

    approval_id: str
    approved: bool
    by: str
    expired: bool
    outcome: Outcome


class ApprovalListing(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Governance's answer to an `ApprovalQuery`.

    Attributes:
        pending: every pending approval, oldest first.
        settled: the settled approvals the query's prefix matched.
    """

    pending: tuple[ApprovalRequest, ...]
    settled: tuple[SettledApproval, ...] = ()


class StartRecord(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The coordinator's signed record that it started ``workflow``: governance decides the
    workflow's intents only once it holds one, and only for the agents it names.

    The workflow is the envelope's, as for an intent.
    """

    agents: tuple[str, ...]


class StartRecorded(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Governance's reply to a `StartRecord`: every governance actor of the tenant now
    decides the workflow's intents."""

    workflow: str
