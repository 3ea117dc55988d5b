"""The policy decision point: a pure function from (policy set, intent, context) to a verdict.

Nothing here reads the clock, the environment or any state outside its arguments, so a
decision replayed from the audit log with the same inputs comes out byte-for-byte the same.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Final, Literal

import msgspec

from govmesh.governance._policy import OnExpiry, Policy, PolicySet
from govmesh.governance._rules import Condition, value_text
from govmesh.governance._rules import shown as _show

__all__ = [
    "NOT_A_PARTICIPANT",
    "OBLIGATION_AWAIT_APPROVAL",
    "OBLIGATION_RECORD_SPEND",
    "OVER_BUDGET_AUTHORITY",
    "UNKNOWN_WORKFLOW",
    "EvalContext",
    "Intent",
    "Outcome",
    "Verdict",
    "evaluate",
    "intent_hash",
    "spend_of",
]

Outcome = Literal["allow", "deny", "escalate"]

OBLIGATION_RECORD_SPEND: Final = "record_spend"
"""The enforcement point must add the intent's spend (`spend_of`) to the workflow's committed
spend and to the agent's spend for the UTC day (the figures behind ``EvalContext``)."""
OBLIGATION_AWAIT_APPROVAL: Final = "await_approval"
"""The intent may run only after the escalation target approves it."""


class Intent(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call an agent asks permission for.

    Attributes:
        agent: the requesting agent's id.
        role: the agent's role, from its verified identity token; selects the policies.
        tool: the tool to call.
        args: the tool arguments, as the tool's argument type converts to builtins.
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
        day_spend_usd: spend already committed by the requesting agent since 00:00 UTC of the
            day that contains ``now``; checked against ``daily_limit_usd`` and
            ``budget_authority_usd``. Where only the budget authority reads it, it is the
            figure governance decided on, and the decision stood because the true figure
            left the amount on the same side of the authority.
        recent_calls: tool calls the requesting agent made in the last
            ``PolicySet.rate_window_s(role)`` seconds, not counting this one; checked against
            ``rate_limit``.
        workflow_started: a start record of the deployment names the workflow.
        agent_named: that start record names the requesting agent.
        budget_authority_usd: the spend the agent's token allows it per UTC day, checked
            with ``day_spend_usd``; None where no token's authority applies (decisions
            recorded before it was cumulative).
        spend_args: the arguments the intent's tool declares as spend (`ToolTerms.spend`):
            the intent's spend is their sum, and nothing else counts toward spending limits,
            approval thresholds, the budget authority or ``record_spend``. None for
            decisions recorded before tools declared their spend, when ``amount_usd`` was
            the spend and a ``vendor`` had to be a string, so they replay as they were made.
    """

    reflections: int = 0
    workflow_spend_usd: float = 0.0
    now: float = 0.0
    day_spend_usd: float = 0.0
    recent_calls: int = 0
    workflow_started: bool = True
    agent_named: bool = True
    budget_authority_usd: float | None = None
    spend_args: tuple[str, ...] | None = None


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The decision on one intent.

    Attributes:
        outcome: ``"allow"``, ``"deny"`` or ``"escalate"``.
        reasons: why, one sentence each, in a deterministic order.
        obligations: what the enforcement point must do if it runs the call, e.g.
            ``("record_spend",)``.
        policy_hash: hash of the policy set that decided.
        escalation: who must approve, when the outcome is ``"escalate"``.
        approval_expiry_s: when the outcome is ``"escalate"``, seconds the approval may stay
            unanswered; otherwise ``None``. See ``PolicySet.approval_terms``.
        on_expiry: what an unanswered escalation becomes once its approval expires.
        refused: for a deny that is a security matter rather than a policy's, its reason
            (``unknown_workflow``, ``not_a_participant``, ``over_budget_authority``),
            reported as a security event.
    """

    outcome: Outcome
    reasons: tuple[str, ...]
    obligations: tuple[str, ...]
    policy_hash: str
    escalation: str | None = None
    approval_expiry_s: float | None = None
    on_expiry: OnExpiry = "deny"
    refused: str = ""


UNKNOWN_WORKFLOW: Final = "unknown_workflow"
NOT_A_PARTICIPANT: Final = "not_a_participant"
OVER_BUDGET_AUTHORITY: Final = "over_budget_authority"


_LEGACY_SPEND: Final = ("amount_usd",)
_VENDOR: Final = "vendor"
_ABSENT: Final = object()
_INF: Final = math.inf
_ALLOW_OBLIGATIONS: Final = (OBLIGATION_RECORD_SPEND,)
_ESCALATE_OBLIGATIONS: Final = (OBLIGATION_AWAIT_APPROVAL, OBLIGATION_RECORD_SPEND)
_ESCALATE_WITHOUT_SPEND: Final = (OBLIGATION_AWAIT_APPROVAL,)


