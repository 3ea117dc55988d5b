"""The evaluator: worked cases, laws (determinism, default deny, monotonicity) and a reference."""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from govmesh.governance import (
    DEFAULT_APPROVAL_EXPIRY_S,
    OBLIGATION_AWAIT_APPROVAL,
    OBLIGATION_RECORD_SPEND,
    EvalContext,
    Intent,
    Policy,
    PolicySet,
    RateLimit,
    Verdict,
    evaluate,
    intent_hash,
    load_policies,
    load_policy_file,
    parse_policy_text,
)
from govmesh.governance._rules import ArgValues, Condition, Scalar, value_order

from _depth import examples
from _policies import EXPENSES as EXPENSES_TEXT

ROLE = "Procurement-Agent-v2"
SEED_FILE = Path(__file__).resolve().parents[1] / "policies" / "procurement-agent-v2.yaml"
SEED = load_policy_file(SEED_FILE)
STRICT_FILE = SEED_FILE.with_name("procurement-strict.yaml")
SEED_AND_STRICT = load_policies([SEED_FILE, STRICT_FILE])
CREATE_PO = "erp.create_purchase_order"
RANK = {"allow": 0, "escalate": 1, "deny": 2}


def purchase(
    role: str = ROLE, step: int = 1, tool: str = "create_purchase_order", **args: Any
) -> Intent:
    return Intent(
        agent="agent-7",
        role=role,
        tool=tool,
        args=args,
        workflow="wf-1",
        step=step,
    )


@pytest.mark.parametrize(
    ("args", "ctx", "outcome", "reason"),
    [
        ({"vendor": "Vendor_A", "amount_usd": 3000}, EvalContext(), "allow", "allowed by 1 policy"),
        (
            {"vendor": "Vendor_A", "amount_usd": 7000},
            EvalContext(),
            "escalate",
            "amount 7000 is over require_approval_if_over 5000",
        ),
        (
            {"vendor": "Vendor_C", "amount_usd": 100},
            EvalContext(),
            "deny",
            "vendor 'Vendor_C' is not in allowed_vendors",
        ),
        (
            {"vendor": "Vendor_A", "amount_usd": 12000},
            EvalContext(),
            "deny",
            "amount 12000 exceeds spending_limit_usd 10000",
        ),
        (
            {"vendor": "Vendor_B", "amount_usd": 100},
            EvalContext(reflections=26),
            "deny",
            "reflections 26 exceed reflection_loop_cap 25",
        ),
        ({"vendor": "Vendor_B", "amount_usd": 100}, EvalContext(reflections=25), "allow", ""),
        ({"vendor": "Vendor_A", "amount_usd": 5000}, EvalContext(), "allow", ""),
        ({"vendor": "Vendor_A", "amount_usd": 5000.01}, EvalContext(), "escalate", "5000.01"),
        (
            {"vendor": "Vendor_A", "amount_usd": 6000},
            EvalContext(workflow_spend_usd=4000),
            "escalate",
            "",
        ),
        ({"vendor": "Vendor_A", "amount_usd": 10000}, EvalContext(), "escalate", ""),
        ({"vendor": "Vendor_A", "amount_usd": 10000.5}, EvalContext(), "deny", "10000.5"),
    ],
    ids=[
        "3000_allow",
        "7000_escalate",
        "vendor_c_deny",
        "12000_deny",
        "26_reflections_deny",
        "25_reflections_allow",
        "threshold_itself_allow",
        "just_over_threshold_escalate",
        "within_limit_with_spend_escalate",
        "limit_itself_escalate",
        "just_over_limit_deny",
    ],
)
def test_worked_cases_of_the_seed_policy(
    args: dict[str, Any], ctx: EvalContext, outcome: str, reason: str
) -> None:
    verdict = evaluate(SEED, purchase(**args), ctx)

    assert verdict.outcome == outcome
    assert reason in " | ".join(verdict.reasons)
    assert verdict.policy_hash == SEED.hash


def test_allow_with_an_amount_obliges_recording_the_spend() -> None:
    verdict = evaluate(SEED, purchase(vendor="Vendor_A", amount_usd=3000), EvalContext())

    assert verdict == Verdict(
        outcome="allow",
        reasons=(f"allowed by 1 policy for role {ROLE!r}",),
        obligations=(OBLIGATION_RECORD_SPEND,),
        policy_hash=SEED.hash,
    )


def test_escalation_goes_to_the_policy_target_and_awaits_approval() -> None:
    verdict = evaluate(SEED, purchase(vendor="Vendor_A", amount_usd=7000), EvalContext())

    assert verdict.escalation == "human_review"
    assert verdict.obligations == (OBLIGATION_AWAIT_APPROVAL, OBLIGATION_RECORD_SPEND)


def test_deny_has_no_obligations_and_no_escalation() -> None:
    verdict = evaluate(SEED, purchase(vendor="Vendor_C", amount_usd=100), EvalContext())

    assert verdict.obligations == ()
    assert verdict.escalation is None


def test_unknown_role_is_denied_by_default() -> None:
    verdict = evaluate(
        SEED, purchase(role="Intern-Agent", vendor="Vendor_A", amount_usd=1), EvalContext()
    )

    assert verdict.outcome == "deny"
    assert verdict.reasons == ("no policy for role 'Intern-Agent'",)


def test_role_not_agent_id_selects_the_policy() -> None:
    intent = Intent(
        agent=ROLE, role="Other", tool="t", args={"vendor": "Vendor_A"}, workflow="w", step=0
    )

    assert evaluate(SEED, intent, EvalContext()).outcome == "deny"


def test_empty_policy_set_denies_everything() -> None:
    verdict = evaluate(load_policies([]), purchase(vendor="Vendor_A", amount_usd=1), EvalContext())

    assert verdict.outcome == "deny"


def test_split_purchases_are_caught_by_committed_workflow_spend() -> None:
    spent = 0.0
    outcomes = []
    for step in range(1, 4):
        verdict = evaluate(
            SEED,
            purchase(step=step, vendor="Vendor_A", amount_usd=4000),
            EvalContext(workflow_spend_usd=spent),
        )
        outcomes.append(verdict.outcome)
        if OBLIGATION_RECORD_SPEND in verdict.obligations and verdict.outcome == "allow":
            spent += 4000

    assert outcomes == ["allow", "allow", "deny"]
    assert verdict.reasons == (
        "amount 4000 plus workflow spend 8000 (total 12000) exceeds spending_limit_usd 10000",
    )


def test_call_without_amount_is_not_spend() -> None:
    verdict = evaluate(SEED, purchase(vendor="Vendor_B"), EvalContext(workflow_spend_usd=10000))

    assert verdict.outcome == "allow"
    assert verdict.obligations == ()


def test_missing_vendor_is_denied_when_vendors_are_restricted() -> None:
    verdict = evaluate(SEED, purchase(amount_usd=10), EvalContext())

    assert verdict.outcome == "deny"
    assert "no vendor given" in verdict.reasons[0]


def test_vendor_names_match_exactly() -> None:
    verdict = evaluate(SEED, purchase(vendor="vendor_a", amount_usd=10), EvalContext())

    assert verdict.outcome == "deny"


@pytest.mark.parametrize(
    "amount",
    ["3000", True, False, None, -1, -0.01, math.nan, math.inf, 10**400, [3000], {"usd": 1}],
    ids=repr,
)
def test_non_numeric_or_negative_amount_is_denied_with_the_value(amount: object) -> None:
    verdict = evaluate(SEED, purchase(vendor="Vendor_A", amount_usd=amount), EvalContext())

    assert verdict.outcome == "deny"
    assert verdict.reasons[0].startswith("amount_usd must be a non-negative number, got ")
    assert repr(amount)[:20] in verdict.reasons[0]


