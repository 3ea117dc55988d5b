"""The policy decision point: a pure function from (policy set, intent, context) to a verdict.

Nothing here reads the clock, the environment or any state outside its arguments, so a
decision replayed from the audit log with the same inputs comes out byte-for-byte the same.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Final, Literal

import msgspec

from govmesh.governance._policy import PolicySet

__all__ = [
    "OBLIGATION_AWAIT_APPROVAL",
    "OBLIGATION_RECORD_SPEND",
    "EvalContext",
    "Intent",
    "Outcome",
    "Verdict",
    "evaluate",
    "intent_hash",
]

Outcome = Literal["allow", "deny", "escalate"]

OBLIGATION_RECORD_SPEND: Final = "record_spend"
"""The enforcement point must add the intent's amount to the workflow's committed spend."""
OBLIGATION_AWAIT_APPROVAL: Final = "await_approval"
"""The intent may run only after the escalation target approves it."""


class Intent(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call an agent asks permission for.

    Attributes:
        agent: the requesting agent's id.
        role: the agent's role, from its verified identity token; selects the policies.
        tool: the tool to call.
        args: the tool arguments; ``amount_usd`` and ``vendor`` are what policy reads.
        workflow: the workflow the call belongs to.
        step: the step number within the workflow.
    """

    agent: str
    role: str
    tool: str
    args: dict[str, Any]
    workflow: str
    step: int