def evaluate(policies: PolicySet, intent: Intent, ctx: EvalContext) -> Verdict:
    """Decide an intent under every policy for its role; default deny.

    Each policy denies when the tool is in its ``denied_tools``, when it lists
    ``allowed_tools`` and the tool is not among them, when the agent's recent calls have reached
    its rate limit, when the reflection count is over its cap, when it lists vendors (or values
    of another argument) and the intent gives none of them, when an argument has one of its
    ``denied_values``, when one of its ``deny_if`` conditions matches, when the spend plus the
    workflow's committed spend is over its limit, or when the spend plus the agent's spend
    today is over its daily limit; otherwise it escalates when the spend is over its approval
    threshold or one of its ``escalate_if`` conditions matches, and otherwise allows. Policies
    compose as deny over escalate over allow, so adding a policy for a role that already has
    one can only make its decisions stricter. Invalid inputs (a spend argument that is not a
    non-negative number, an argument a condition compares that is not a finite number or
    that it searches that is not a string, a negative or non-finite context figure) deny.

    The spend is the sum of the intent's ``ctx.spend_args`` it gives; an intent that gives
    none spends nothing and carries no ``record_spend`` obligation.

    A role with no policy is denied every tool. A tool is unknown to a role when some policy
    for the role lists ``allowed_tools`` without it, and is then denied; a role none of whose
    policies lists ``allowed_tools`` is restricted to the tools its identity token names,
    which the governance actor checks before the evaluator runs.

    Before any policy, an intent is denied for a workflow no start record names, or by an
    agent its start record does not name; and, with the other denials, when its spend plus
    the agent's spend today is over the budget authority of the agent's token.

    Args:
        policies: the compiled policy set in force.
        intent: the tool call asked for.
        ctx: workflow facts the decision depends on.

    Returns:
        The verdict, bound to ``policies.hash``.
    """
    if not (ctx.workflow_started and ctx.agent_named):
        return _not_started(policies, intent, ctx)
    rules = policies.for_agent(intent.role)
    if not rules:
        return Verdict(
            outcome="deny",
            reasons=(f"no policy for role {_show(intent.role)}",),
            obligations=(),
            policy_hash=policies.hash,
        )

    problems: list[str] = []
    args = intent.args
    amount: float | None = None
    spend_args = ctx.spend_args
    legacy = spend_args is None
    for name in _LEGACY_SPEND if spend_args is None else spend_args:
        raw = args.get(name, _ABSENT)
        if raw is _ABSENT:
            continue
        value = _non_negative(raw)
        if value is None:
            problems.append(f"{name} must be a non-negative number, got {_show(raw)}")
        else:
            amount = value if amount is None else amount + value
    vendor = args.get(_VENDOR)
    # Checked once here, not per policy: a list or a mapping cannot be looked up in a set.
    vendor_named = vendor is None or isinstance(vendor, str)
    if legacy and not vendor_named:
        problems.append(f"vendor must be a string, got {_show(vendor)}")
    spent, day_spent = ctx.workflow_spend_usd, ctx.day_spend_usd
    reflections, recent_calls = ctx.reflections, ctx.recent_calls
    # The context is almost always plain floats and ints; check that inline and keep the
    # function calls that explain a bad figure off the hot path.
    if not (
        type(spent) is float
        and 0.0 <= spent < _INF
        and type(day_spent) is float
        and 0.0 <= day_spent < _INF
    ):
        spent = _context_amount("workflow_spend_usd", spent, problems)
        day_spent = _context_amount("day_spend_usd", day_spent, problems)
    if not (
        type(reflections) is int
        and reflections >= 0
        and type(recent_calls) is int
        and recent_calls >= 0
    ):
        _check_count("reflections", reflections, problems)
        _check_count("recent_calls", recent_calls, problems)
    if problems:
        return Verdict(
            outcome="deny", reasons=tuple(problems), obligations=(), policy_hash=policies.hash
        )

    tool = intent.tool
    denials: list[str] = []
    refused = ""
    authority = ctx.budget_authority_usd
    if authority is not None and amount is not None and amount + day_spent > authority:
        refused = OVER_BUDGET_AUTHORITY
        denials.append(
            f"amount {_usd(amount)} plus spend today {_usd(day_spent)} "
            f"(total {_usd(amount + day_spent)}) exceeds the agent's budget authority "
            f"{_usd(authority)} a day"
        )
    escalations: list[str] = []
    escalation: str | None = None
    for policy in rules:
        # The plain fields first: most policies list no tools, and reading a field costs
        # half of building or fetching its set.
        if policy.denied_tools is not None and tool in policy.denied_tool_set:
            denials.append(f"tool {_show(tool)} is in denied_tools")
        if policy.allowed_tools is not None and tool not in policy.allowed_tool_set:
            denials.append(f"tool {_show(tool)} is not in allowed_tools")
        rate = policy.rate_limit
        if rate is not None and recent_calls >= rate.calls:
            window = _usd(rate.per_seconds)
            denials.append(
                f"{recent_calls} calls in the last {window} s reach "
                f"rate_limit of {rate.calls} per {window} s"
            )
        cap = policy.reflection_loop_cap
        if cap is not None and reflections > cap:
            denials.append(f"reflections {reflections} exceed reflection_loop_cap {cap}")
        vendors = policy.vendor_set
        if vendors is not None:
            if vendor is None:
                denials.append("no vendor given and the policy allows only listed vendors")
            elif not vendor_named or vendor not in vendors:
                denials.append(f"vendor {_show(vendor)} is not in allowed_vendors")
        if (
            policy.reads_args
            and _judge_args(policy, args, denials, escalations)
            and escalation is None
        ):
            escalation = policy.escalation
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
        daily = policy.daily_limit_usd
        if daily is not None and amount + day_spent > daily:
            denials.append(
                f"amount {_usd(amount)} plus spend today {_usd(day_spent)} "
                f"(total {_usd(amount + day_spent)}) exceeds daily_limit_usd {_usd(daily)}"
            )
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
            refused=refused,
        )
    if escalations:
        expiry, on_expiry = policies.approval_terms(intent.role)
        return Verdict(
            outcome="escalate",
            reasons=tuple(dict.fromkeys(escalations)),
            obligations=_ESCALATE_OBLIGATIONS if amount is not None else _ESCALATE_WITHOUT_SPEND,
            policy_hash=policies.hash,
            escalation=escalation,
            approval_expiry_s=expiry,
            on_expiry=on_expiry,
        )
    return Verdict(
        outcome="allow",
        reasons=policies.allow_reasons[intent.role],
        obligations=_ALLOW_OBLIGATIONS if amount is not None else (),
        policy_hash=policies.hash,
    )