def test_non_string_vendor_is_denied() -> None:
    verdict = evaluate(SEED, purchase(vendor=["Vendor_A"], amount_usd=1), EvalContext())

    assert verdict.reasons == ("vendor must be a string, got ['Vendor_A']",)


def test_hostile_long_argument_is_truncated_in_reasons() -> None:
    verdict = evaluate(SEED, purchase(vendor="X" * 1_000_000, amount_usd=1), EvalContext())

    assert verdict.outcome == "deny"
    assert len(verdict.reasons[0]) < 200


@pytest.mark.parametrize(
    "ctx",
    [
        EvalContext(workflow_spend_usd=math.nan),
        EvalContext(workflow_spend_usd=-1.0),
        EvalContext(workflow_spend_usd=math.inf),
        EvalContext(reflections=-1),
    ],
    ids=repr,
)
def test_invalid_context_fails_closed(ctx: EvalContext) -> None:
    verdict = evaluate(SEED, purchase(vendor="Vendor_A", amount_usd=1), ctx)

    assert verdict.outcome == "deny"


def test_integer_workflow_spend_is_accepted() -> None:
    ctx = EvalContext(workflow_spend_usd=8000)  # msgspec does not coerce on construction

    assert evaluate(SEED, purchase(vendor="Vendor_A", amount_usd=4000), ctx).outcome == "deny"


def test_evaluate_does_not_change_its_inputs() -> None:
    args: dict[str, Any] = {"vendor": "Vendor_A", "amount_usd": 3000, "lines": [{"sku": 1}]}
    intent = purchase(**args)
    before = msgspec.msgpack.encode(intent)

    evaluate(SEED, intent, EvalContext())

    assert msgspec.msgpack.encode(intent) == before


EXTRA = """\
policy:
  agent: Procurement-Agent-v2
  spending_limit_usd: 2000
  require_approval_if_over: 1000
  allowed_vendors: [Vendor_B]
  escalation: cfo_review
"""


def test_several_policies_for_a_role_compose_deny_over_escalate() -> None:
    both = parse_policy_text(SEED_FILE.read_text() + "---\n" + EXTRA)

    verdict = evaluate(both, purchase(vendor="Vendor_A", amount_usd=3000), EvalContext())

    assert verdict.outcome == "deny"
    assert set(verdict.reasons) == {
        "vendor 'Vendor_A' is not in allowed_vendors",
        "amount 3000 exceeds spending_limit_usd 2000",
    }


def test_several_policies_escalate_when_one_escalates_and_none_denies() -> None:
    both = parse_policy_text(SEED_FILE.read_text() + "---\n" + EXTRA)

    verdict = evaluate(both, purchase(vendor="Vendor_B", amount_usd=1500), EvalContext())

    assert verdict.outcome == "escalate"
    assert verdict.escalation == "cfo_review"
    assert verdict.reasons == ("amount 1500 is over require_approval_if_over 1000",)


