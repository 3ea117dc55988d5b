"""Policy files: the seed loads as written, the hash is canonical, every mistake names its line."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from govmesh.errors import GovmeshError, PolicyError
from govmesh.governance import (
    DEFAULT_APPROVAL_EXPIRY_S,
    Policy,
    PolicySet,
    RateLimit,
    load_policies,
    load_policy_file,
    parse_policy_text,
)
from govmesh.governance._rules import ArgValues, Condition, value_order

from _depth import examples
from _policies import EXPENSES

# Written as escapes so the source shows which look-alike character each test pastes.
EN_DASH = "\u2013"
EM_DASH = "\u2014"
MINUS_SIGN = "\u2212"
LEFT_QUOTE, RIGHT_QUOTE = "\u2018", "\u2019"

SEED_FILE = Path(__file__).resolve().parents[1] / "policies" / "procurement-agent-v2.yaml"
STRICT_FILE = SEED_FILE.with_name("procurement-strict.yaml")

SEED = """\
policy:
  agent: Procurement-Agent-v2
  spending_limit_usd: 10000
  require_approval_if_over: 5000
  allowed_vendors:
    - Vendor_A
    - Vendor_B
  reflection_loop_cap: 25
  escalation: human_review
"""

# The canonical form is a contract: state snapshots and audit records store this hash, so a
# change here must be deliberate (and bump the canonical format version).
SEED_HASH = "0bef41ba7c205e13bbee15ebdca3e0ac696fca68e1974525221cb35def1544e3"
STRICT_HASH = "c3451f4f260bc0603a7f0e3525ab54e1b19138d0a2be169385d08ba788dbfbba"
SEED_AND_STRICT_HASH = "3111f3b7572348af743f583cab0a2f0895432baacae879a90647a5c266a9ff06"

# The rules on arguments are part of the hash: pinned like the seed's.
EXPENSES_HASH = "5cbc3b6643b3cfbe692a6c6fc63e6005af55f4d23605b314fb1de2306c4176fa"


def seed_policy(source: str) -> Policy:
    return Policy(
        agent="Procurement-Agent-v2",
        spending_limit_usd=10000.0,
        require_approval_if_over=5000.0,
        allowed_vendors=("Vendor_A", "Vendor_B"),
        reflection_loop_cap=25,
        escalation="human_review",
        source=source,
    )


def test_seed_policy_file_loads_as_written_with_exact_values() -> None:
    policies = load_policy_file(SEED_FILE)

    assert policies.policies == (seed_policy(str(SEED_FILE)),)
    assert type(policies.policies[0].spending_limit_usd) is float
    assert type(policies.policies[0].reflection_loop_cap) is int
    assert policies.hash == SEED_HASH


def test_the_seed_policy_files_keep_their_hashes_under_the_general_language() -> None:
    # Hashes of the files as they were before rules on arguments existed: snapshots and
    # audit records store them.
    assert load_policy_file(SEED_FILE).hash == SEED_HASH
    assert load_policy_file(STRICT_FILE).hash == STRICT_HASH
    assert load_policies([SEED_FILE, STRICT_FILE]).hash == SEED_AND_STRICT_HASH


def test_rules_on_arguments_load_with_exact_values() -> None:
    (policy,) = parse_policy_text(EXPENSES, source="expenses.yaml").policies

    assert policy.allowed_values == (ArgValues(arg="currency", values=("EUR", "USD")),)
    assert policy.denied_values == (ArgValues(arg="category", values=("gift_cards",)),)
    assert policy.escalate_if == (
        Condition(arg="amount_usd", op="over", value=1000.0),
        Condition(
            arg="category",
            op="in",
            value=("entertainment", "travel"),
            reason="travel and entertainment need a manager",
        ),
    )
    assert policy.deny_if == (Condition(arg="memo", op="matches", value="(?i)cash advance"),)
    assert parse_policy_text(EXPENSES).hash == EXPENSES_HASH


def test_patterns_and_value_sets_are_built_when_the_policy_loads() -> None:
    (policy,) = parse_policy_text(EXPENSES).policies

    # No decision pays for compiling a pattern or building a set.
    assert all("test" in vars(c) for c in (*policy.escalate_if, *policy.deny_if))
    assert all("members" in vars(r) for r in (*policy.allowed_values, *policy.denied_values))


def test_allowed_values_of_vendor_names_is_the_seeds_allowed_vendors() -> None:
    sugar = SEED.replace(
        "  allowed_vendors:\n    - Vendor_A\n    - Vendor_B\n",
        "  allowed_values:\n    vendor: [Vendor_B, Vendor_A]\n",
    )

    assert parse_policy_text(sugar) == parse_policy_text(SEED)
    assert parse_policy_text(sugar).hash == SEED_HASH


def test_values_of_other_kinds_for_vendor_stay_general_values() -> None:
    text = "policy:\n  agent: A\n  allowed_values:\n    vendor: [Vendor_A, 7]\n"

    (policy,) = parse_policy_text(text).policies

    assert policy.allowed_vendors is None
    assert policy.allowed_values == (ArgValues(arg="vendor", values=("Vendor_A", 7.0)),)


@pytest.mark.parametrize(
    "variant",
    [
        EXPENSES.replace("[USD, EUR]", "[EUR, USD]"),
        EXPENSES.replace("[travel, entertainment]", "[entertainment, travel]"),
        EXPENSES.replace("over: 1000}", "over: 1000.0}"),
        EXPENSES.replace("over: 1000}", "over: 1e3}"),
        # Conditions in another order.
        EXPENSES.replace(
            "    - {arg: category, in: [travel, entertainment], reason: travel and "
            "entertainment need a manager}\n    - {arg: amount_usd, over: 1000}\n",
            "    - {arg: amount_usd, over: 1000}\n    - {arg: category, in: [travel, "
            "entertainment], reason: travel and entertainment need a manager}\n",
        ),
        EXPENSES.replace("{arg: memo, matches", "{matches").replace(
            '"(?i)cash advance"}', '"(?i)cash advance", arg: memo}'
        ),
    ],
)
def test_order_and_spelling_of_rules_on_arguments_keep_the_hash(variant: str) -> None:
    assert variant != EXPENSES
    assert parse_policy_text(variant).hash == EXPENSES_HASH


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("[USD, EUR]", "[USD]"),
        ("[gift_cards]", "[gift_cards, cash]"),
        ("over: 1000}", "at_least: 1000}"),
        ("over: 1000}", "over: 1001}"),
        ("reason: travel and entertainment need a manager", "reason: needs a manager"),
        ('"(?i)cash advance"', '"cash advance"'),
        ("memo, matches", "note, matches"),
        ("  deny_if:", "  escalate_if:"),
        ("in: [travel", "not_in: [travel"),
    ],
)
def test_hash_changes_when_a_rule_on_arguments_changes(old: str, new: str) -> None:
    changed = EXPENSES.replace(old, new, 1)
    if new == "  escalate_if:":  # two escalate_if keys: move the deny_if entry instead
        changed = EXPENSES.replace("  deny_if:\n    - {arg: memo", "    - {arg: memo")

    assert changed != EXPENSES
    assert parse_policy_text(changed).hash != EXPENSES_HASH


def test_kinds_of_values_are_kept_apart_in_the_hash() -> None:
    def hash_of(value: str) -> str:
        return parse_policy_text(
            f"policy:\n  agent: A\n  deny_if:\n    - {{arg: x, equals: {value}}}\n"
        ).hash

    assert len({hash_of("1"), hash_of("'1'"), hash_of("true"), hash_of("'true'")}) == 4
    assert hash_of("1") == hash_of("1.0")


def test_seed_policy_has_no_tool_restriction_and_default_approval_terms() -> None:
    (policy,) = load_policy_file(SEED_FILE).policies

    assert policy.allowed_tools is None
    assert policy.denied_tools is None
    assert policy.daily_limit_usd is None
    assert policy.rate_limit is None
    assert policy.approval_expiry_s == DEFAULT_APPROVAL_EXPIRY_S == 86400.0
    assert policy.on_expiry == "deny"


def test_seed_text_and_seed_file_have_the_same_hash() -> None:
    assert parse_policy_text(SEED).hash == load_policy_file(SEED_FILE).hash == SEED_HASH


def test_for_agent_returns_the_policies_of_that_role_only() -> None:
    policies = parse_policy_text(SEED, source="seed.yaml")

    assert policies.for_agent("Procurement-Agent-v2") == (seed_policy("seed.yaml"),)
    assert policies.for_agent("procurement-agent-v2") == ()
    assert policies.for_agent("") == ()


def test_vendor_set_is_a_frozenset_of_the_allowed_vendors() -> None:
    (policy,) = parse_policy_text(SEED).policies

    assert policy.vendor_set == frozenset({"Vendor_A", "Vendor_B"})
    assert Policy(agent="x").vendor_set is None


def test_omitted_keys_take_their_defaults() -> None:
    (policy,) = parse_policy_text("policy:\n  agent: Auditor\n").policies

    assert policy == Policy(agent="Auditor", source="<policy>")


def test_an_empty_vendor_list_is_kept_and_distinct_from_no_list() -> None:
    listed = parse_policy_text("policy:\n  agent: A\n  allowed_vendors: []\n")
    unlisted = parse_policy_text("policy:\n  agent: A\n")

    assert listed.policies[0].allowed_vendors == ()
    assert listed.hash != unlisted.hash


@pytest.mark.parametrize(
    "spelling", ["10000", "10000.0", "10_000", "1e4", "1.0e+4", "+10000", "10000."]
)
def test_plain_decimal_spellings_of_a_limit_are_the_same_value(spelling: str) -> None:
    policies = parse_policy_text(SEED.replace("10000", spelling))

    assert policies.policies[0].spending_limit_usd == 10000.0
    assert policies.hash == SEED_HASH


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("Procurement-Agent-v2", "Procurement-Agent-v3"),
        ("10000", "10001"),
        ("5000", "5000.5"),
        ("Vendor_B", "Vendor_C"),
        ("    - Vendor_B\n", ""),
        ("25", "26"),
        ("human_review", "cfo_review"),
        ("  reflection_loop_cap: 25\n", ""),
    ],
)
def test_hash_changes_when_a_value_changes(old: str, new: str) -> None:
    assert parse_policy_text(SEED.replace(old, new)).hash != SEED_HASH


STRICT = """\
policy:
  agent: Procurement-Agent-v2
  allowed_tools: [erp.create_purchase_order, erp.get_quote]
  denied_tools: [erp.delete_vendor]
  daily_limit_usd: 50000
  rate_limit: {calls: 120, per_seconds: 60}
  approval_expiry_s: 3600
  on_expiry: deny