class EvalContext(msgspec.Struct, frozen=True, kw_only=True):
    """Facts about the workflow that a decision depends on, passed in rather than looked up.

    Attributes:
        reflections: reflection iterations the agent has used on this workflow so far.
        workflow_spend_usd: spend already committed (allowed or approved) on this workflow.
        now: unix time of the decision; an input so replays are exact.
    """

    reflections: int = 0
    workflow_spend_usd: float = 0.0
    now: float = 0.0


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The decision on one intent.

    Attributes:
        outcome: ``"allow"``, ``"deny"`` or ``"escalate"``.
        reasons: why, one sentence each, in a deterministic order.
        obligations: what the enforcement point must do if it runs the call, e.g.
            ``("record_spend",)``.
        policy_hash: hash of the policy set that decided.
        escalation: who must approve, when the outcome is ``"escalate"``.
    """

    outcome: Outcome
    reasons: tuple[str, ...]
    obligations: tuple[str, ...]
    policy_hash: str
    escalation: str | None = None


_AMOUNT: Final = "amount_usd"
_VENDOR: Final = "vendor"
_ABSENT: Final = object()
_SHOW_LIMIT: Final = 80
_ALLOW_OBLIGATIONS: Final = (OBLIGATION_RECORD_SPEND,)
_ESCALATE_OBLIGATIONS: Final = (OBLIGATION_AWAIT_APPROVAL, OBLIGATION_RECORD_SPEND)


def evaluate(policies: PolicySet, intent: Intent, ctx: EvalContext) -> Verdict:
    """Decide an intent under every policy for its role; default deny.

    Each policy denies when the reflection count is over its cap, when it lists vendors and the
    intent names none of them, or when the amount plus the workflow's committed spend is over its
    limit; otherwise it escalates when the amount is over its approval threshold, and otherwise
    allows. Policies compose as deny over escalate over allow, so adding a policy for a role that
    already has one can only make its decisions stricter. Invalid inputs (a non-numeric or
    negative amount, a non-string vendor, a negative or non-finite context figure) deny.

    Args:
        policies: the compiled policy set in force.
        intent: the tool call asked for.
        ctx: workflow facts the decision depends on.

    Returns:
        The verdict, bound to ``policies.hash``.
    """
    rules = policies.for_agent(intent.role)
    if not rules:
        return Verdict(
            outcome="deny",
            reasons=(f"no policy for role {_show(intent.role)}",),
            obligations=(),
            policy_hash=policies.hash,
        )

    problems: list[str] = []
    amount: float | None = None
    raw_amount = intent.args.get(_AMOUNT, _ABSENT)
    if raw_amount is not _ABSENT:
        amount = _non_negative(raw_amount)
        if amount is None:
            problems.append(f"amount_usd must be a non-negative number, got {_show(raw_amount)}")
    vendor = intent.args.get(_VENDOR)
    if vendor is not None and not isinstance(vendor, str):
        problems.append(f"vendor must be a string, got {_show(vendor)}")
    spent = _non_negative(ctx.workflow_spend_usd)
    if spent is None:
        problems.append(
            f"workflow_spend_usd must be a non-negative number, got {ctx.workflow_spend_usd!r}"
        )
        spent = 0.0
    if isinstance(ctx.reflections, bool) or not isinstance(ctx.reflections, int):
        problems.append(f"reflections must be a whole number, got {ctx.reflections!r}")
    elif ctx.reflections < 0:
        problems.append(f"reflections must not be negative, got {ctx.reflections!r}")
    if problems:
        return Verdict(
            outcome="deny", reasons=tuple(problems), obligations=(), policy_hash=policies.hash
        )

    denials: list[str] = []
    escalations: list[str] = []
    escalation: str | None = None
    for policy in rules:
        cap = policy.reflection_loop_cap
        if cap is not None and ctx.reflections > cap:
            denials.append(f"reflections {ctx.reflections} exceed reflection_loop_cap {cap}")
        vendors = policy.vendor_set
        if vendors is not None:
            if vendor is None:
                denials.append("no vendor given and the policy allows only listed vendors")
            elif vendor not in vendors:
                denials.append(f"vendor {_show(vendor)} is not in allowed_vendors")
        if amount is None:
            continue
        limit = policy.spending_limit_usd
        if limit is not None and amount + spent > limit:
            if spent:
                denials.append(
                    f"amount {_usd(amount)} plus workflow spend {_usd(spent)} "
                    f"(total {_usd(amount + spent)}) exceeds spending_limit_usd {_usd(limit)}"
                )
            else:
                denials.append(f"amount {_usd(amount)} exceeds spending_limit_usd {_usd(limit)}")
        threshold = policy.require_approval_if_over
        if threshold is not None and amount > threshold:
            escalations.append(
                f"amount {_usd(amount)} is over require_approval_if_over {_usd(threshold)}"
            )
            if escalation is None:
                # Rules are in canonical order, so the first target is a stable choice.
                escalation = policy.escalation

    if denials:
        return Verdict(
            outcome="deny",
            reasons=tuple(dict.fromkeys(denials)),
            obligations=(),
            policy_hash=policies.hash,
        )
    if escalations:
        return Verdict(
            outcome="escalate",
            reasons=tuple(dict.fromkeys(escalations)),
            obligations=_ESCALATE_OBLIGATIONS,
            policy_hash=policies.hash,
            escalation=escalation,
        )
    count = len(rules)
    return Verdict(
        outcome="allow",
        reasons=(
            f"allowed by {count} {'policy' if count == 1 else 'policies'} "
            f"for role {_show(intent.role)}",
        ),
        obligations=_ALLOW_OBLIGATIONS if amount is not None else (),
        policy_hash=policies.hash,
    )


_INTENT_DOMAIN: Final = b"govmesh.intent/1\n"
# msgpack rather than JSON: it keeps NaN distinct from null and int keys distinct from str keys,
# and a tuple and a list (which become each other across the bus codec) encode alike.
_INTENT_ENCODER: Final = msgspec.msgpack.Encoder(order="sorted")


def intent_hash(intent: Intent) -> str:
    """Return the sha256 hex digest binding a decision to this exact call.

    Covers tool, args (dict keys sorted at every depth), workflow, step and agent, encoded
    canonically, so the digest is the same in every process and after a bus round trip.

    Raises:
        TypeError: ``args`` holds a value with no canonical encoding (e.g. an arbitrary object
            or a dict with non-string keys).
    """
    try:
        body = _INTENT_ENCODER.encode(
            (intent.tool, intent.args, intent.workflow, intent.step, intent.agent)
        )
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"intent args have no canonical encoding: {exc}") from exc
    return hashlib.sha256(_INTENT_DOMAIN + body).hexdigest()


def _non_negative(raw: object) -> float | None:
    # bool is an int subclass, but True is not an amount of money.
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    try:
        value = float(raw)
    except OverflowError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _usd(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _show(value: object) -> str:
    # Arguments come from a model; keep a hostile megabyte string out of the audit trail.
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."