def test_composed_verdict_does_not_depend_on_file_order(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(EXTRA.replace("2000", "20000"), encoding="utf-8")
    forward = load_policies([SEED_FILE, extra])
    backward = load_policies([extra, SEED_FILE, extra])
    intent = purchase(vendor="Vendor_B", amount_usd=7000)

    assert forward.hash == backward.hash
    assert evaluate(forward, intent, EvalContext()) == evaluate(backward, intent, EvalContext())
    assert len(evaluate(forward, intent, EvalContext()).reasons) == 2


def test_identical_reasons_from_several_policies_appear_once() -> None:
    twins = parse_policy_text(SEED_FILE.read_text() + "---\n" + EXTRA.replace("2000", "20000"))

    verdict = evaluate(twins, purchase(vendor="Vendor_C", amount_usd=1), EvalContext())

    assert verdict.reasons == ("vendor 'Vendor_C' is not in allowed_vendors",)


# --- tools, daily limit, rate limit, approval expiry -----------------------------------------


def test_seed_policy_does_not_restrict_its_procurement_tool() -> None:
    verdict = evaluate(
        SEED, purchase(tool=CREATE_PO, vendor="Vendor_A", amount_usd=3000), EvalContext()
    )

    assert verdict.outcome == "allow"


def test_seed_escalation_carries_the_default_approval_terms() -> None:
    verdict = evaluate(SEED, purchase(vendor="Vendor_A", amount_usd=7000), EvalContext())

    assert verdict.approval_expiry_s == DEFAULT_APPROVAL_EXPIRY_S
    assert verdict.on_expiry == "deny"


@pytest.mark.parametrize(
    ("tool", "args", "ctx", "outcome", "reasons"),
    [
        (CREATE_PO, {"vendor": "Vendor_A", "amount_usd": 3000}, EvalContext(), "allow", None),
        (
            CREATE_PO,
            {"vendor": "Vendor_A", "amount_usd": 7000},
            EvalContext(),
            "escalate",
            ("amount 7000 is over require_approval_if_over 5000",),
        ),
        (
            CREATE_PO,
            {"vendor": "Vendor_A", "amount_usd": 12000},
            EvalContext(),
            "deny",
            ("amount 12000 exceeds spending_limit_usd 10000",),
        ),
        (
            "erp.delete_vendor",
            {"vendor": "Vendor_A"},
            EvalContext(),
            "deny",
            ("tool 'erp.delete_vendor' is not in allowed_tools",),
        ),
        (
            CREATE_PO,
            {"vendor": "Vendor_A", "amount_usd": 3000},
            EvalContext(day_spend_usd=47000.0),
            "allow",
            None,
        ),
        (
            CREATE_PO,
            {"vendor": "Vendor_A", "amount_usd": 3000},
            EvalContext(day_spend_usd=47000.5),
            "deny",
            ("amount 3000 plus spend today 47000.5 (total 50000.5) exceeds daily_limit_usd 50000",),
        ),
        (
            CREATE_PO,
            {"vendor": "Vendor_A", "amount_usd": 7000},
            EvalContext(day_spend_usd=45000.0),
            "deny",
            ("amount 7000 plus spend today 45000 (total 52000) exceeds daily_limit_usd 50000",),
        ),
        (CREATE_PO, {"vendor": "Vendor_A"}, EvalContext(recent_calls=119), "allow", None),
        (
            CREATE_PO,
            {"vendor": "Vendor_A"},
            EvalContext(recent_calls=120),
            "deny",
            ("120 calls in the last 60 s reach rate_limit of 120 per 60 s",),
        ),
        (
            "erp.delete_vendor",
            {"vendor": "Vendor_C", "amount_usd": 7000},
            EvalContext(recent_calls=500),
            "deny",
            (
                "tool 'erp.delete_vendor' is not in allowed_tools",
                "500 calls in the last 60 s reach rate_limit of 120 per 60 s",
                "vendor 'Vendor_C' is not in allowed_vendors",
            ),
        ),
    ],
    ids=[
        "3000_allow",
        "7000_escalate",
        "12000_deny",
        "other_tool_deny",
        "day_limit_reached_exactly_allow",
        "day_limit_passed_deny",
        "day_limit_beats_escalation",
        "119_recent_calls_allow",
        "120_recent_calls_deny",
        "every_reason_at_once",
    ],
)
def test_strict_example_composes_with_the_seed_deny_over_escalate_over_allow(
    tool: str,
    args: dict[str, Any],
    ctx: EvalContext,
    outcome: str,
    reasons: tuple[str, ...] | None,
) -> None:
    verdict = evaluate(SEED_AND_STRICT, purchase(tool=tool, **args), ctx)

    assert verdict.outcome == outcome
    if reasons is not None:
        assert set(verdict.reasons) == set(reasons)
        assert len(verdict.reasons) == len(reasons)
    assert verdict.policy_hash == SEED_AND_STRICT.hash


def test_strict_example_shortens_the_approval_of_seed_escalations() -> None:
    intent = purchase(tool=CREATE_PO, vendor="Vendor_A", amount_usd=7000)

    verdict = evaluate(SEED_AND_STRICT, intent, EvalContext())

    assert verdict.escalation == "human_review"
    assert verdict.approval_expiry_s == 3600.0
    assert verdict.on_expiry == "deny"
    assert verdict.obligations == (OBLIGATION_AWAIT_APPROVAL, OBLIGATION_RECORD_SPEND)


def test_allow_and_deny_carry_no_approval_expiry() -> None:
    for amount in (3000, 12000):
        verdict = evaluate(
            SEED_AND_STRICT,
            purchase(tool=CREATE_PO, vendor="Vendor_A", amount_usd=amount),
            EvalContext(),
        )

        assert verdict.approval_expiry_s is None
        assert verdict.on_expiry == "deny"


def test_strict_example_tells_the_caller_the_rate_window() -> None:
    assert SEED_AND_STRICT.rate_window_s(ROLE) == 60.0
    assert SEED.rate_window_s(ROLE) is None


def test_split_purchases_hit_the_daily_limit_across_workflows() -> None:
    outcomes = []
    day_spend = 0.0
    for workflow in range(15):
        verdict = evaluate(
            SEED_AND_STRICT,
            purchase(tool=CREATE_PO, step=workflow, vendor="Vendor_B", amount_usd=4000),
            EvalContext(day_spend_usd=day_spend),
        )
        outcomes.append(verdict.outcome)
        if verdict.outcome == "allow":
            day_spend += 4000

    assert outcomes == ["allow"] * 12 + ["deny"] * 3
    assert "exceeds daily_limit_usd 50000" in verdict.reasons[0]


DENYLIST = """\
policy:
  agent: Procurement-Agent-v2
  denied_tools: [erp.delete_vendor, mail.send]
"""


def test_denied_tools_deny_whatever_else_allows() -> None:
    policies = parse_policy_text(SEED_FILE.read_text() + "---\n" + DENYLIST)

    denied = evaluate(policies, purchase(tool="mail.send", vendor="Vendor_A"), EvalContext())
    allowed = evaluate(policies, purchase(tool=CREATE_PO, vendor="Vendor_A"), EvalContext())

    assert denied.outcome == "deny"
    assert denied.reasons == ("tool 'mail.send' is in denied_tools",)
    assert allowed.outcome == "allow"


def test_a_role_whose_policies_all_list_tools_is_denied_any_other_tool() -> None:
    verdict = evaluate(
        SEED_AND_STRICT, purchase(tool="shell.exec", vendor="Vendor_A"), EvalContext()
    )

    assert verdict.outcome == "deny"
    assert verdict.reasons == ("tool 'shell.exec' is not in allowed_tools",)


def test_rate_limit_of_zero_calls_denies_every_call() -> None:
    policies = parse_policy_text(
        "policy: {agent: Auditor, rate_limit: {calls: 0, per_seconds: 1}}\n"
    )
    intent = purchase(role="Auditor")

    assert evaluate(policies, intent, EvalContext()).outcome == "deny"


def test_on_expiry_allow_needs_every_policy_of_the_role() -> None:
    lenient = "policy: {agent: Procurement-Agent-v2, on_expiry: allow, approval_expiry_s: 60}\n"
    intent = purchase(vendor="Vendor_A", amount_usd=7000)

    alone = evaluate(
        parse_policy_text(SEED_FILE.read_text() + "---\n" + lenient), intent, EvalContext()
    )
    seed_lenient = parse_policy_text(
        SEED_FILE.read_text().replace("human_review", "human_review\n  on_expiry: allow")
        + "---\n"
        + lenient
    )
    both = evaluate(seed_lenient, intent, EvalContext())

    assert (alone.outcome, alone.approval_expiry_s, alone.on_expiry) == ("escalate", 60.0, "deny")
    assert (both.outcome, both.approval_expiry_s, both.on_expiry) == ("escalate", 60.0, "allow")


@pytest.mark.parametrize(
    "ctx",
    [
        EvalContext(day_spend_usd=math.nan),
        EvalContext(day_spend_usd=-1.0),
        EvalContext(day_spend_usd=math.inf),
        EvalContext(recent_calls=-1),
        EvalContext(recent_calls=True),
        EvalContext(recent_calls=1.5),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_invalid_new_context_figures_fail_closed_and_say_why(ctx: EvalContext) -> None:
    verdict = evaluate(SEED, purchase(vendor="Vendor_A", amount_usd=1), ctx)

    assert verdict.outcome == "deny"
    assert verdict.reasons[0].startswith(("day_spend_usd must", "recent_calls must"))


def test_integer_day_spend_is_accepted() -> None:
    ctx = EvalContext(day_spend_usd=48000)

    verdict = evaluate(
        SEED_AND_STRICT, purchase(tool=CREATE_PO, vendor="Vendor_A", amount_usd=4000), ctx
    )

    assert verdict.outcome == "deny"
    assert "daily_limit_usd" in verdict.reasons[0]


# --- intent hash ------------------------------------------------------------------------------


def test_intent_hash_is_pinned_sha256_hex() -> None:
    intent = purchase(vendor="Vendor_A", amount_usd=3000)

    # Pinned: decisions in the audit log are bound to this digest across releases.
    assert intent_hash(intent) == "7dc6414d377f510306790d3814041c3c05fad07a294499feb3acca2d24b00519"


def test_intent_hash_ignores_dict_key_order_at_every_depth() -> None:
    first = purchase(vendor="Vendor_A", amount_usd=3000, meta={"b": 1, "a": {"y": 2, "x": 3}})
    second = purchase(meta={"a": {"x": 3, "y": 2}, "b": 1}, amount_usd=3000, vendor="Vendor_A")

    assert intent_hash(first) == intent_hash(second)


def test_intent_hash_survives_a_bus_round_trip() -> None:
    intent = purchase(vendor="Vendor_A", amount_usd=3000.5, lines=("a", "b"), tags={"x"})
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(intent), type=Intent)

    assert decoded.args["lines"] == ["a", "b"]
    assert intent_hash(decoded) == intent_hash(intent)


@pytest.mark.parametrize(
    "change",
    [
        {"tool": "delete_vendor"},
        {"args": {"vendor": "Vendor_A", "amount_usd": 3001}},
        {"args": {"vendor": "Vendor_A", "amount_usd": 3000.0}},
        {"args": {"vendor": "Vendor_A", "amount_usd": 3000, "note": None}},
        {"workflow": "wf-2"},
        {"step": 2},
        {"agent": "agent-8"},
    ],
    ids=repr,
)
def test_intent_hash_changes_with_any_bound_field(change: dict[str, Any]) -> None:
    intent = purchase(vendor="Vendor_A", amount_usd=3000)

    assert intent_hash(msgspec.structs.replace(intent, **change)) != intent_hash(intent)


def test_intent_hash_keeps_nan_distinct_from_null() -> None:
    assert intent_hash(purchase(x=math.nan)) != intent_hash(purchase(x=None))


def test_intent_hash_is_stable_across_processes() -> None:
    script = (
        "from govmesh.governance import Intent, intent_hash\n"
        "print(intent_hash(Intent(agent='a', role='r', tool='t', workflow='w', step=3,"
        " args={'set': {'p', 'q', 'r', 's'}, 'z': 1, 'a': {'k': [1.5, 'x']}})))\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }

    assert len(digests) == 1
    (digest,) = digests
    assert len(digest) == 64


@pytest.mark.parametrize("args", [{"x": object()}, {"x": {1: "int key"}}], ids=repr)
def test_intent_hash_rejects_arguments_without_a_canonical_encoding(
    args: dict[str, Any],
) -> None:
    with pytest.raises(TypeError, match="no canonical encoding"):
        intent_hash(purchase(**args))


# --- properties -------------------------------------------------------------------------------

AGENTS = [ROLE, "Auditor", "Negotiator"]
VENDORS = ["Vendor_A", "Vendor_B", "Vendor_C"]
BOUNDARIES = [0, 1, 1000, 3000, 4000, 5000, 5000.01, 6000, 7000, 10000, 12000]
LIMITS = st.sampled_from(BOUNDARIES) | st.integers(min_value=0, max_value=20000)
AMOUNTS = (
    st.sampled_from(BOUNDARIES)
    | st.integers(min_value=0, max_value=20000)
    | st.floats(min_value=0, max_value=20000, allow_nan=False)
)
INVALID_AMOUNTS = st.sampled_from(["100", True, None, -1, -0.5, math.nan, math.inf, [1]])
MISSING = object()
TOOLS = [CREATE_PO, "erp.get_quote", "mail.send"]
# Listed by no policy the strategies draw: the "unknown tool" of the default-deny law.
UNLISTED_TOOL = "shell.exec"
SPENDS = st.sampled_from([0.0, 4000.0, 8000.0, 10000.0]) | st.floats(
    min_value=0, max_value=20000, allow_nan=False
)


# Rules on arguments. `vendor` is left to allowed_vendors: allowed_values for it is its sugar.
RULE_ARGS = ["category", "memo", "qty"]
NUMBERS = [-1.0, 0.0, 1.0, 2.5, 1000.0]
VALUES: list[Scalar] = ["travel", "meals", "gift_cards", "1", 1.0, 2.5, True, False]
# Patterns that mean the same to RE2 and to Python's re, which the reference uses.
PATTERNS = ["(?i)cash advance", "^lunch$", "a|b", "[0-9]+"]
OPERATORS = [
    "over", "at_least", "under", "at_most", "equals", "not_equals", "in", "not_in", "matches"
]  # fmt: skip
ARG_VALUES = st.sampled_from(
    [*VALUES, 1, 0, 1000, None, math.nan, math.inf, [1], "lunch", "CASH ADVANCE now", "b", "42"]
)


def value_lists() -> st.SearchStrategy[tuple[Scalar, ...]]:
    return st.lists(st.sampled_from(VALUES), min_size=1, max_size=4, unique_by=value_order).map(
        tuple
    )


@st.composite
def conditions(draw: st.DrawFn, *, args: Sequence[str] = RULE_ARGS) -> Condition:
    op = draw(st.sampled_from(OPERATORS))
    arg = draw(st.sampled_from(args))
    value: Scalar | tuple[Scalar, ...]
    if op in ("over", "at_least", "under", "at_most"):
        value = draw(st.sampled_from(NUMBERS))
    elif op == "matches":
        value = draw(st.sampled_from(PATTERNS))
    elif op in ("in", "not_in"):
        value = draw(value_lists())
    else:
        value = draw(st.sampled_from(VALUES))
    reason = draw(st.sampled_from(["", "needs a manager"]))
    return Condition(arg=arg, op=op, value=value, reason=reason)  # type: ignore[arg-type]


# Raising amount_usd can only make these match: the amount law holds with them.
AMOUNT_CONDITIONS = st.builds(
    Condition,
    arg=st.just("amount_usd"),
    op=st.sampled_from(["over", "at_least"]),
    value=st.sampled_from([0.0, 1000.0, 6000.0]),
)
# Mostly none, so that what one rule decides is not hidden by what another denies.
CONDITIONS = st.just([]) | st.lists(
    conditions() | AMOUNT_CONDITIONS, min_size=1, max_size=2, unique_by=lambda c: repr(c)
)
SOME_ARG_VALUES = st.sampled_from([(), (), ()]) | st.deferred(lambda: arg_values())


@st.composite
def arg_values(draw: st.DrawFn) -> tuple[ArgValues, ...]:
    args = draw(st.lists(st.sampled_from(RULE_ARGS), unique=True, min_size=1, max_size=2))
    return tuple(ArgValues(arg=arg, values=draw(value_lists())) for arg in sorted(args))


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    limit = draw(st.none() | LIMITS)
    threshold = draw(st.none() | LIMITS)
    if limit is not None and threshold is not None and threshold > limit:
        limit, threshold = threshold, limit
    vendors = draw(st.none() | st.lists(st.sampled_from(VENDORS), unique=True, max_size=3))
    tools = draw(st.permutations(TOOLS))
    split = draw(st.integers(min_value=0, max_value=len(tools)))
    allowed_tools = tuple(sorted(tools[:split])) if draw(st.booleans()) else None
    denied_tools = tuple(sorted(tools[split:])) if draw(st.booleans()) else None
    daily = draw(st.none() | LIMITS)
    rate = draw(
        st.none()
        | st.builds(
            RateLimit,
            calls=st.integers(min_value=0, max_value=6),
            per_seconds=st.sampled_from([1.0, 60.0, 0.5, 3600.0]),
        )
    )
    return Policy(
        agent=draw(st.sampled_from(AGENTS)),
        spending_limit_usd=None if limit is None else float(limit),
        require_approval_if_over=None if threshold is None else float(threshold),
        allowed_vendors=None if vendors is None else tuple(vendors),
        reflection_loop_cap=draw(st.none() | st.integers(min_value=0, max_value=30)),
        escalation=draw(st.sampled_from(["human_review", "cfo_review", "legal_review"])),
        allowed_tools=allowed_tools,
        denied_tools=denied_tools,
        daily_limit_usd=None if daily is None else float(daily),
        rate_limit=rate,
        approval_expiry_s=draw(st.sampled_from([DEFAULT_APPROVAL_EXPIRY_S, 60.0, 3600.0, 0.5])),
        on_expiry=draw(st.sampled_from(["deny", "allow"])),
        allowed_values=draw(SOME_ARG_VALUES),
        denied_values=draw(SOME_ARG_VALUES),
        escalate_if=tuple(draw(CONDITIONS)),
        deny_if=tuple(draw(CONDITIONS)),
    )


POLICY_LISTS = st.lists(policies(), min_size=1, max_size=4)


@st.composite
def intents(draw: st.DrawFn, *, roles: Sequence[str] = (*AGENTS, "Unknown-Role")) -> Intent:
    args: dict[str, Any] = {}
    amount = draw(st.sampled_from([MISSING]) | AMOUNTS | INVALID_AMOUNTS)
    if amount is not MISSING:
        args["amount_usd"] = amount
    vendor = draw(st.sampled_from([MISSING, None, 42, "vendor_a", *VENDORS]))
    if vendor is not MISSING:
        args["vendor"] = vendor
    if draw(st.booleans()):
        args["note"] = draw(st.text(max_size=5))
    fee = draw(st.sampled_from([MISSING]) | AMOUNTS | INVALID_AMOUNTS)
    if fee is not MISSING:
        args["fee_usd"] = fee
    for name in RULE_ARGS:
        value = draw(st.sampled_from([MISSING]) | ARG_VALUES)
        if value is not MISSING:
            args[name] = value
    return Intent(
        agent=draw(st.sampled_from(["agent-1", "agent-2"])),
        role=draw(st.sampled_from(roles)),
        tool=draw(st.sampled_from([*TOOLS, UNLISTED_TOOL])),
        args=args,
        workflow=draw(st.sampled_from(["wf-1", "wf-2"])),
        step=draw(st.integers(min_value=0, max_value=50)),
    )


# None: decided before tools declared spend, when amount_usd was the spend.
SPEND_ARGS = st.sampled_from([None, (), ("amount_usd",), ("amount_usd", "fee_usd"), ("fee_usd",)])
CONTEXTS = st.builds(
    EvalContext,
    reflections=st.integers(min_value=0, max_value=35) | st.just(-1),
    workflow_spend_usd=SPENDS | st.sampled_from([math.nan, -1.0]),
    now=st.floats(min_value=0, max_value=2e9),
    day_spend_usd=SPENDS | st.sampled_from([math.nan, -1.0, math.inf]),
    recent_calls=st.integers(min_value=0, max_value=8) | st.just(-1),
    spend_args=SPEND_ARGS,
)
VALID_CONTEXTS = st.builds(
    EvalContext,
    reflections=st.integers(min_value=0, max_value=35),
    workflow_spend_usd=st.floats(min_value=0, max_value=20000, allow_nan=False),
    day_spend_usd=SPENDS,
    recent_calls=st.integers(min_value=0, max_value=8),
    spend_args=SPEND_ARGS,
)


def reordered(policy: Policy, rng: random.Random) -> Policy:
    """``policy`` with its conditions, and the values of its rules, in another order."""

    def mix(values: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(rng.sample(values, k=len(values)))

    def mixed(condition: Condition) -> Condition:
        value = condition.value
        return (
            msgspec.structs.replace(condition, value=mix(value))
            if isinstance(value, tuple)
            else condition
        )

    return msgspec.structs.replace(
        policy,
        escalate_if=mix(tuple(map(mixed, policy.escalate_if))),
        deny_if=mix(tuple(map(mixed, policy.deny_if))),
        allowed_values=mix(
            tuple(ArgValues(arg=r.arg, values=mix(r.values)) for r in policy.allowed_values)
        ),
        denied_values=mix(
            tuple(ArgValues(arg=r.arg, values=mix(r.values)) for r in policy.denied_values)
        ),
    )


def to_yaml(items: Sequence[Policy]) -> str:
    """Render policies as one YAML document each, the way a person would write them."""
    documents = []
    for policy in items:
        body: dict[str, Any] = {"agent": policy.agent, "escalation": policy.escalation}
        for key in ("spending_limit_usd", "require_approval_if_over", "reflection_loop_cap"):
            if getattr(policy, key) is not None:
                body[key] = getattr(policy, key)
        if policy.allowed_vendors is not None:
            body["allowed_vendors"] = list(policy.allowed_vendors)
        for key in ("allowed_tools", "denied_tools"):
            if getattr(policy, key) is not None:
                body[key] = list(getattr(policy, key))
        if policy.daily_limit_usd is not None:
            body["daily_limit_usd"] = policy.daily_limit_usd
        if policy.rate_limit is not None:
            body["rate_limit"] = msgspec.structs.asdict(policy.rate_limit)
        body["approval_expiry_s"] = policy.approval_expiry_s
        body["on_expiry"] = policy.on_expiry
        for key in ("allowed_values", "denied_values"):
            rules: tuple[ArgValues, ...] = getattr(policy, key)
            if rules:
                body[key] = {rule.arg: list(rule.values) for rule in rules}
        for key in ("escalate_if", "deny_if"):
            listed: tuple[Condition, ...] = getattr(policy, key)
            if listed:
                body[key] = [condition_body(c) for c in listed]
        documents.append(yaml.safe_dump({"policy": body}, sort_keys=False))
    return "---\n".join(documents)


def condition_body(condition: Condition) -> dict[str, Any]:
    value = condition.value
    body = {"arg": condition.arg, condition.op: list(value) if isinstance(value, tuple) else value}
    if condition.reason:
        body["reason"] = condition.reason
    return body


def compile_set(items: Sequence[Policy]) -> PolicySet:
    return parse_policy_text(to_yaml(items))


class Expected(msgspec.Struct, frozen=True):
    outcome: str
    targets: set[str | None]
    obligations: tuple[str, ...]
    approval_expiry_s: float | None
    on_expiry: str


DENY = Expected("deny", {None}, (), None, "deny")


def reference(items: Sequence[Policy], intent: Intent, ctx: EvalContext) -> Expected:
    """The semantics written out plainly, one policy at a time."""
    mine = [policy for policy in items if policy.agent == intent.role]
    if not mine:
        return DENY

    spend_args = ("amount_usd",) if ctx.spend_args is None else ctx.spend_args
    given = [intent.args[name] for name in spend_args if name in intent.args]
    has_amount = bool(given)
    amount_ok = all(
        type(value) in (int, float) and math.isfinite(value) and value >= 0 for value in given
    )
    amount: Any = sum(given) if amount_ok else None
    vendor = intent.args.get("vendor")
    spend = ctx.workflow_spend_usd
    # Before tools declared spend, a vendor had to be a string whatever the policy said.
    vendor_ok = ctx.spend_args is not None or vendor is None or isinstance(vendor, str)
    day_spend = ctx.day_spend_usd
    context_ok = (
        math.isfinite(spend)
        and spend >= 0
        and math.isfinite(day_spend)
        and day_spend >= 0
        and ctx.reflections >= 0
        and ctx.recent_calls >= 0
    )
    if not (amount_ok and vendor_ok and context_ok):
        return DENY

    decisions: list[tuple[str, str | None]] = []
    for policy in mine:
        cap = policy.reflection_loop_cap
        limit = policy.spending_limit_usd
        threshold = policy.require_approval_if_over
        over_cap = cap is not None and ctx.reflections > cap
        bad_vendor = policy.allowed_vendors is not None and vendor not in policy.allowed_vendors
        over_limit = has_amount and limit is not None and amount + spend > limit
        needs_approval = has_amount and threshold is not None and amount > threshold
        tool_denied = policy.denied_tools is not None and intent.tool in policy.denied_tools
        tool_unlisted = policy.allowed_tools is not None and intent.tool not in policy.allowed_tools
        over_rate = policy.rate_limit is not None and ctx.recent_calls >= policy.rate_limit.calls
        daily = policy.daily_limit_usd
        over_day = has_amount and daily is not None and amount + day_spend > daily
        args_deny, args_escalate = judge_args(policy, intent.args)
        if (
            over_cap
            or bad_vendor
            or over_limit
            or tool_denied
            or tool_unlisted
            or over_rate
            or over_day
            or args_deny
        ):
            decisions.append(("deny", None))
        elif needs_approval or args_escalate:
            decisions.append(("escalate", policy.escalation))
        else:
            decisions.append(("allow", None))

    outcomes = {outcome for outcome, _ in decisions}
    if "deny" in outcomes:
        return DENY
    if "escalate" in outcomes:
        return Expected(
            "escalate",
            {target for outcome, target in decisions if outcome == "escalate"},
            (OBLIGATION_AWAIT_APPROVAL, OBLIGATION_RECORD_SPEND)
            if has_amount
            else (OBLIGATION_AWAIT_APPROVAL,),
            min(policy.approval_expiry_s for policy in mine),
            "allow" if all(policy.on_expiry == "allow" for policy in mine) else "deny",
        )
    return Expected("allow", {None}, (OBLIGATION_RECORD_SPEND,) if has_amount else (), None, "deny")


def is_number(value: object) -> bool:
    return type(value) in (int, float)


def same(a: object, b: object) -> bool:
    """Equal as a policy means it: of one kind (string, boolean, number) and equal."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is bool and type(b) is bool and a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    return is_number(a) and is_number(b) and a == b


def matches(condition: Condition, value: object) -> bool | None:
    """Whether a condition matches a present argument; None when it cannot read it."""
    op, bound = condition.op, condition.value
    if op in ("over", "at_least", "under", "at_most"):
        if not (is_number(value) and math.isfinite(value)):  # type: ignore[arg-type]
            return None
        number: Any = value
        return {
            "over": number > bound,
            "at_least": number >= bound,
            "under": number < bound,
            "at_most": number <= bound,
        }[op]
    if op == "matches":
        return re.search(str(bound), value) is not None if isinstance(value, str) else None
    listed = bound if isinstance(bound, tuple) else (bound,)
    found = any(same(value, item) for item in listed)
    return found if op in ("equals", "in") else not found


def judge_args(policy: Policy, args: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the policy's rules on arguments deny, and whether they escalate."""
    deny = any(
        rule.arg not in args or not any(same(args[rule.arg], v) for v in rule.values)
        for rule in policy.allowed_values
    ) or any(
        rule.arg in args and any(same(args[rule.arg], v) for v in rule.values)
        for rule in policy.denied_values
    )
    escalate = False
    for kind, listed in (("deny", policy.deny_if), ("escalate", policy.escalate_if)):
        for condition in listed:
            if condition.arg not in args:
                continue
            hit = matches(condition, args[condition.arg])
            if hit is None or (hit and kind == "deny"):
                deny = True
            elif hit:
                escalate = True
    return deny, escalate


# 500 policy sets of up to 8 intents each in `make test` (2,000 in `make test-all`).
@settings(max_examples=examples(500), deadline=None)
@given(POLICY_LISTS, st.lists(st.tuples(intents(), CONTEXTS), min_size=1, max_size=8))
def test_evaluator_agrees_with_the_reference_on_random_intents(
    items: list[Policy], cases: list[tuple[Intent, EvalContext]]
) -> None:
    compiled = compile_set(items)
    for intent, ctx in cases:
        verdict = evaluate(compiled, intent, ctx)
        expected = reference(items, intent, ctx)

        assert verdict.outcome == expected.outcome, (intent, ctx, verdict)
        assert verdict.escalation in expected.targets
        assert verdict.obligations == expected.obligations
        assert verdict.approval_expiry_s == expected.approval_expiry_s
        assert verdict.on_expiry == expected.on_expiry
        assert verdict.policy_hash == compiled.hash
        assert verdict.reasons
        assert len(set(verdict.reasons)) == len(verdict.reasons)


RULES_ALONE = (
    conditions().map(lambda c: {"deny_if": (c,)})
    | conditions().map(lambda c: {"escalate_if": (c,)})
    | arg_values().map(lambda rules: {"allowed_values": rules})
    | arg_values().map(lambda rules: {"denied_values": rules})
)


def named_values(rule: dict[str, Any]) -> list[object]:
    """The values a rule names, and their look-alikes of other kinds: where it decides."""
    (listed,) = rule.values()
    named: list[object] = []
    for item in listed:
        value = item.value if isinstance(item, Condition) else item.values
        for scalar in value if isinstance(value, tuple) else (value,):
            named += [scalar, str(scalar)]
            if isinstance(scalar, float):
                named += [int(scalar), scalar + 0.5, scalar - 0.5]
            if isinstance(scalar, bool):
                named.append(int(scalar))
    return named


@st.composite
def rule_and_args(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rule = draw(RULES_ALONE)
    near = st.sampled_from(named_values(rule))
    cases = []
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        args = {}
        for name in RULE_ARGS:
            value = draw(st.sampled_from([MISSING]) | ARG_VALUES | near | near)
            if value is not MISSING:
                args[name] = value
        cases.append(args)
    return rule, cases


@settings(max_examples=examples(700), deadline=None)
@given(rule_and_args())
def test_each_rule_on_arguments_decides_as_the_reference_alone(
    case: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    rule, cases = case
    policy = Policy(agent=ROLE, **rule)
    compiled = compile_set([policy])
    ctx = EvalContext(spend_args=())
    for args in cases:
        verdict = evaluate(compiled, purchase(**args), ctx)
        deny, escalate = judge_args(policy, args)

        expected = "deny" if deny else "escalate" if escalate else "allow"
        assert verdict.outcome == expected, (rule, args, verdict)


@settings(max_examples=examples(150), deadline=None)
@given(POLICY_LISTS, intents(), CONTEXTS)
def test_evaluate_is_deterministic(items: list[Policy], intent: Intent, ctx: EvalContext) -> None:
    compiled = compile_set(items)
    recompiled = compile_set(items)
    replayed = msgspec.msgpack.decode(msgspec.msgpack.encode(intent), type=Intent)

    # As a decision record carries it: replay needs nothing but the record.
    recorded = msgspec.msgpack.decode(msgspec.msgpack.encode(ctx), type=EvalContext)

    first = evaluate(compiled, intent, ctx)

    assert evaluate(compiled, intent, ctx) == first
    assert evaluate(recompiled, replayed, recorded) == first
    assert evaluate(compiled, intent, msgspec.structs.replace(ctx, now=ctx.now + 86400)) == first


@settings(max_examples=examples(150), deadline=None)
@given(POLICY_LISTS, intents(), CONTEXTS, st.text(max_size=30))
def test_unknown_role_is_always_denied(
    items: list[Policy], intent: Intent, ctx: EvalContext, role: str
) -> None:
    if role in AGENTS:
        role += "-unknown"
    stranger = msgspec.structs.replace(intent, role=role)

    verdict = evaluate(compile_set(items), stranger, ctx)

    assert verdict.outcome == "deny"
    (reason,) = verdict.reasons
    assert reason.startswith(f"no policy for role {repr(role)[:40]}")
    assert verdict.obligations == ()


@settings(max_examples=examples(250), deadline=None)
@given(POLICY_LISTS, intents(roles=AGENTS), VALID_CONTEXTS, AMOUNTS, AMOUNTS)
def test_raising_the_amount_never_relaxes_a_verdict(
    items: list[Policy], intent: Intent, ctx: EvalContext, first: float, second: float
) -> None:
    low, high = sorted((first, second))
    compiled = compile_set(items)

    def rank(amount: float) -> int:
        args = {**intent.args, "amount_usd": amount}
        return RANK[evaluate(compiled, msgspec.structs.replace(intent, args=args), ctx).outcome]

    assert rank(low) <= rank(high)


@settings(max_examples=examples(150), deadline=None)
@given(
    POLICY_LISTS,
    intents(roles=AGENTS),
    VALID_CONTEXTS,
    st.tuples(st.floats(0, 20000), st.integers(0, 9), st.floats(0, 60000), st.integers(0, 9)),
)
def test_more_spend_reflections_day_spend_or_calls_never_relaxes_a_verdict(
    items: list[Policy],
    intent: Intent,
    ctx: EvalContext,
    more: tuple[float, int, float, int],
) -> None:
    more_spend, more_loops, more_day_spend, more_calls = more
    compiled = compile_set(items)
    later = msgspec.structs.replace(
        ctx,
        reflections=ctx.reflections + more_loops,
        workflow_spend_usd=ctx.workflow_spend_usd + more_spend,
        now=ctx.now + 1,
        day_spend_usd=ctx.day_spend_usd + more_day_spend,
        recent_calls=ctx.recent_calls + more_calls,
    )

    before = evaluate(compiled, intent, ctx).outcome
    after = evaluate(compiled, intent, later).outcome

    assert RANK[before] <= RANK[after]


@settings(max_examples=examples(250), deadline=None)
@given(POLICY_LISTS, intents(roles=AGENTS), CONTEXTS)
def test_a_tool_no_policy_of_a_tool_restricted_role_lists_is_denied(
    items: list[Policy], intent: Intent, ctx: EvalContext
) -> None:
    mine = [policy for policy in items if policy.agent == intent.role]
    unknown = msgspec.structs.replace(intent, tool=UNLISTED_TOOL)

    verdict = evaluate(compile_set(items), unknown, ctx)

    if any(policy.allowed_tools is not None for policy in mine):
        assert verdict.outcome == "deny"
        assert verdict.obligations == ()


@settings(max_examples=examples(150), deadline=None)
@given(POLICY_LISTS, intents(roles=AGENTS), CONTEXTS, st.sampled_from(TOOLS))
def test_a_denied_tool_is_denied_whatever_else_the_intent_says(
    items: list[Policy], intent: Intent, ctx: EvalContext, tool: str
) -> None:
    if not any(
        policy.agent == intent.role and tool in (policy.denied_tools or ()) for policy in items
    ):
        return
    verdict = evaluate(compile_set(items), msgspec.structs.replace(intent, tool=tool), ctx)

    assert verdict.outcome == "deny"


@settings(max_examples=examples(150), deadline=None)
@given(POLICY_LISTS, policies(), intents(roles=AGENTS), CONTEXTS)
def test_adding_a_policy_for_a_governed_role_never_relaxes_a_verdict(
    items: list[Policy], extra: Policy, intent: Intent, ctx: EvalContext
) -> None:
    if not any(policy.agent == extra.agent for policy in items):
        return
    before = evaluate(compile_set(items), intent, ctx).outcome
    after = evaluate(compile_set([*items, extra]), intent, ctx).outcome

    assert RANK[before] <= RANK[after]


@settings(max_examples=examples(150), deadline=None)
@given(
    POLICY_LISTS,
    st.lists(st.tuples(intents(), CONTEXTS), min_size=1, max_size=5),
    st.randoms(use_true_random=False),
)
def test_reordering_or_duplicating_policy_documents_changes_nothing(
    items: list[Policy], cases: list[tuple[Intent, EvalContext]], rng: random.Random
) -> None:
    shuffled = items + rng.choices(items, k=rng.randint(0, 3))
    rng.shuffle(shuffled)
    # The conditions of a policy and the values of a rule are sets too.
    shuffled = [reordered(policy, rng) for policy in shuffled]
    original, variant = compile_set(items), compile_set(shuffled)

    assert variant.hash == original.hash
    assert variant == original
    for intent, ctx in cases:
        assert evaluate(variant, intent, ctx) == evaluate(original, intent, ctx)


@settings(max_examples=examples(50), deadline=None)
@given(
    POLICY_LISTS,
    st.lists(st.tuples(intents(), CONTEXTS), min_size=1, max_size=20),
    st.randoms(use_true_random=False),
)
def test_reordering_or_duplicating_policy_files_changes_nothing(
    items: list[Policy], cases: list[tuple[Intent, EvalContext]], rng: random.Random
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for index, policy in enumerate(items):
            path = Path(directory) / f"policy-{index}.yaml"
            path.write_text(to_yaml([policy]), encoding="utf-8")
            paths.append(path)
        shuffled = paths + rng.choices(paths, k=rng.randint(0, 3))
        rng.shuffle(shuffled)
        original, variant = load_policies(paths), load_policies(shuffled)

    assert variant.hash == original.hash
    for intent, ctx in cases:
        assert evaluate(variant, intent, ctx) == evaluate(original, intent, ctx)


def test_an_intent_outside_a_started_workflow_is_denied_before_any_policy() -> None:
    intent = purchase(vendor="Vendor_A", amount_usd=100.0)
    unstarted = evaluate(SEED, intent, EvalContext(workflow_started=False, agent_named=False))
    unnamed = evaluate(SEED, intent, EvalContext(agent_named=False))
    assert (unstarted.outcome, unstarted.refused) == ("deny", "unknown_workflow")
    assert unstarted.reasons == ("workflow 'wf-1' was not started",)
    assert (unnamed.outcome, unnamed.refused) == ("deny", "not_a_participant")
    assert unnamed.reasons == ("agent 'agent-7' is not named in the start of workflow 'wf-1'",)
    assert evaluate(SEED, intent, EvalContext()).outcome == "allow"


def test_budget_authority_counts_the_agents_spend_today() -> None:
    intent = purchase(vendor="Vendor_A", amount_usd=4000.0)

    def under(day_spend: float, authority: float | None = 10_000.0) -> Verdict:
        ctx = EvalContext(day_spend_usd=day_spend, budget_authority_usd=authority)
        return evaluate(SEED, intent, ctx)

    assert (under(6000.0).outcome, under(6000.0).refused) == ("allow", "")
    over = under(6000.5)
    assert (over.outcome, over.refused) == ("deny", "over_budget_authority")
    assert over.reasons == (
        "amount 4000 plus spend today 6000.5 (total 10000.5) exceeds the agent's budget "
        "authority 10000 a day",
    )
    # Recorded before the authority was cumulative: not checked.
    assert under(1e9, authority=None).outcome == "allow"


# --- rules on arguments and declared spend ----------------------------------------------------

EXPENSES = parse_policy_text(EXPENSES_TEXT, source="expenses.yaml")


def claim(**args: Any) -> Intent:
    body = {"category": "meals", "currency": "USD", "amount_usd": 40, "memo": "lunch", **args}
    return Intent(
        agent="expenses-1",
        role="Expense-Agent",
        tool="ledger.pay_expense",
        args={k: v for k, v in body.items() if v is not MISSING},
        workflow="wf-1",
        step=1,
    )


@pytest.mark.parametrize(
    ("args", "outcome", "reasons"),
    [
        ({}, "allow", ("allowed by 1 policy for role 'Expense-Agent'",)),
        (
            {"category": "travel"},
            "escalate",
            (
                "travel and entertainment need a manager: category 'travel' is one of "
                "['entertainment', 'travel']",
            ),
        ),
        ({"amount_usd": 1000}, "allow", None),
        ({"amount_usd": 1000.01}, "escalate", ("escalate_if: amount_usd 1000.01 is over 1000",)),
        ({"currency": "GBP"}, "deny", ("currency 'GBP' is not in allowed_values",)),
        (
            {"currency": MISSING},
            "deny",
            ("no currency given and the policy allows only listed values",),
        ),
        ({"category": "gift_cards"}, "deny", ("category 'gift_cards' is in denied_values",)),
        (
            {"memo": "a Cash Advance, please"},
            "deny",
            ("deny_if: memo 'a Cash Advance, please' matches '(?i)cash advance'",),
        ),
        ({"memo": MISSING}, "allow", None),
        (
            {"memo": 7},
            "deny",
            ("memo must be a string for deny_if matches '(?i)cash advance', got 7",),
        ),
        (
            {"amount_usd": "5000"},
            "deny",
            ("amount_usd must be a number for escalate_if over 1000, got '5000'",),
        ),
        ({"category": "travel", "memo": "cash advance"}, "deny", None),
    ],
    ids=[
        "meals_allow",
        "travel_escalates_with_its_reason",
        "amount_at_bound_allow",
        "amount_over_bound_escalates",
        "unlisted_currency_deny",
        "missing_currency_deny",
        "denied_category_deny",
        "pattern_deny",
        "missing_memo_allow",
        "number_memo_cannot_be_searched_deny",
        "string_amount_cannot_be_compared_deny",
        "deny_over_escalate",
    ],
)
def test_the_expense_policy_decides_as_written(
    args: dict[str, Any], outcome: str, reasons: tuple[str, ...] | None
) -> None:
    # Non-monetary: the tool declares no spend, so nothing is spend or recorded as spent.
    verdict = evaluate(EXPENSES, claim(**args), EvalContext(spend_args=()))

    assert verdict.outcome == outcome, verdict
    if reasons is not None:
        assert verdict.reasons == reasons
    assert OBLIGATION_RECORD_SPEND not in verdict.obligations


# (operator, its value, the argument, whether the condition matches: None cannot read it)
OPERATOR_CASES: list[tuple[str, Any, Any, bool | None]] = [
    ("over", 10, 10.5, True),
    ("over", 10, 10, False),
    ("over", -5, -4, True),
    ("at_least", 10, 10, True),
    ("at_least", 10, 9.99, False),
    ("under", 10, 9.99, True),
    ("under", 10, 10, False),
    ("at_most", 10, 10.0, True),
    ("at_most", 10, 10.01, False),
    ("over", 10, 10**400, True),
    ("over", 10, "11", None),
    ("over", 10, True, None),
    ("under", 10, math.nan, None),
    ("under", 10, -math.inf, None),
    ("at_least", 10, None, None),
    ("equals", "travel", "travel", True),
    ("equals", "travel", "Travel", False),
    ("equals", 3, 3.0, True),
    ("equals", 3, "3", False),
    ("equals", True, True, True),
    ("equals", True, 1, False),
    ("equals", 1, True, False),
    ("equals", "x", ["x"], False),
    ("not_equals", "travel", "meals", True),
    ("not_equals", "travel", "travel", False),
    ("not_equals", 1, True, True),
    ("in", ["travel", "entertainment"], "entertainment", True),
    ("in", ["travel", 2], 2.0, True),
    ("in", ["travel", 2], "2", False),
    ("in", [False], 0, False),
    ("in", ["travel"], {"travel": 1}, False),
    ("not_in", ["travel"], "meals", True),
    ("not_in", ["travel"], "travel", False),
    ("not_in", [0], False, True),
    ("matches", "(?i)cash advance", "need a CASH ADVANCE", True),
    ("matches", "^cash", "petty cash", False),
    ("matches", "cash\\z", "petty cash", True),
    ("matches", "[0-9]{4}", "card 1234", True),
    ("matches", "cash", 1234, None),
    ("matches", "^.ü$", "éü", True),
    ("matches", "cash", "\ud800 cash", True),
    ("matches", "cash", None, None),
]


@pytest.mark.parametrize(("op", "value", "arg", "matched"), OPERATOR_CASES)
@pytest.mark.parametrize("kind", ["deny_if", "escalate_if"])
def test_each_operator_decides_as_written(
    kind: str, op: str, value: Any, arg: Any, matched: bool | None
) -> None:
    condition = yaml.safe_dump({"arg": "x", op: value}, default_flow_style=True).strip()
    policies = parse_policy_text(f"policy:\n  agent: {ROLE}\n  {kind}:\n    - {condition}\n")

    verdict = evaluate(policies, purchase(x=arg), EvalContext(spend_args=()))
    absent = evaluate(policies, purchase(y=arg), EvalContext(spend_args=()))

    hit = "deny" if kind == "deny_if" else "escalate"
    assert verdict.outcome == {True: hit, False: "allow", None: "deny"}[matched], verdict
    if matched is None:
        (reason,) = verdict.reasons
        assert reason.startswith(f"x must be a {'string' if op == 'matches' else 'number'}")
    # A condition on an argument the intent does not have does not match.
    assert absent.outcome == "allow"


def test_a_backtracking_pattern_decides_in_linear_time() -> None:
    # Python's re takes about 2**40 steps here: this test ends only because RE2 does not.
    policies = parse_policy_text(
        f"policy:\n  agent: {ROLE}\n  deny_if:\n    - {{arg: x, matches: '^(a+)+$'}}\n"
    )

    verdict = evaluate(policies, purchase(x="a" * 40 + "!"), EvalContext(spend_args=()))

    assert verdict.outcome == "allow"


def test_only_declared_spend_counts() -> None:
    offer = purchase(vendor="Vendor_A", amount_usd=12_000, fee_usd=400)

    undeclared = evaluate(SEED, offer, EvalContext(spend_args=()))
    fee_only = evaluate(SEED, offer, EvalContext(spend_args=("fee_usd",)))
    both = evaluate(SEED, offer, EvalContext(spend_args=("amount_usd", "fee_usd")))

    # A counter-offer's amount is not money spent unless its tool says so.
    assert (undeclared.outcome, undeclared.obligations) == ("allow", ())
    assert (fee_only.outcome, fee_only.obligations) == ("allow", (OBLIGATION_RECORD_SPEND,))
    assert both.outcome == "deny"
    assert both.reasons == ("amount 12400 exceeds spending_limit_usd 10000",)


def test_the_spend_of_several_arguments_is_their_sum_against_every_limit() -> None:
    intent = purchase(vendor="Vendor_A", amount_usd=3000, fee_usd=2500)
    ctx = EvalContext(spend_args=("amount_usd", "fee_usd"), budget_authority_usd=5000.0)

    verdict = evaluate(SEED, intent, ctx)

    assert (verdict.outcome, verdict.refused) == ("deny", "over_budget_authority")
    assert "amount 5500 is over require_approval_if_over 5000" not in verdict.reasons


def test_an_invalid_declared_spend_argument_is_denied_with_its_name() -> None:
    verdict = evaluate(
        SEED, purchase(vendor="Vendor_A", fee_usd=-3), EvalContext(spend_args=("fee_usd",))
    )

    assert verdict.reasons == ("fee_usd must be a non-negative number, got -3",)


def test_a_record_from_before_declared_spend_replays_as_it_was_decided() -> None:
    # Decided when amount_usd was the spend and a vendor had to be a string.
    old = msgspec.msgpack.decode(msgspec.msgpack.encode({"reflections": 0}), type=EvalContext)
    intent = purchase(vendor=42, amount_usd=7000)

    assert old.spend_args is None
    assert evaluate(SEED, intent, old).reasons == ("vendor must be a string, got 42",)
    assert evaluate(SEED, purchase(vendor="Vendor_A", amount_usd=7000), old).outcome == "escalate"
    # Decided now: the seed restricts vendors, and 42 is not one of them.
    now = evaluate(SEED, intent, EvalContext(spend_args=("amount_usd",)))
    assert now.reasons == ("vendor 42 is not in allowed_vendors",)


@settings(max_examples=examples(150), deadline=None)
@given(
    POLICY_LISTS,
    st.data(),
    intents(roles=AGENTS),
    CONTEXTS,
)
def test_adding_a_rule_on_arguments_to_a_policy_never_relaxes_a_verdict(
    items: list[Policy], data: st.DataObject, intent: Intent, ctx: EvalContext
) -> None:
    index = data.draw(st.integers(min_value=0, max_value=len(items) - 1))
    policy = items[index]
    kind = data.draw(st.sampled_from(["deny_if", "escalate_if", "allowed_values", "denied_values"]))
    if kind in ("deny_if", "escalate_if"):
        extra: Any = data.draw(conditions())
        if extra in getattr(policy, kind):
            return
    else:
        extra = data.draw(arg_values())[0]
        if any(rule.arg == extra.arg for rule in getattr(policy, kind)):
            return
    stricter = msgspec.structs.replace(policy, **{kind: (*getattr(policy, kind), extra)})

    before = evaluate(compile_set(items), intent, ctx).outcome
    after = evaluate(compile_set([*items[:index], stricter, *items[index + 1 :]]), intent, ctx)

    assert RANK[before] <= RANK[after.outcome]