def _judge_args(
    policy: Policy, args: dict[str, Any], denials: list[str], escalations: list[str]
) -> bool:
    """Add what the policy's rules on arguments say to ``denials`` and ``escalations``;
    return whether one of its ``escalate_if`` conditions matched."""
    for rule in policy.allowed_values:
        value = args.get(rule.arg, _ABSENT)
        if value is _ABSENT:
            denials.append(f"no {rule.arg} given and the policy allows only listed values")
        elif not rule.members(value):
            denials.append(f"{rule.arg} {_show(value)} is not in allowed_values")
    for rule in policy.denied_values:
        value = args.get(rule.arg, _ABSENT)
        if value is not _ABSENT and rule.members(value):
            denials.append(f"{rule.arg} {_show(value)} is in denied_values")
    for condition in policy.deny_if:
        _judge(condition, "deny_if", args, denials, denials)
    escalated = False
    for condition in policy.escalate_if:
        escalated |= _judge(condition, "escalate_if", args, escalations, denials)
    return escalated


def _judge(
    condition: Condition, kind: str, args: dict[str, Any], hits: list[str], denials: list[str]
) -> bool:
    """Add to ``hits`` why ``condition`` matches, or to ``denials`` why it cannot read its
    argument; return whether it matched."""
    value = args.get(condition.arg, _ABSENT)
    if value is _ABSENT:
        return False
    matched = condition.test(value)
    if matched is None:
        denials.append(
            f"{condition.arg} must be {condition.wants} for {kind} "
            f"{condition.op} {value_text(condition.value)}, got {_show(value)}"
        )
        return False
    if matched:
        fact = f"{condition.arg} {_show(value)} {condition.relation}"
        hits.append(f"{condition.reason}: {fact}" if condition.reason else f"{kind}: {fact}")
    return matched


def spend_of(args: dict[str, Any], spend_args: tuple[str, ...]) -> float | None:
    """The sum of the ``spend_args`` that ``args`` gives as numbers (a bool is not one), or
    None when it gives none of them; whether each is a valid amount is `evaluate`'s to say."""
    total: float | None = None
    for name in spend_args:
        raw = args.get(name)
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            total = float(raw) if total is None else total + float(raw)
    return total


def _not_started(policies: PolicySet, intent: Intent, ctx: EvalContext) -> Verdict:
    """The deny of an intent outside the workflows the deployment started."""
    workflow = _show(intent.workflow)
    if not ctx.workflow_started:
        refused, reason = UNKNOWN_WORKFLOW, f"workflow {workflow} was not started"
    else:
        refused = NOT_A_PARTICIPANT
        reason = f"agent {_show(intent.agent)} is not named in the start of workflow {workflow}"
    return Verdict(
        outcome="deny",
        reasons=(reason,),
        obligations=(),
        policy_hash=policies.hash,
        refused=refused,
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
    if isinstance(raw, float):
        value = float(raw)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        # bool is an int subclass, but True is not an amount of money.
        try:
            value = float(raw)
        except OverflowError:
            return None
    else:
        return None
    # NaN fails both comparisons.
    return value if 0.0 <= value < _INF else None


def _context_amount(name: str, raw: object, problems: list[str]) -> float:
    value = _non_negative(raw)
    if value is None:
        problems.append(f"{name} must be a non-negative number, got {raw!r}")
        return 0.0
    return value


def _check_count(name: str, raw: object, problems: list[str]) -> None:
    # bool is an int subclass, but True is not a count.
    if isinstance(raw, bool) or not isinstance(raw, int):
        problems.append(f"{name} must be a whole number, got {raw!r}")
    elif raw < 0:
        problems.append(f"{name} must not be negative, got {raw!r}")


def _usd(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
