"""The evaluator: worked cases, laws (determinism, default deny, monotonicity) and a reference."""

from __future__ import annotations

import math
import os
import random
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
    return Intent(
        agent=draw(st.sampled_from(["agent-1", "agent-2"])),
        role=draw(st.sampled_from(roles)),
        tool=draw(st.sampled_from([*TOOLS, UNLISTED_TOOL])),
        args=args,
        workflow=draw(st.sampled_from(["wf-1", "wf-2"])),
        step=draw(st.integers(min_value=0, max_value=50)),
    )


CONTEXTS = st.builds(
    EvalContext,
    reflections=st.integers(min_value=0, max_value=35) | st.just(-1),
    workflow_spend_usd=SPENDS | st.sampled_from([math.nan, -1.0]),
    now=st.floats(min_value=0, max_value=2e9),
    day_spend_usd=SPENDS | st.sampled_from([math.nan, -1.0, math.inf]),
    recent_calls=st.integers(min_value=0, max_value=8) | st.just(-1),
)
VALID_CONTEXTS = st.builds(
    EvalContext,
    reflections=st.integers(min_value=0, max_value=35),
    workflow_spend_usd=st.floats(min_value=0, max_value=20000, allow_nan=False),
    day_spend_usd=SPENDS,
    recent_calls=st.integers(min_value=0, max_value=8),
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
        documents.append(yaml.safe_dump({"policy": body}, sort_keys=False))
    return "---\n".join(documents)


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

    has_amount = "amount_usd" in intent.args
    amount: Any = intent.args.get("amount_usd")
    vendor = intent.args.get("vendor")
    spend = ctx.workflow_spend_usd
    amount_ok = (
        type(amount) in (int, float) and math.isfinite(amount) and amount >= 0
        if has_amount
        else True
    )
    vendor_ok = vendor is None or isinstance(vendor, str)
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
        if (
            over_cap
            or bad_vendor
            or over_limit
            or tool_denied
            or tool_unlisted
            or over_rate
            or over_day
        ):
            decisions.append(("deny", None))
        elif needs_approval:
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
            (OBLIGATION_AWAIT_APPROVAL, OBLIGATION_RECORD_SPEND),
            min(policy.approval_expiry_s for policy in mine),
            "allow" if all(policy.on_expiry == "allow" for policy in mine) else "deny",
        )
    return Expected("allow", {None}, (OBLIGATION_RECORD_SPEND,) if has_amount else (), None, "deny")


@settings(max_examples=2000, deadline=None)
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


@settings(max_examples=300, deadline=None)
@given(POLICY_LISTS, intents(), CONTEXTS)
def test_evaluate_is_deterministic(items: list[Policy], intent: Intent, ctx: EvalContext) -> None:
    compiled = compile_set(items)
    recompiled = compile_set(items)
    replayed = msgspec.msgpack.decode(msgspec.msgpack.encode(intent), type=Intent)

    first = evaluate(compiled, intent, ctx)

    assert evaluate(compiled, intent, ctx) == first
    assert evaluate(recompiled, replayed, ctx) == first
    assert evaluate(compiled, intent, msgspec.structs.replace(ctx, now=ctx.now + 86400)) == first


@settings(max_examples=300, deadline=None)
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


@settings(max_examples=500, deadline=None)
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


@settings(max_examples=300, deadline=None)
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
    later = EvalContext(
        reflections=ctx.reflections + more_loops,
        workflow_spend_usd=ctx.workflow_spend_usd + more_spend,
        now=ctx.now + 1,
        day_spend_usd=ctx.day_spend_usd + more_day_spend,
        recent_calls=ctx.recent_calls + more_calls,
    )

    before = evaluate(compiled, intent, ctx).outcome
    after = evaluate(compiled, intent, later).outcome

    assert RANK[before] <= RANK[after]


@settings(max_examples=500, deadline=None)
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


@settings(max_examples=300, deadline=None)
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


@settings(max_examples=300, deadline=None)
@given(POLICY_LISTS, policies(), intents(roles=AGENTS), CONTEXTS)
def test_adding_a_policy_for_a_governed_role_never_relaxes_a_verdict(
    items: list[Policy], extra: Policy, intent: Intent, ctx: EvalContext
) -> None:
    if not any(policy.agent == extra.agent for policy in items):
        return
    before = evaluate(compile_set(items), intent, ctx).outcome
    after = evaluate(compile_set([*items, extra]), intent, ctx).outcome

    assert RANK[before] <= RANK[after]


@settings(max_examples=300, deadline=None)
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
    original, variant = compile_set(items), compile_set(shuffled)

    assert variant.hash == original.hash
    assert variant == original
    for intent, ctx in cases:
        assert evaluate(variant, intent, ctx) == evaluate(original, intent, ctx)


@settings(max_examples=50, deadline=None)
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