"""


def test_new_keys_load_with_exact_values() -> None:
    (policy,) = parse_policy_text(STRICT, source="strict.yaml").policies

    assert policy == Policy(
        agent="Procurement-Agent-v2",
        allowed_tools=("erp.create_purchase_order", "erp.get_quote"),
        denied_tools=("erp.delete_vendor",),
        daily_limit_usd=50000.0,
        rate_limit=RateLimit(calls=120, per_seconds=60.0),
        approval_expiry_s=3600.0,
        source="strict.yaml",
    )
    assert type(policy.daily_limit_usd) is float
    assert type(policy.rate_limit and policy.rate_limit.per_seconds) is float
    assert policy.allowed_tool_set == frozenset({"erp.create_purchase_order", "erp.get_quote"})
    assert policy.denied_tool_set == frozenset({"erp.delete_vendor"})


def test_example_strict_policy_file_loads_for_the_procurement_role() -> None:
    (policy,) = load_policy_file(STRICT_FILE).policies

    assert policy == Policy(
        agent="Procurement-Agent-v2",
        allowed_tools=("erp.create_purchase_order",),
        daily_limit_usd=50000.0,
        rate_limit=RateLimit(calls=120, per_seconds=60.0),
        approval_expiry_s=3600.0,
        on_expiry="deny",
        source=str(STRICT_FILE),
    )


def test_example_strict_policy_composes_with_the_seed() -> None:
    both = load_policies([STRICT_FILE, SEED_FILE])

    assert {p.source for p in both.for_agent("Procurement-Agent-v2")} == {
        str(STRICT_FILE),
        str(SEED_FILE),
    }
    assert both == load_policies([SEED_FILE, STRICT_FILE, SEED_FILE])
    assert both.hash not in (SEED_HASH, load_policy_file(STRICT_FILE).hash)


def test_spelling_out_the_default_approval_terms_keeps_the_seed_hash() -> None:
    text = SEED + "  approval_expiry_s: 86400\n  on_expiry: deny\n"

    assert parse_policy_text(text).hash == SEED_HASH


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("[erp.create_purchase_order, erp.get_quote]", "[erp.create_purchase_order]"),
        ("[erp.delete_vendor]", "[]"),
        ("  denied_tools: [erp.delete_vendor]\n", ""),
        ("50000", "50001"),
        ("calls: 120", "calls: 121"),
        ("per_seconds: 60", "per_seconds: 61"),
        ("3600", "3601"),
        ("on_expiry: deny", "on_expiry: allow"),
    ],
)
def test_hash_changes_when_a_new_key_changes(old: str, new: str) -> None:
    assert parse_policy_text(STRICT.replace(old, new)).hash != parse_policy_text(STRICT).hash


def test_empty_tool_lists_are_kept_and_distinct_from_no_list() -> None:
    base = "policy:\n  agent: A\n"
    (allowed_none,) = parse_policy_text(base + "  allowed_tools: []\n").policies
    hashes = {
        parse_policy_text(base + extra).hash
        for extra in ("", "  allowed_tools: []\n", "  denied_tools: []\n")
    }

    assert allowed_none.allowed_tools == ()
    assert len(hashes) == 3


def test_rate_window_is_the_longest_window_of_the_role() -> None:
    policies = parse_policy_text(
        STRICT
        + "---\npolicy: {agent: Procurement-Agent-v2, rate_limit: {calls: 5, per_seconds: 1.5}}\n"
        + "---\npolicy: {agent: Auditor}\n"
    )

    assert policies.rate_window_s("Procurement-Agent-v2") == 60.0
    assert policies.rate_window_s("Auditor") is None
    assert policies.rate_window_s("Nobody") is None


def test_approval_terms_take_the_strictest_of_the_role() -> None:
    lenient = (
        "---\npolicy: {agent: Procurement-Agent-v2, approval_expiry_s: 60, on_expiry: allow}\n"
    )
    policies = parse_policy_text(SEED + lenient)
    only_lenient = parse_policy_text(lenient)

    assert policies.approval_terms("Procurement-Agent-v2") == (60.0, "deny")
    assert only_lenient.approval_terms("Procurement-Agent-v2") == (60.0, "allow")
    assert policies.approval_terms("Nobody") == (DEFAULT_APPROVAL_EXPIRY_S, "deny")


SEED_VARIANTS = {
    "comments_and_blank_lines": (
        "# procurement\n\npolicy:   # the one policy\n"
        "  agent: Procurement-Agent-v2  # role\n\n"
        "  spending_limit_usd: 10000\n  require_approval_if_over: 5000\n"
        "  allowed_vendors:\n    # vendors\n    - Vendor_A\n    - Vendor_B\n"
        "  reflection_loop_cap: 25\n  escalation: human_review\n\n\n"
    ),
    "key_order": (
        "policy:\n  escalation: human_review\n  reflection_loop_cap: 25\n"
        "  allowed_vendors: [Vendor_A, Vendor_B]\n  require_approval_if_over: 5000\n"
        "  spending_limit_usd: 10000\n  agent: Procurement-Agent-v2\n"
    ),
    "flow_style_and_quotes": (
        "{policy: {agent: 'Procurement-Agent-v2', spending_limit_usd: 10000.0,"
        ' require_approval_if_over: 5000, allowed_vendors: ["Vendor_B", "Vendor_A"],'
        " reflection_loop_cap: 25}}"
    ),
    "wider_indentation_and_crlf": SEED.replace("  ", "      ").replace("\n", "\r\n"),
    "policies_list": "policies:\n  - " + SEED.replace("\n", "\n    "),
    "policies_list_of_bodies": (
        "policies:\n  - agent: Procurement-Agent-v2\n    spending_limit_usd: 10000\n"
        "    require_approval_if_over: 5000\n    allowed_vendors: [Vendor_A, Vendor_B]\n"
        "    reflection_loop_cap: 25\n"
    ),
    "explicit_document_markers": "%YAML 1.1\n---\n" + SEED + "...\n",
    "duplicated_document": SEED + "---\n" + SEED,
}


@pytest.mark.parametrize("text", SEED_VARIANTS.values(), ids=SEED_VARIANTS.keys())
def test_hash_ignores_comments_whitespace_key_order_and_duplicates(text: str) -> None:
    policies = parse_policy_text(text)

    assert policies.hash == SEED_HASH
    assert len(policies.policies) == 1


def test_policy_files_compose_independent_of_order_and_duplicates(tmp_path: Path) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(SEED, encoding="utf-8")
    auditor = tmp_path / "auditor.yaml"
    auditor.write_text("policy:\n  agent: Auditor\n  reflection_loop_cap: 3\n", encoding="utf-8")
    copy = tmp_path / "z-copy-of-seed.yaml"
    copy.write_text("# same policy, other file\n" + SEED, encoding="utf-8")

    forward = load_policies([seed, auditor])
    backward = load_policies([auditor, copy, seed, auditor])

    assert forward == backward
    assert [p.agent for p in forward.policies] == ["Auditor", "Procurement-Agent-v2"]
    assert forward.for_agent("Procurement-Agent-v2")[0].source == str(seed)
    assert forward.hash != SEED_HASH


def test_no_policy_files_give_an_empty_set() -> None:
    empty = load_policies([])

    assert empty.policies == ()
    assert re.fullmatch(r"[0-9a-f]{64}", empty.hash)


def test_load_policies_rejects_a_single_path_string() -> None:
    with pytest.raises(TypeError, match="iterable of paths"):
        load_policies(str(SEED_FILE))


def test_bytes_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + SEED.encode())

    assert load_policy_file(path).hash == SEED_HASH


def replace_line(number: int, new: str, *, text: str = SEED) -> str:
    lines = text.splitlines()
    lines[number - 1] = new
    return "\n".join(lines) + "\n"


def strict_line(number: int, new: str) -> str:
    return replace_line(number, new, text=STRICT)


def expenses_line(number: int, new: str) -> str:
    return replace_line(number, new, text=EXPENSES)


# (text, expected 1-based line, a fragment the one-line message must contain)
BAD_POLICIES: dict[str, tuple[str, int, str]] = {
    "top_level_list": ("- policy: x\n", 1, "got a list '- policy: x'"),
    "top_level_scalar": ("Procurement-Agent-v2\n", 1, "'Procurement-Agent-v2'"),
    "unknown_top_level_key": (SEED.replace("policy:", "polcy:"), 1, "'polcy'"),
    "extra_top_level_key": (SEED + "version: 2\n", 10, "'version'"),
    "policy_and_policies": (SEED + "policies: []\n", 1, "not both"),
    "empty_top_level_mapping": ("{}\n", 1, "got {}"),
    "policy_not_a_mapping": ("policy: Procurement-Agent-v2\n", 1, "'Procurement-Agent-v2'"),
    "policies_not_a_list": ("policies:\n  agent: A\n", 2, "got a mapping 'agent: A'"),
    "policies_empty_list": ("policies: []\n", 1, "empty list"),
    "unknown_key": (
        replace_line(8, "  reflection_cap: 25"),
        8,
        "'reflection_cap' in policy; did you mean 'reflection_loop_cap'?",
    ),
    "source_is_not_a_policy_key": (replace_line(9, "  source: x.yaml"), 9, "'source'"),
    "merge_key": ("policy:\n  agent: A\n  <<: {escalation: x}\n", 3, "'<<'"),
    "non_string_key": ("policy:\n  agent: A\n  7: seven\n", 3, "'7'"),
    "duplicate_key": (SEED + "  agent: Other-Agent\n", 10, "duplicate key 'agent'"),
    "duplicate_top_level_key": (SEED + SEED, 10, "duplicate key 'policy' (first on line 1)"),
    "string_limit": (replace_line(3, '  spending_limit_usd: "ten"'), 3, "'ten'"),
    "quoted_number_limit": (replace_line(3, "  spending_limit_usd: '10000'"), 3, "'10000'"),
    "bare_word_limit": (replace_line(3, "  spending_limit_usd: ten thousand"), 3, "'ten thousand'"),
    "list_limit": (replace_line(3, "  spending_limit_usd: [10000]"), 3, "'[10000]'"),
    "boolean_limit": (replace_line(3, "  spending_limit_usd: true"), 3, "'true'"),
    "negative_limit": (replace_line(3, "  spending_limit_usd: -5"), 3, "'-5'"),
    "negative_threshold": (replace_line(4, "  require_approval_if_over: -0.5"), 4, "'-0.5'"),
    "octal_looking_limit": (replace_line(3, "  spending_limit_usd: 010000"), 3, "'010000'"),
    "hex_limit": (replace_line(3, "  spending_limit_usd: 0x2710"), 3, "'0x2710'"),
    "base_60_limit": (replace_line(3, "  spending_limit_usd: 2:46:40"), 3, "'2:46:40'"),
    "infinite_limit": (replace_line(3, "  spending_limit_usd: .inf"), 3, "'.inf'"),
    "not_a_number_limit": (replace_line(3, "  spending_limit_usd: .nan"), 3, "'.nan'"),
    "overflowing_limit": (replace_line(3, "  spending_limit_usd: 1e999"), 3, "'1e999'"),
    "malformed_underscores": (replace_line(3, "  spending_limit_usd: 1__0"), 3, "'1__0'"),
    "approval_over_limit": (
        replace_line(4, "  require_approval_if_over: 20000"),
        4,
        "require_approval_if_over (20000) is above spending_limit_usd (10000)",
    ),
    "fractional_cap": (replace_line(8, "  reflection_loop_cap: 2.5"), 8, "'2.5'"),
    "yes_as_cap": (replace_line(8, "  reflection_loop_cap: yes"), 8, "'yes'"),
    "negative_cap": (replace_line(8, "  reflection_loop_cap: -1"), 8, "'-1'"),
    "empty_agent": (replace_line(2, '  agent: ""'), 2, "''"),
    "blank_agent": (replace_line(2, "  agent: '   '"), 2, "'   '"),
    "padded_agent": (replace_line(2, "  agent: ' Procurement '"), 2, "' Procurement '"),
    "agent_without_value": (replace_line(2, "  agent:"), 2, "agent must be a string"),
    "null_agent": (replace_line(2, "  agent: null"), 2, "null ('null')"),
    "numeric_agent": (replace_line(2, "  agent: 42"), 2, "'42'"),
    "missing_agent": (SEED.replace("  agent: Procurement-Agent-v2\n", ""), 1, "'agent'"),
    "empty_escalation": (replace_line(9, "  escalation: ''"), 9, "''"),
    "empty_vendor": (replace_line(6, '    - ""'), 6, "''"),
    "numeric_vendor": (replace_line(7, "    - 42"), 7, "'42'"),
    "nested_vendor": (replace_line(7, "    - [Vendor_B]"), 7, "'[Vendor_B]'"),
    "duplicate_vendor": (replace_line(7, "    - Vendor_A"), 7, "'Vendor_A' is listed twice"),
    "vendor_string_not_list": (
        "policy:\n  agent: A\n  allowed_vendors: Vendor_A\n",
        3,
        "'Vendor_A'",
    ),
    "yaml_mapping_in_value": (replace_line(3, "  spending_limit_usd: 10000: 5"), 3, "10000: 5"),
    "yaml_bad_indentation": (replace_line(4, "   require_approval_if_over: 5000"), 4, "5000"),
    "yaml_tab_indentation": (replace_line(9, "\tescalation: human_review"), 9, "escalation"),
    "yaml_unclosed_quote": (replace_line(2, '  agent: "Procurement'), 2, '"Procurement'),
    "yaml_unclosed_flow_list": (replace_line(5, "  allowed_vendors: [Vendor_A"), 5, "[Vendor_A"),
    "yaml_undefined_alias": (replace_line(9, "  escalation: *target"), 9, "'target'"),
    "yaml_control_character": (replace_line(2, "  agent: Proc\x07"), 2, "'\\x07'"),
    "empty_text": ("", 1, "no policy found"),
    "only_comments": ("# nothing here yet\n", 1, "no policy found"),
    "en_dash_bullet": (replace_line(6, f"    {EN_DASH} Vendor_A"), 6, f"'    {EN_DASH} Vendor_A'"),
    "em_dash_bullet": (replace_line(7, f"    {EM_DASH} Vendor_B"), 7, "em dash"),
    "bullet_character": (replace_line(6, "    • Vendor_A"), 6, "bullet ('•', U+2022)"),
    "minus_sign_bullet": (replace_line(6, f"    {MINUS_SIGN} Vendor_A"), 6, "U+2212"),
    "non_breaking_space_indent": (replace_line(6, "\u00a0\u00a0  - Vendor_A"), 6, "U+00A0"),
    "curly_quotes": (replace_line(2, "  agent: “Procurement-Agent-v2”"), 2, "U+201C"),
    "curly_quote_in_list": (
        replace_line(6, f"    - {LEFT_QUOTE}Vendor_A{RIGHT_QUOTE}"),
        6,
        "U+2018",
    ),
    # --- tools, daily limit, rate limit, approval expiry ---
    "tools_typo": (
        strict_line(3, "  allowed_tool: [erp.create_purchase_order]"),
        3,
        "'allowed_tool' in policy; did you mean 'allowed_tools'?",
    ),
    "tools_string_not_list": (
        strict_line(3, "  allowed_tools: erp.create_purchase_order"),
        3,
        "allowed_tools must be a list of names, got the string 'erp.create_purchase_order'",
    ),
    "numeric_tool": (strict_line(4, "  denied_tools: [42]"), 4, "denied_tools must be a string"),
    "empty_tool": (strict_line(4, "  denied_tools: ['']"), 4, "''"),
    "nested_tool": (strict_line(4, "  denied_tools: [[erp.x]]"), 4, "'[erp.x]'"),
    "duplicate_tool": (
        strict_line(4, "  denied_tools: [erp.x, erp.x]"),
        4,
        "tool 'erp.x' is listed twice (first on line 4)",
    ),
    "tool_allowed_and_denied": (
        strict_line(4, "  denied_tools:\n    - erp.x\n    - erp.get_quote"),
        6,
        "tool 'erp.get_quote' is in both allowed_tools (line 3) and denied_tools",
    ),
    "en_dash_tool_bullet": (
        strict_line(3, f"  allowed_tools:\n    {EN_DASH} erp.create_purchase_order"),
        4,
        f"en dash ('{EN_DASH}', U+2013); YAML lists use '-': "
        f"'    {EN_DASH} erp.create_purchase_order'",
    ),
    "bullet_tool": (strict_line(4, "  denied_tools:\n    • erp.x"), 5, "'    • erp.x'"),
    "negative_daily_limit": (strict_line(5, "  daily_limit_usd: -50000"), 5, "'-50000'"),
    "quoted_daily_limit": (strict_line(5, "  daily_limit_usd: '50000'"), 5, "'50000'"),
    "infinite_daily_limit": (strict_line(5, "  daily_limit_usd: .inf"), 5, "'.inf'"),
    "daily_limit_typo": (
        strict_line(5, "  daily_limit: 50000"),
        5,
        "did you mean 'daily_limit_usd'?",
    ),
    "rate_limit_scalar": (strict_line(6, "  rate_limit: 120"), 6, "rate_limit must be a mapping"),
    "rate_limit_list": (strict_line(6, "  rate_limit: [120, 60]"), 6, "'[120, 60]'"),
    "rate_limit_unknown_key": (
        strict_line(6, "  rate_limit: {calls: 120, per_second: 60}"),
        6,
        "unknown key 'per_second' in rate_limit; did you mean 'per_seconds'?",
    ),
    "rate_limit_without_calls": (
        strict_line(6, "  rate_limit: {per_seconds: 60}"),
        6,
        "rate_limit has no 'calls'",
    ),
    "rate_limit_without_window": (
        strict_line(6, "  rate_limit:\n    calls: 120"),
        7,
        "rate_limit has no 'per_seconds'",
    ),
    "negative_rate_calls": (
        strict_line(6, "  rate_limit:\n    calls: -1\n    per_seconds: 60"),
        7,
        "rate_limit.calls must not be negative, got '-1'",
    ),
    "fractional_rate_calls": (
        strict_line(6, "  rate_limit: {calls: 1.5, per_seconds: 60}"),
        6,
        "'1.5'",
    ),
    "zero_rate_window": (
        strict_line(6, "  rate_limit:\n    calls: 120\n    per_seconds: 0"),
        8,
        "rate_limit.per_seconds must be greater than zero, got '0'",
    ),
    "negative_rate_window": (
        strict_line(6, "  rate_limit: {calls: 120, per_seconds: -60}"),
        6,
        "'-60'",
    ),
    "word_rate_window": (
        strict_line(6, "  rate_limit: {calls: 120, per_seconds: a minute}"),
        6,
        "'a minute'",
    ),
    "duplicate_rate_key": (
        strict_line(6, "  rate_limit:\n    calls: 1\n    calls: 2\n    per_seconds: 60"),
        8,
        "duplicate key 'calls' (first on line 7)",
    ),
    "zero_expiry": (
        strict_line(7, "  approval_expiry_s: 0"),
        7,
        "approval_expiry_s must be greater than zero, got '0'",
    ),
    "negative_expiry": (strict_line(7, "  approval_expiry_s: -3600"), 7, "'-3600'"),
    "string_expiry": (strict_line(7, "  approval_expiry_s: 1h"), 7, "'1h'"),
    "unknown_on_expiry": (
        strict_line(8, "  on_expiry: escalate"),
        8,
        "on_expiry must be 'deny' or 'allow', got 'escalate'",
    ),
    "boolean_on_expiry": (strict_line(8, "  on_expiry: no"), 8, "on_expiry must be a string"),
    "capitalised_on_expiry": (strict_line(8, "  on_expiry: Deny"), 8, "'Deny'"),
    # --- rules on arguments ---
    "pattern_that_does_not_compile": (
        expenses_line(12, '    - {arg: memo, matches: "(cash"}'),
        12,
        "deny_if[0].matches is not a valid RE2 pattern (missing ): (cash): '(cash'",
    ),
    "backreference_pattern": (
        expenses_line(12, '    - {arg: memo, matches: "(a)\\\\1"}'),
        12,
        "not a valid RE2 pattern (invalid escape sequence: \\1)",
    ),
    "lookahead_pattern": (
        expenses_line(12, '    - {arg: memo, matches: "cash(?!ier)"}'),
        12,
        "'cash(?!ier)'",
    ),
    "empty_pattern": (
        expenses_line(12, '    - {arg: memo, matches: ""}'),
        12,
        "deny_if[0].matches is empty, so it would match every string",
    ),
    "number_pattern": (
        expenses_line(12, "    - {arg: memo, matches: 42}"),
        12,
        "deny_if[0].matches must be a pattern string, got '42'",
    ),
    "two_operators": (
        expenses_line(10, "    - {arg: amount_usd, over: 1000, under: 5000}"),
        10,
        "escalate_if[1] has 2 operators (over, under); write one condition per operator",
    ),
    "no_operator": (
        expenses_line(10, "    - {arg: amount_usd, reason: big}"),
        10,
        "escalate_if[1] has no operator; give one of over, at_least",
    ),
    "operator_typo": (
        expenses_line(10, "    - {arg: amount_usd, ovr: 1000}"),
        10,
        "unknown key 'ovr' in escalate_if[1]; did you mean 'over'?",
    ),
    "no_arg": (
        expenses_line(10, "    - {over: 1000}"),
        10,
        "escalate_if[1] has no 'arg' naming the argument it reads",
    ),
    "numeric_arg": (expenses_line(10, "    - {arg: 7, over: 1000}"), 10, "escalate_if[1].arg"),
    "string_bound": (
        expenses_line(10, "    - {arg: amount_usd, over: lots}"),
        10,
        "escalate_if[1].over must be a number in plain decimal, got 'lots'",
    ),
    "quoted_bound": (expenses_line(10, "    - {arg: amount_usd, over: '1000'}"), 10, "'1000'"),
    "infinite_bound": (expenses_line(10, "    - {arg: amount_usd, over: .inf}"), 10, "'.inf'"),
    "norway_in_a_list": (
        expenses_line(5, "    currency: [USD, NO]"),
        5,
        "each value in allowed_values.currency: YAML reads 'NO' as a bool, not a string; "
        "quote it ('NO') for the string, or write true or false",
    ),
    "date_value": (
        expenses_line(12, "    - {arg: memo, equals: 2024-01-01}"),
        12,
        "deny_if[0].equals: YAML reads '2024-01-01' as a timestamp",
    ),
    "null_value": (
        expenses_line(12, "    - {arg: memo, equals: null}"),
        12,
        "deny_if[0].equals must be a value, got null ('null')",
    ),
    "list_for_equals": (
        expenses_line(12, "    - {arg: memo, equals: [a]}"),
        12,
        "deny_if[0].equals must be a single value",
    ),
    "mapping_for_in": (
        expenses_line(9, "    - {arg: category, in: {travel: 1}}"),
        9,
        "escalate_if[0].in must be a list of values",
    ),
    "empty_in": (
        expenses_line(9, "    - {arg: category, in: []}"),
        9,
        "escalate_if[0].in lists no values",
    ),
    "duplicate_value": (
        expenses_line(5, "    currency: [USD, EUR, USD]"),
        5,
        "value 'USD' is listed twice in allowed_values.currency (first on line 5)",
    ),
    "duplicate_number_spellings": (
        expenses_line(9, "    - {arg: category, in: [1, 1.0]}"),
        9,
        "value '1.0' is listed twice",
    ),
    "duplicate_condition": (
        expenses_line(9, "    - {arg: amount_usd, over: 1000.0}"),
        10,
        "this condition is listed twice in escalate_if (first on line 9)",
    ),
    "conditions_not_a_list": (
        "policy:\n  agent: A\n  escalate_if: {arg: amount_usd, over: 1000}\n",
        3,
        "escalate_if must be a list of conditions",
    ),
    "condition_not_a_mapping": (
        expenses_line(12, "    - memo matches cash"),
        12,
        "deny_if[0] must be a mapping",
    ),
    "allowed_values_a_list": (
        "policy:\n  agent: A\n  allowed_values: [USD, EUR]\n",
        3,
        "allowed_values must be a mapping",
    ),
    "allowed_values_empty_list": (
        expenses_line(5, "    currency: []"),
        5,
        "allowed_values.currency lists no values",
    ),
    "vendor_restricted_twice": (
        SEED.replace("  escalation: human_review\n", "  allowed_values: {vendor: [Vendor_A]}\n"),
        9,
        "vendor is restricted by both allowed_vendors and allowed_values",
    ),
    "rule_key_typo": (
        expenses_line(8, "  escalate_when:"),
        8,
        "did you mean 'escalate_if'?",
    ),
}


@pytest.mark.parametrize(("text", "line", "fragment"), BAD_POLICIES.values(), ids=BAD_POLICIES)
def test_invalid_policy_is_a_policy_error_naming_line_and_value(
    text: str, line: int, fragment: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy_text(text, source="policies/bad.yaml")

    error = caught.value
    message = str(error)
    assert error.line == line, message
    assert error.path == "policies/bad.yaml"
    assert message.startswith(f"policies/bad.yaml:{line}: "), message
    assert fragment in message
    assert "\n" not in message


def test_en_dash_bullets_pasted_into_the_seed_give_line_6_in_one_line() -> None:
    pasted = SEED.replace("    - Vendor_", f"    {EN_DASH} Vendor_")

    with pytest.raises(PolicyError) as caught:
        parse_policy_text(pasted, source="policies/x.yaml")

    assert str(caught.value) == (
        f"policies/x.yaml:6: list item starts with an en dash ('{EN_DASH}', U+2013); "
        f"YAML lists use '-': '    {EN_DASH} Vendor_A'"
    )
    assert caught.value.line == 6
    assert caught.value.value == f"    {EN_DASH} Vendor_A"


def test_dashes_inside_values_and_comments_are_not_bullets() -> None:
    escalation = f"human_review {EN_DASH} finance"
    text = SEED.replace("human_review", escalation) + f"# {EN_DASH} a note\n  # {EN_DASH}\n"

    assert parse_policy_text(text).policies[0].escalation == escalation


def test_policy_error_is_a_value_error_and_a_govmesh_error() -> None:
    with pytest.raises(ValueError):
        parse_policy_text("policy: 1\n")
    assert issubclass(PolicyError, GovmeshError)


def test_missing_file_is_a_policy_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(PolicyError, match="policy file not found") as caught:
        load_policy_file(missing)

    assert caught.value.path == str(missing)
    assert str(caught.value).startswith(f"{missing}: ")


def test_missing_file_among_several_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nope\.yaml"):
        load_policies([SEED_FILE, tmp_path / "nope.yaml"])


def test_directory_is_a_policy_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="directory") as caught:
        load_policy_file(tmp_path)

    assert caught.value.path == str(tmp_path)


def test_non_utf8_file_is_a_policy_error_with_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(SEED.replace("Vendor_B", "Vendör_B").encode("latin-1"))

    with pytest.raises(PolicyError, match="not UTF-8") as caught:
        load_policy_file(path)

    assert caught.value.line == 7


def test_file_errors_carry_the_file_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(replace_line(3, "  spending_limit_usd: ten"), encoding="utf-8")

    with pytest.raises(PolicyError) as caught:
        load_policy_file(path)

    assert str(caught.value).startswith(f"{path}:3: spending_limit_usd must be a number")


# --- properties -------------------------------------------------------------------------------

AGENTS = ["Procurement-Agent-v2", "Auditor", "yes", "10000", "Agent with spaces"]
VENDORS = ["Vendor_A", "Vendor_B", "Vendor_C", "null", "Vendör_Ω"]
TOOLS = ["erp.create_purchase_order", "erp.get_quote", "mail.send", "true", "Tool with spaces"]
POSITIVE = st.one_of(
    st.sampled_from([1, 60, 3600, 86400]),
    st.integers(min_value=1, max_value=10**7),
    st.floats(min_value=0.001, max_value=1e7, allow_nan=False, allow_infinity=False),
)
AMOUNTS = st.one_of(
    st.sampled_from([0, 1, 4000, 5000, 10000]),
    st.integers(min_value=0, max_value=10**9),
    st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False),
)


@st.composite
def policy_bodies(draw: st.DrawFn) -> dict[str, object]:
    body: dict[str, object] = {"agent": draw(st.sampled_from(AGENTS))}
    limit = draw(st.none() | AMOUNTS)
    threshold = draw(st.none() | AMOUNTS)
    if limit is not None and threshold is not None and threshold > limit:
        limit, threshold = threshold, limit
    optional: dict[str, object] = {
        "spending_limit_usd": limit,
        "require_approval_if_over": threshold,
        "allowed_vendors": draw(st.none() | st.lists(st.sampled_from(VENDORS), unique=True)),
        "reflection_loop_cap": draw(st.none() | st.integers(min_value=0, max_value=100)),
        "escalation": draw(st.none() | st.sampled_from(["human_review", "cfo_review"])),
        "daily_limit_usd": draw(st.none() | AMOUNTS),
        "approval_expiry_s": draw(st.none() | POSITIVE),
        "on_expiry": draw(st.none() | st.sampled_from(["deny", "allow"])),
    }
    tools = draw(st.lists(st.sampled_from(TOOLS), unique=True))
    split = draw(st.integers(min_value=0, max_value=len(tools)))
    if draw(st.booleans()):
        optional["allowed_tools"] = tools[:split]
    if draw(st.booleans()):
        optional["denied_tools"] = tools[split:]
    if draw(st.booleans()):
        optional["rate_limit"] = {
            "calls": draw(st.integers(min_value=0, max_value=10**6)),
            "per_seconds": draw(POSITIVE),
        }
    for key in ("allowed_values", "denied_values"):
        if draw(st.booleans()):
            optional[key] = {
                arg: draw(st.lists(RULE_VALUES, min_size=1, max_size=3, unique_by=value_order))
                for arg in draw(st.lists(st.sampled_from(RULE_ARGS), min_size=1, unique=True))
            }
    for key in ("escalate_if", "deny_if"):
        if draw(st.booleans()):
            optional[key] = draw(
                st.lists(CONDITION_BODIES, min_size=1, max_size=3, unique_by=json.dumps)
            )
    body.update({key: value for key, value in optional.items() if value is not None})
    keys = draw(st.permutations(list(body)))
    return {key: body[key] for key in keys}


RULE_ARGS = ["category", "memo", "amount_usd", "with spaces"]
RULE_VALUES = st.sampled_from(["travel", "yes", "10000", "", "Vendör_Ω", 0, 2.5, -3, True, False])
CONDITION_BODIES = st.one_of(
    st.builds(
        lambda arg, op, bound: {"arg": arg, op: bound},
        st.sampled_from(RULE_ARGS),
        st.sampled_from(["over", "at_least", "under", "at_most"]),
        st.sampled_from([0, -1, 2.5, 10000]),
    ),
    st.builds(
        lambda arg, op, value: {"arg": arg, op: value},
        st.sampled_from(RULE_ARGS),
        st.sampled_from(["equals", "not_equals"]),
        RULE_VALUES,
    ),
    st.builds(
        lambda arg, op, values, reason: {"arg": arg, op: values, "reason": reason},
        st.sampled_from(RULE_ARGS),
        st.sampled_from(["in", "not_in"]),
        st.lists(RULE_VALUES, min_size=1, max_size=3, unique_by=value_order),
        st.sampled_from(["needs a manager", "no: never"]),
    ),
    st.builds(
        lambda arg, pattern: {"arg": arg, "matches": pattern},
        st.sampled_from(RULE_ARGS),
        st.sampled_from(["(?i)cash advance", "^a.*z$", "[0-9]{3}"]),
    ),
)


def expected_condition(body: dict[str, Any]) -> Condition:
    (op,) = set(body) - {"arg", "reason"}
    value = body[op]

    def scalar(item: Any) -> Any:
        return item if isinstance(item, str | bool) else float(item)

    return Condition(
        arg=body["arg"],
        op=op,
        value=tuple(sorted(map(scalar, value), key=value_order))
        if isinstance(value, list)
        else scalar(value),
        reason=body.get("reason", ""),
    )


def canonical_key(condition: Condition) -> str:
    return json.dumps(
        condition.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def expected_policy(body: dict[str, object]) -> Policy:
    def number(key: str) -> float | None:
        value = body.get(key)
        assert value is None or isinstance(value, int | float)
        return None if value is None else float(value)

    def names(key: str) -> tuple[str, ...] | None:
        value = body.get(key)
        assert value is None or isinstance(value, list)
        return None if value is None else tuple(sorted(value))

    def values(key: str) -> tuple[ArgValues, ...]:
        rules: Any = body.get(key, {})
        return tuple(
            ArgValues(
                arg=arg,
                values=tuple(
                    sorted(
                        (v if isinstance(v, str | bool) else float(v) for v in listed),
                        key=value_order,
                    )
                ),
            )
            for arg, listed in sorted(rules.items())
        )

    def conditions(key: str) -> tuple[Condition, ...]:
        listed: Any = body.get(key, [])
        return tuple(sorted(map(expected_condition, listed), key=canonical_key))

    cap = body.get("reflection_loop_cap")
    rate = body.get("rate_limit")
    expiry = number("approval_expiry_s")
    assert cap is None or isinstance(cap, int)
    assert rate is None or isinstance(rate, dict)
    return Policy(
        agent=str(body["agent"]),
        spending_limit_usd=number("spending_limit_usd"),
        require_approval_if_over=number("require_approval_if_over"),
        allowed_vendors=names("allowed_vendors"),
        reflection_loop_cap=cap,
        escalation=str(body.get("escalation", "human_review")),
        allowed_tools=names("allowed_tools"),
        denied_tools=names("denied_tools"),
        daily_limit_usd=number("daily_limit_usd"),
        rate_limit=None
        if rate is None
        else RateLimit(calls=rate["calls"], per_seconds=float(rate["per_seconds"])),
        approval_expiry_s=DEFAULT_APPROVAL_EXPIRY_S if expiry is None else expiry,
        on_expiry="allow" if body.get("on_expiry") == "allow" else "deny",
        allowed_values=values("allowed_values"),
        denied_values=values("denied_values"),
        escalate_if=conditions("escalate_if"),
        deny_if=conditions("deny_if"),
        source="<policy>",
    )


def render(bodies: list[dict[str, object]], *, flow: bool | None = None) -> str:
    return yaml.safe_dump(
        {"policies": [{"policy": body} for body in bodies]},
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=flow,
    )


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(policy_bodies(), min_size=1, max_size=4))
def test_rendered_policies_round_trip_exactly(bodies: list[dict[str, object]]) -> None:
    loaded = parse_policy_text(render(bodies))

    assert set(loaded.policies) == {expected_policy(body) for body in bodies}


@settings(max_examples=examples(150), deadline=None)
@given(st.lists(policy_bodies(), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_hash_and_set_ignore_order_duplicates_and_style(
    bodies: list[dict[str, object]], rng: random.Random
) -> None:
    shuffled = bodies + rng.sample(bodies, k=rng.randint(0, len(bodies)))
    rng.shuffle(shuffled)
    reordered = [dict(rng.sample(list(body.items()), k=len(body))) for body in shuffled]

    original = parse_policy_text(render(bodies))
    variant = parse_policy_text(render(reordered, flow=rng.choice([None, True, False])))

    assert variant == original
    assert isinstance(variant, PolicySet)


@settings(max_examples=examples(250), deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_arbitrary_text_is_parsed_or_rejected_with_a_policy_error(text: str) -> None:
    try:
        parse_policy_text(text)
    except PolicyError as error:
        assert error.line is None or error.line >= 1


@settings(max_examples=examples(250), deadline=None)
@given(st.integers(min_value=0, max_value=len(SEED)), st.text(max_size=8))
def test_corrupted_seed_is_parsed_or_rejected_with_a_policy_error(at: int, junk: str) -> None:
    try:
        parse_policy_text(SEED[:at] + junk + SEED[at:])
    except PolicyError as error:
        assert error.line is not None
        assert 1 <= error.line <= SEED.count("\n") + junk.count("\n") + 2


# --- govmesh policy ---------------------------------------------------------------------------


def _policy_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "govmesh.cli", "policy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_policy_explain_says_what_each_rule_on_arguments_decides(tmp_path: Path) -> None:
    expenses = tmp_path / "expenses.yaml"
    expenses.write_text(EXPENSES)

    run = _policy_command("explain", str(SEED_FILE), str(expenses))

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "role Expense-Agent: 1 policy" in lines
    for line in (
        "deny any tool but ['ledger.pay_expense']",
        "deny unless currency is one of ['EUR', 'USD'] (a call without one is denied)",
        "deny when category is one of ['gift_cards']",
        "deny when memo matches '(?i)cash advance'",
        "escalate to human_review when amount_usd is over 1000",
        "escalate to human_review when category is one of ['entertainment', 'travel']: "
        "travel and entertainment need a manager",
        "escalate to human_review when the spend is over 5000 USD",
    ):
        assert f"    - {line}" in lines
    assert lines[-1] == f"policy hash {load_policies([SEED_FILE, expenses]).hash}"


def test_policy_check_names_the_line_of_a_pattern_that_does_not_compile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(expenses_line(12, '    - {arg: memo, matches: "[bold]cash(?=advance)"}'))

    run = _policy_command("check", str(bad))

    assert run.returncode == 2
    message = " ".join(run.stdout.split() + run.stderr.split())
    assert f"{bad}:12: deny_if[0].matches is not a valid RE2 pattern" in message
    assert "'[bold]cash(?=advance)'" in message
