"""Policy files: a strict YAML schema compiled into an immutable, hashed ``PolicySet``.

A policy file holds one ``policy:`` mapping, or a ``policies:`` list of them, optionally split
over several YAML documents. Every mistake is a ``PolicyError`` naming the file, the 1-based line
and the offending value; nothing ambiguous is guessed at (YAML 1.1 octal, ``yes`` as a number,
a quoted ``"10000"``).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final, Literal, NamedTuple, NoReturn

import msgspec
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from govmesh.errors import PolicyError
from govmesh.governance._rules import (
    COMPARISONS,
    OPERATORS,
    ArgValues,
    Condition,
    PatternError,
    Scalar,
    canonical_value,
    compile_pattern,
    shown,
    value_order,
    value_text,
)

__all__ = [
    "DEFAULT_APPROVAL_EXPIRY_S",
    "Figures",
    "OnExpiry",
    "Policy",
    "PolicySet",
    "RateLimit",
    "compose_policies",
    "load_policies",
    "load_policy_file",
    "parse_policy_text",
]


OnExpiry = Literal["deny", "allow"]
"""What happens to an escalated intent nobody answers before its approval expires."""

DEFAULT_APPROVAL_EXPIRY_S: Final = 86400.0
"""How long an escalated intent waits for approval when its policy does not say: one day."""


class RateLimit(msgspec.Struct, frozen=True, kw_only=True):
    """At most ``calls`` tool calls by one agent in any ``per_seconds`` window.

    Attributes:
        calls: calls allowed in the window; the next one is denied.
        per_seconds: the window length in seconds (positive).
    """

    calls: int
    per_seconds: float


class Policy(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """One compiled ``policy:`` document.

    Attributes:
        agent: the agent role this policy governs (matched against the identity token's role).
        spending_limit_usd: cap on the total spend of one workflow, or ``None`` for no cap.
        require_approval_if_over: single amounts above this escalate, or ``None``.
        allowed_vendors: the only vendors a call may name (sorted), or ``None`` for no
            restriction.
        reflection_loop_cap: most reflection iterations allowed per workflow, or ``None``.
        escalation: where escalated intents go, e.g. ``"human_review"``.
        allowed_tools: the only tools the role may call under this policy (sorted), or ``None``
            for no tool restriction from this policy.
        denied_tools: tools the role may never call (sorted), or ``None``.
        daily_limit_usd: cap on one agent's spend per UTC day, or ``None`` for no cap.
        rate_limit: most calls by one agent per time window, or ``None``.
        approval_expiry_s: seconds an escalated intent waits for an answer.
        on_expiry: the outcome of an escalated intent left unanswered past its expiry.
        allowed_values: per argument, the only values a call may give it (by argument); a
            call without the argument is denied. ``allowed_vendors`` is this rule for
            ``vendor``, and ``allowed_values: {vendor: [...]}`` of strings compiles to it.
        denied_values: per argument, values a call may not give it (by argument).
        escalate_if: conditions on arguments, any of which escalates (canonical order).
        deny_if: conditions on arguments, any of which denies (canonical order).
        source: the file the policy came from; not part of the policy's identity or hash.
    """

    agent: str
    spending_limit_usd: float | None = None
    require_approval_if_over: float | None = None
    allowed_vendors: tuple[str, ...] | None = None
    reflection_loop_cap: int | None = None
    escalation: str = "human_review"
    allowed_tools: tuple[str, ...] | None = None
    denied_tools: tuple[str, ...] | None = None
    daily_limit_usd: float | None = None
    rate_limit: RateLimit | None = None
    approval_expiry_s: float = DEFAULT_APPROVAL_EXPIRY_S
    on_expiry: OnExpiry = "deny"
    allowed_values: tuple[ArgValues, ...] = ()
    denied_values: tuple[ArgValues, ...] = ()
    escalate_if: tuple[Condition, ...] = ()
    deny_if: tuple[Condition, ...] = ()
    source: str = ""

    @functools.cached_property
    def vendor_set(self) -> frozenset[str] | None:
        """``allowed_vendors`` as a frozenset, built once, for constant-time membership."""
        return None if self.allowed_vendors is None else frozenset(self.allowed_vendors)

    @functools.cached_property
    def allowed_tool_set(self) -> frozenset[str]:
        """``allowed_tools`` as a frozenset, built once, for constant-time membership (empty
        when the policy lists none: check ``allowed_tools`` first)."""
        return frozenset(self.allowed_tools or ())

    @functools.cached_property
    def denied_tool_set(self) -> frozenset[str]:
        """``denied_tools`` as a frozenset, built once, for constant-time membership."""
        return frozenset(self.denied_tools or ())

    def explain(self) -> list[str]:
        """The policy's rules in words, one line each, in the order they are checked; what
        no rule denies or escalates is allowed."""
        escalate = f"escalate to {self.escalation}"
        lines: list[str] = []
        if self.allowed_tools is not None:
            lines.append(f"deny any tool but {value_text(self.allowed_tools)}")
        if self.denied_tools is not None:
            lines.append(f"deny the tools {value_text(self.denied_tools)}")
        if self.rate_limit is not None:
            rate = self.rate_limit
            lines.append(
                f"deny a call once {rate.calls} calls by the agent came in the last "
                f"{value_text(rate.per_seconds)} s"
            )
        if self.reflection_loop_cap is not None:
            lines.append(f"deny after more than {self.reflection_loop_cap} reflections")
        if self.allowed_vendors is not None:
            lines.append(
                f"deny unless vendor is one of {value_text(self.allowed_vendors)} "
                "(a call without one is denied)"
            )
        for rule in self.allowed_values:
            lines.append(
                f"deny unless {rule.arg} is one of {value_text(rule.values)} "
                f"(a call without one is denied)"
            )
        for rule in self.denied_values:
            lines.append(f"deny when {rule.arg} is one of {value_text(rule.values)}")
        for kind, conditions in (("deny", self.deny_if), (escalate, self.escalate_if)):
            for condition in conditions:
                why = f": {condition.reason}" if condition.reason else ""
                lines.append(f"{kind} when {condition.arg} {condition.relation}{why}")
        if self.spending_limit_usd is not None:
            lines.append(
                "deny when the spend plus the workflow's committed spend is over "
                f"{value_text(self.spending_limit_usd)} USD"
            )
        if self.daily_limit_usd is not None:
            lines.append(
                "deny when the spend plus the agent's spend today (UTC) is over "
                f"{value_text(self.daily_limit_usd)} USD"
            )
        if self.require_approval_if_over is not None:
            lines.append(
                f"{escalate} when the spend is over {value_text(self.require_approval_if_over)} USD"
            )
        if self.approval_expiry_s != DEFAULT_APPROVAL_EXPIRY_S or self.on_expiry != "deny":
            lines.append(
                f"an escalation unanswered for {value_text(self.approval_expiry_s)} s "
                f"becomes {self.on_expiry}"
            )
        return lines

    @functools.cached_property
    def reads_args(self) -> bool:
        """Whether some rule of this policy reads arguments other than spend and ``vendor``."""
        return bool(self.allowed_values or self.denied_values or self.escalate_if or self.deny_if)


class Figures(NamedTuple):
    """Which context figures the policies of one role look at.

    Attributes:
        workflow_spend: some policy has a ``spending_limit_usd`` (``workflow_spend_usd``).
        day_spend: some policy has a ``daily_limit_usd`` (``day_spend_usd``).
        rate_window_s: the window to count ``recent_calls`` over, None without a rate limit.
    """

    workflow_spend: bool
    day_spend: bool
    rate_window_s: float | None


_NO_FIGURES: Final = Figures(workflow_spend=False, day_spend=False, rate_window_s=None)


class PolicySet(msgspec.Struct, frozen=True, dict=True):
    """The compiled policies in force, deduplicated and in canonical order.

    Build one with ``load_policy_file``, ``load_policies`` or ``parse_policy_text``: they sort
    and deduplicate the policies so the set, its hash and every verdict are independent of file
    order, duplicated files, comments and formatting.

    Attributes:
        policies: the distinct policies, sorted by their canonical form.
        hash: sha256 hex of the canonical form of the whole set.
    """

    policies: tuple[Policy, ...]
    hash: str

    def for_agent(self, role: str) -> tuple[Policy, ...]:
        """Return the policies governing ``role`` (empty when none does)."""
        return self._by_role.get(role, ())

    def rate_window_s(self, role: str) -> float | None:
        """Return the window over which the caller must count ``EvalContext.recent_calls``.

        It is the longest ``rate_limit.per_seconds`` among the policies governing ``role``, or
        ``None`` when none of them has a rate limit. Counting over the longest window can only
        overcount for a policy with a shorter one, so the result errs towards denying.
        """
        return self._rate_windows.get(role)

    def figures(self, role: str) -> Figures:
        """Return which figures of the `EvalContext` some policy governing ``role`` looks at;
        a decision for the role depends on no other figure."""
        return self._figures.get(role, _NO_FIGURES)

    def approval_terms(self, role: str) -> tuple[float, OnExpiry]:
        """Return how long an escalation for ``role`` waits, and what it becomes when it lapses.

        Every policy governing the role has a say, and the strictest wins: the shortest
        ``approval_expiry_s``, and ``"allow"`` on expiry only when every one of them says
        ``on_expiry: allow``. A stricter policy file added for a role thus shortens its
        approvals too, and adding a policy never relaxes them. A role without policies gets
        the defaults.
        """
        return self._approval_terms.get(role, (DEFAULT_APPROVAL_EXPIRY_S, "deny"))

    @functools.cached_property
    def allow_reasons(self) -> dict[str, tuple[str, ...]]:
        """The reasons of an allow, by role: how many policies allowed it. Written once per
        set, as every allow of a role gives the same."""
        return {
            role: (
                f"allowed by {len(group)} {'policy' if len(group) == 1 else 'policies'} "
                f"for role {shown(role)}",
            )
            for role, group in self._by_role.items()
        }

    @functools.cached_property
    def _by_role(self) -> dict[str, tuple[Policy, ...]]:
        # Built once per set so a lookup on the evaluation path is a single dict access.
        grouped: dict[str, list[Policy]] = {}
        for policy in self.policies:
            grouped.setdefault(policy.agent, []).append(policy)
        return {role: tuple(group) for role, group in grouped.items()}

    @functools.cached_property
    def _approval_terms(self) -> dict[str, tuple[float, OnExpiry]]:
        terms: dict[str, tuple[float, OnExpiry]] = {}
        for role, group in self._by_role.items():
            expiry = min(float(policy.approval_expiry_s) for policy in group)
            lenient = all(policy.on_expiry == "allow" for policy in group)
            terms[role] = (expiry, "allow" if lenient else "deny")
        return terms

    @functools.cached_property
    def _figures(self) -> dict[str, Figures]:
        return {
            role: Figures(
                workflow_spend=any(p.spending_limit_usd is not None for p in group),
                day_spend=any(p.daily_limit_usd is not None for p in group),
                rate_window_s=self._rate_windows.get(role),
            )
            for role, group in self._by_role.items()
        }

    @functools.cached_property
    def _rate_windows(self) -> dict[str, float]:
        windows: dict[str, float] = {}
        for policy in self.policies:
            if policy.rate_limit is not None:
                seconds = policy.rate_limit.per_seconds
                windows[policy.agent] = max(seconds, windows.get(policy.agent, seconds))
        return windows


def load_policy_file(path: str | Path) -> PolicySet:
    """Load and compile one policy file.

    Raises:
        PolicyError: the file is missing, unreadable, not UTF-8, or not a valid policy.
    """
    return _compose(_read_file(path))


def load_policies(paths: Iterable[str | Path]) -> PolicySet:
    """Load several policy files and compose them into one set.

    The result does not depend on the order of ``paths`` or on a file being listed twice.
    No paths gives an empty set, under which every intent is denied.

    Raises:
        PolicyError: any file is missing, unreadable or invalid.
        TypeError: ``paths`` is a single path rather than an iterable of paths.
    """
    if isinstance(paths, str | Path):
        # Iterating a str would try to load one file per character.
        raise TypeError(f"load_policies takes an iterable of paths, got {paths!r}")
    return _compose(policy for path in paths for policy in _read_file(path))


def parse_policy_text(text: str, *, source: str = "<policy>") -> PolicySet:
    """Compile policy YAML given as text; ``source`` names it in errors and ``Policy.source``.

    Raises:
        PolicyError: the text is not a valid policy.
    """
    return _compose(_Parser(text, source).policies())


def compose_policies(policies: Iterable[Policy]) -> PolicySet:
    """Compose already compiled policies (e.g. from several `parse_policy_text` results)
    into one set, exactly as `load_policies` composes files."""
    return _compose(policies)


_FORMAT: Final = "govmesh.policy-set/1"
_FIELDS: Final[tuple[str, ...]] = tuple(f for f in Policy.__struct_fields__ if f != "source")


def _canonical(policy: Policy) -> str:
    def number(value: float | None) -> float | None:
        # int and float spellings of one limit must hash alike; + 0.0 folds -0.0 into 0.0.
        return None if value is None else float(value) + 0.0

    def names(values: tuple[str, ...] | None) -> list[str] | None:
        return None if values is None else sorted(set(values))

    form: dict[str, object] = {
        "agent": policy.agent,
        "allowed_vendors": names(policy.allowed_vendors),
        "escalation": policy.escalation,
        "reflection_loop_cap": policy.reflection_loop_cap,
        "require_approval_if_over": number(policy.require_approval_if_over),
        "spending_limit_usd": number(policy.spending_limit_usd),
    }
    # Keys added after the first format appear only when they differ from their default, so
    # every policy written before they existed keeps its hash (snapshots and audit records
    # store it), and spelling out a default changes nothing.
    if policy.allowed_tools is not None:
        form["allowed_tools"] = names(policy.allowed_tools)
    if policy.denied_tools is not None:
        form["denied_tools"] = names(policy.denied_tools)
    if policy.daily_limit_usd is not None:
        form["daily_limit_usd"] = number(policy.daily_limit_usd)
    if policy.rate_limit is not None:
        form["rate_limit"] = {
            "calls": policy.rate_limit.calls,
            "per_seconds": number(policy.rate_limit.per_seconds),
        }
    if float(policy.approval_expiry_s) != DEFAULT_APPROVAL_EXPIRY_S:
        form["approval_expiry_s"] = number(policy.approval_expiry_s)
    if policy.on_expiry != "deny":
        form["on_expiry"] = policy.on_expiry
    for key, rules in (
        ("allowed_values", policy.allowed_values),
        ("denied_values", policy.denied_values),
    ):
        if rules:
            form[key] = {rule.arg: canonical_value(rule.values) for rule in rules}
    for key, conditions in (("escalate_if", policy.escalate_if), ("deny_if", policy.deny_if)):
        if conditions:
            # A list of conditions is a set: its order and repeats change no verdict.
            forms = {_json(c.canonical()): c.canonical() for c in conditions}
            form[key] = [forms[text] for text in sorted(forms)]
    return _json(form)


def _json(form: object) -> str:
    return json.dumps(
        form,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def _compose(policies: Iterable[Policy]) -> PolicySet:
    chosen: dict[str, Policy] = {}
    for policy in policies:
        key = _canonical(policy)
        kept = chosen.get(key)
        # Among identical policies keep the smallest source, so the set does not depend on
        # the order the files were given in.
        if kept is None or policy.source < kept.source:
            chosen[key] = policy
    keys = sorted(chosen)
    body = ",".join(keys)
    canonical = f'{{"format":"{_FORMAT}","policies":[{body}]}}'
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return PolicySet(tuple(chosen[key] for key in keys), digest)


def _read_file(path: str | Path) -> list[Policy]:
    name = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise PolicyError("policy file not found", path=name, value=name) from exc
    except IsADirectoryError as exc:
        raise PolicyError("policy path is a directory, not a file", path=name, value=name) from exc
    except OSError as exc:
        raise PolicyError(
            f"cannot read policy file: {exc.strerror or exc}", path=name, value=name
        ) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1]
        raise PolicyError(
            f"policy file is not UTF-8: byte {bad!r} at offset {exc.start}",
            path=name,
            line=data.count(b"\n", 0, exc.start) + 1,
            value=bad,
        ) from exc
    return _Parser(text, name).policies()


# Characters that word processors and chat tools put where YAML needs plain ASCII. YAML reads
# them as ordinary text, so a pasted list silently becomes one long string; catch them first.
_PASTED_BULLETS: Final[dict[str, str]] = {
    "\u2013": "an en dash",
    "\u2014": "an em dash",
    "\u2022": "a bullet",
    "\u2010": "a hyphen",
    "\u2212": "a minus sign",
}
_CURLY_QUOTES: Final[dict[str, str]] = {
    "\u201c": "a left double quotation mark",
    "\u201d": "a right double quotation mark",
    "\u2018": "a left single quotation mark",
    "\u2019": "a right single quotation mark",
}
_NBSP: Final = "\u00a0"
_VALUE_START: Final = re.compile(r"[ \t]*(?:-[ \t]+)?(?:[^\s:#][^:#]*:[ \t]+)?(.)")

_INT: Final = "tag:yaml.org,2002:int"
_FLOAT: Final = "tag:yaml.org,2002:float"
_STR: Final = "tag:yaml.org,2002:str"
_NULL: Final = "tag:yaml.org,2002:null"
_BOOL: Final = "tag:yaml.org,2002:bool"
_VENDOR_ARG: Final = "vendor"
# Plain decimal only: YAML 1.1 would otherwise read 010000 as octal, 0x2710 as hex and 1:30 as
# base 60, each a silently different limit.
_DECIMAL_INT: Final = re.compile(r"[-+]?(?:0|[1-9][0-9_]*)")
_DECIMAL: Final = re.compile(r"[-+]?(?:0|[1-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?")
_SNIPPET: Final = 60


class _Parser:
    """Walks the YAML node tree of one text, keeping marks so every error names its line."""

    def __init__(self, text: str, source: str) -> None:
        self._text = text
        self._source = source

    def policies(self) -> list[Policy]:
        self._check_pasted_characters()
        found: list[Policy] = []
        for document in self._documents():
            found.extend(self._document(document))
        if not found:
            self._fail("no policy found; expected a top-level 'policy:' mapping", line=1)
        return found

    def _check_pasted_characters(self) -> None:
        for number, raw in enumerate(self._text.split("\n"), start=1):
            line = raw.rstrip("\r")
            body = line.lstrip(" \t")
            if not body or body.startswith("#"):
                continue
            indent = line[: len(line) - len(body)]
            if body[0] == _NBSP or _NBSP in indent:
                self._fail(
                    "indentation contains a non-breaking space (U+00A0); "
                    f"YAML indents with plain spaces: {line!r}",
                    line=number,
                    value=line,
                )
            first = body[0]
            if first in _PASTED_BULLETS and body[1:2] in ("", " ", "\t"):
                self._fail(
                    f"list item starts with {_PASTED_BULLETS[first]} "
                    f"({first!r}, U+{ord(first):04X}); YAML lists use '-': {line!r}",
                    line=number,
                    value=line,
                )
            match = _VALUE_START.match(line)
            if match and match.group(1) in _CURLY_QUOTES:
                quote = match.group(1)
                self._fail(
                    f"value starts with {_CURLY_QUOTES[quote]} ({quote!r}, U+{ord(quote):04X}); "
                    f"""YAML quotes values with '"' or "'": {line!r}""",
                    line=number,
                    value=line,
                )

    def _documents(self) -> Iterator[Node]:
        try:
            # compose (not load) keeps the line marks and never runs constructors.
            for document in yaml.compose_all(self._text, Loader=yaml.SafeLoader):
                if document is not None and document.tag != _NULL:
                    yield document
        except yaml.MarkedYAMLError as exc:
            self._yaml_error(exc)
        except yaml.reader.ReaderError as exc:
            line = self._text.count("\n", 0, exc.position) + 1
            char = chr(exc.character) if isinstance(exc.character, int) else exc.character
            self._fail(
                f"invalid YAML: character {char!r} is not allowed", line=line, value=char, cause=exc
            )
        except yaml.YAMLError as exc:
            self._fail(f"invalid YAML: {exc}", line=None, value=None, cause=exc)

    def _yaml_error(self, exc: yaml.MarkedYAMLError) -> NoReturn:
        problem = exc.problem or exc.context or "malformed document"
        found, opened = exc.problem_mark, exc.context_mark
        line = 1 if found is None else found.line + 1
        at_end = found is None or found.index >= len(self._text.rstrip())
        context = exc.context or ""
        if (
            opened is not None
            and opened.line + 1 != line
            and (at_end or "flow" in context or "quoted" in context)
        ):
            # An unclosed bracket or quote is noticed lines later (or at the end of the file);
            # the line that opened it is the one to fix.
            where = "" if at_end else f" on line {line}"
            line = opened.line + 1
            message = f"{problem}{where}, {context} that starts on this line"
        elif exc.context and exc.problem:
            message = f"{problem} ({context})"
        else:
            message = problem
        bad = self._line_text(line)
        self._fail(f"invalid YAML: {message}: {bad!r}", line=line, value=bad, cause=exc)

    def _document(self, node: Node) -> list[Policy]:
        entries = self._mapping(node, "the top level")
        for name, (key, _) in entries.items():
            if name not in ("policy", "policies"):
                self._fail(
                    f"unknown top-level key {name!r}; expected 'policy' or 'policies'", key, name
                )
        if not entries:
            self._fail("expected a top-level 'policy:' or 'policies:' key, got {}", node, {})
        if len(entries) > 1:
            self._fail("use either 'policy:' or 'policies:' at the top level, not both", node)
        (name, (key, value)) = next(iter(entries.items()))
        if name == "policy":
            return [self._policy(value, key)]
        if not isinstance(value, SequenceNode):
            self._fail(f"'policies' must be a list of policies, got {self._show(value)}", value)
        if not value.value:
            self._fail("'policies' is an empty list", value, [])
        return [self._list_item(item) for item in value.value]

    def _list_item(self, node: Node) -> Policy:
        # A list item may be the policy body itself or wrapped as `- policy: {...}`.
        if isinstance(node, MappingNode) and len(node.value) == 1:
            key, value = node.value[0]
            if isinstance(key, ScalarNode) and key.value == "policy":
                return self._policy(value, key)
        return self._policy(node, node)

    def _policy(self, node: Node, owner: Node) -> Policy:
        entries = self._mapping(node, "a policy")
        self._check_keys(entries, sorted(_FIELDS), "policy")
        if "agent" not in entries:
            self._fail("policy has no 'agent' key naming the role it governs", owner)

        def field(name: str) -> Node | None:
            entry = entries.get(name)
            return None if entry is None else entry[1]

        def amount(name: str) -> float | None:
            node = field(name)
            return None if node is None else self._amount(name, node)

        limit = amount("spending_limit_usd")
        threshold = amount("require_approval_if_over")
        if limit is not None and threshold is not None and threshold > limit:
            node = entries["require_approval_if_over"][1]
            self._fail(
                f"require_approval_if_over ({self._scalar_text(node)}) is above "
                f"spending_limit_usd ({self._scalar_text(entries['spending_limit_usd'][1])}); "
                "such amounts are denied before approval could be asked",
                node,
                self._scalar_text(node),
            )
        vendors, cap, escalation = (
            field("allowed_vendors"),
            field("reflection_loop_cap"),
            field("escalation"),
        )
        allowed, denied = field("allowed_tools"), field("denied_tools")
        allowed_tools = None if allowed is None else self._names("allowed_tools", "tool", allowed)
        denied_tools = None if denied is None else self._names("denied_tools", "tool", denied)
        if allowed is not None and denied is not None:
            self._check_disjoint_tools(allowed, denied)
        rate, expiry, on_expiry = (
            field("rate_limit"),
            field("approval_expiry_s"),
            field("on_expiry"),
        )
        allowed_vendors = (
            None if vendors is None else self._names("allowed_vendors", "vendor", vendors)
        )
        allowed_values = self._arg_values("allowed_values", field("allowed_values"))
        sugar = next((rule for rule in allowed_values if rule.arg == _VENDOR_ARG), None)
        if sugar is not None and all(isinstance(v, str) for v in sugar.values):
            # One meaning, one form: `allowed_values: {vendor: [...]}` of names is the seed's
            # `allowed_vendors`, with its verdicts and its hash.
            if allowed_vendors is not None:
                node = self._arg_key(entries["allowed_values"][1], _VENDOR_ARG)
                self._fail(
                    "vendor is restricted by both allowed_vendors and allowed_values; "
                    "list its values in one of them",
                    node,
                    _VENDOR_ARG,
                )
            allowed_vendors = tuple(sorted(str(v) for v in sugar.values))
            allowed_values = tuple(rule for rule in allowed_values if rule is not sugar)
        policy = Policy(
            agent=self._string("agent", entries["agent"][1]),
            spending_limit_usd=limit,
            require_approval_if_over=threshold,
            allowed_vendors=allowed_vendors,
            reflection_loop_cap=None if cap is None else self._count("reflection_loop_cap", cap),
            escalation="human_review"
            if escalation is None
            else self._string("escalation", escalation),
            allowed_tools=allowed_tools,
            denied_tools=denied_tools,
            daily_limit_usd=amount("daily_limit_usd"),
            rate_limit=None if rate is None else self._rate_limit(rate),
            approval_expiry_s=DEFAULT_APPROVAL_EXPIRY_S
            if expiry is None
            else self._positive("approval_expiry_s", expiry),
            on_expiry="deny" if on_expiry is None else self._on_expiry(on_expiry),
            allowed_values=allowed_values,
            denied_values=self._arg_values("denied_values", field("denied_values")),
            escalate_if=self._conditions("escalate_if", field("escalate_if")),
            deny_if=self._conditions("deny_if", field("deny_if")),
            source=self._source,
        )
        # Built now, so that no decision pays for compiling a pattern or building a set.
        for rule in (*policy.allowed_values, *policy.denied_values):
            rule.members  # noqa: B018
        for condition in (*policy.escalate_if, *policy.deny_if):
            condition.test  # noqa: B018
        return policy

    def _mapping(self, node: Node, what: str) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            self._fail(f"{what} must be a mapping of keys to values, got {self._show(node)}", node)
        entries: dict[str, tuple[Node, Node]] = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode) or key.tag != _STR:
                self._fail(f"keys must be plain names, got {self._show(key)}", key)
            if key.value in entries:
                first = entries[key.value][0].start_mark.line + 1
                self._fail(f"duplicate key {key.value!r} (first on line {first})", key, key.value)
            entries[key.value] = (key, value)
        return entries

    def _check_keys(
        self, entries: dict[str, tuple[Node, Node]], known: Sequence[str], where: str
    ) -> None:
        """Fail on the first key of ``entries`` not in ``known``, suggesting the closest."""
        for name, (key, _) in entries.items():
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                self._fail(
                    f"unknown key {name!r} in {where}{suggestion} (allowed: {', '.join(known)})",
                    key,
                    name,
                )

    def _string(self, name: str, node: Node) -> str:
        if not isinstance(node, ScalarNode) or node.tag != _STR:
            self._fail(f"{name} must be a string, got {self._show(node)}", node)
        value: str = node.value
        if not value.strip():
            self._fail(f"{name} must not be empty, got {value!r}", node, value)
        if value != value.strip():
            self._fail(f"{name} must not start or end with whitespace: {value!r}", node, value)
        return value

    def _amount(self, name: str, node: Node) -> float:
        text = self._number_text(name, node, _DECIMAL, "a number")
        try:
            value = float(text)
        except ValueError:
            self._fail(f"{name} must be a plain decimal number, got {text!r}", node, text)
        if not math.isfinite(value):
            self._fail(f"{name} is out of range: {text!r}", node, text)
        if value < 0:
            self._fail(f"{name} must not be negative, got {text!r}", node, text)
        return value

    def _count(self, name: str, node: Node) -> int:
        text = self._number_text(name, node, _DECIMAL_INT, "a whole number")
        try:
            value = int(text)
        except ValueError:
            self._fail(f"{name} must be a plain decimal whole number, got {text!r}", node, text)
        if value < 0:
            self._fail(f"{name} must not be negative, got {text!r}", node, text)
        return value

    def _number_text(self, name: str, node: Node, pattern: re.Pattern[str], kind: str) -> str:
        # Unquoted 1e4 or 1.5e3 are numbers to a reader even though YAML 1.1 resolves them as
        # strings; quoted "10000" stays a string and is rejected.
        numeric = isinstance(node, ScalarNode) and (
            node.tag in (_INT, _FLOAT) or (node.tag == _STR and node.style is None)
        )
        if not numeric:
            self._fail(f"{name} must be {kind}, got {self._show(node)}", node)
        text: str = node.value
        if not pattern.fullmatch(text):
            self._fail(f"{name} must be {kind} in plain decimal, got {text!r}", node, text)
        return text

    def _names(self, name: str, noun: str, node: Node) -> tuple[str, ...]:
        if not isinstance(node, SequenceNode):
            self._fail(f"{name} must be a list of names, got {self._show(node)}", node)
        seen: dict[str, int] = {}
        for item in node.value:
            value = self._string(f"each {noun} in {name}", item)
            if value in seen:
                self._fail(
                    f"{noun} {value!r} is listed twice (first on line {seen[value]})", item, value
                )
            seen[value] = item.start_mark.line + 1
        # Sorted, because the list is a set: two policies that list the same names in another
        # order are the same policy, with the same hash.
        return tuple(sorted(seen))

    def _check_disjoint_tools(self, allowed: Node, denied: Node) -> None:
        # Both lists are known to be sequences of plain strings by now.
        listed = {item.value: item for item in allowed.value}
        for item in denied.value:
            if item.value in listed:
                first = listed[item.value].start_mark.line + 1
                self._fail(
                    f"tool {item.value!r} is in both allowed_tools (line {first}) and "
                    "denied_tools; list it in one of them",
                    item,
                    item.value,
                )

    def _arg_key(self, node: Node, arg: str) -> Node:
        """The key node naming ``arg`` in the mapping ``node``."""
        return self._mapping(node, "a mapping")[arg][0]

    def _arg_values(self, name: str, node: Node | None) -> tuple[ArgValues, ...]:
        if node is None:
            return ()
        entries = self._mapping(node, name)
        rules = []
        for arg, (key, values) in entries.items():
            if not arg.strip() or arg != arg.strip():
                self._fail(f"argument names in {name} must be plain names, got {arg!r}", key, arg)
            listed = self._values(f"{name}.{arg}", values)
            rules.append(ArgValues(arg=arg, values=listed))
        return tuple(sorted(rules, key=lambda rule: rule.arg))

    def _values(self, name: str, node: Node) -> tuple[Scalar, ...]:
        """A non-empty list of distinct values, in canonical order."""
        if not isinstance(node, SequenceNode):
            self._fail(f"{name} must be a list of values, got {self._show(node)}", node)
        if not node.value:
            self._fail(f"{name} lists no values", node, [])
        seen: dict[tuple[int, float, str], int] = {}
        values: list[Scalar] = []
        for item in node.value:
            value = self._value(f"each value in {name}", item)
            order = value_order(value)
            if order in seen:
                self._fail(
                    f"value {item.value!r} is listed twice in {name} (first on line {seen[order]})",
                    item,
                    item.value,
                )
            seen[order] = item.start_mark.line + 1
            values.append(value)
        return tuple(sorted(values, key=value_order))

    def _value(self, name: str, node: Node) -> Scalar:
        """One value: a string, a plain decimal number, ``true`` or ``false``."""
        if not isinstance(node, ScalarNode):
            self._fail(
                f"{name} must be a single value (a string, a number, true or false), "
                f"got {self._show(node)}",
                node,
            )
        text: str = node.value
        if node.tag == _STR:
            if node.style is None and _DECIMAL.fullmatch(text):
                # Unquoted 1e4 is a number to a reader, as it is for the limits.
                return self._bound(name, node)
            return text
        if node.tag in (_INT, _FLOAT):
            return self._bound(name, node)
        if node.tag == _BOOL and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if node.tag == _NULL:
            self._fail(f"{name} must be a value, got {self._show(node)}", node)
        # YAML 1.1 reads NO (Norway) and off as false, and 2024-01-01 as a date.
        kind = node.tag.rsplit(":", 1)[-1]
        other = ", or write true or false" if node.tag == _BOOL else ""
        self._fail(
            f"{name}: YAML reads {text!r} as a {kind}, not a string; "
            f"quote it ('{text}') for the string{other}",
            node,
            text,
        )

    def _bound(self, name: str, node: Node) -> float:
        text = self._number_text(name, node, _DECIMAL, "a number")
        value = float(text)
        if not math.isfinite(value):
            self._fail(f"{name} is out of range: {text!r}", node, text)
        return value + 0.0

    def _conditions(self, name: str, node: Node | None) -> tuple[Condition, ...]:
        if node is None:
            return ()
        if not isinstance(node, SequenceNode):
            self._fail(
                f"{name} must be a list of conditions such as "
                f"'- {{arg: amount_usd, over: 1000}}', got {self._show(node)}",
                node,
            )
        seen: dict[str, int] = {}
        conditions = []
        for index, item in enumerate(node.value):
            condition = self._condition(f"{name}[{index}]", item)
            key = _json(condition.canonical())
            if key in seen:
                self._fail(
                    f"this condition is listed twice in {name} (first on line {seen[key]})", item
                )
            seen[key] = item.start_mark.line + 1
            conditions.append((key, condition))
        # Sorted, because the list is a set: its order changes no verdict, reason or hash.
        return tuple(condition for _, condition in sorted(conditions, key=lambda kc: kc[0]))

    def _condition(self, name: str, node: Node) -> Condition:
        """One condition; ``name`` is its path, e.g. ``deny_if[0]``."""
        entries = self._mapping(node, name)
        self._check_keys(entries, ("arg", "reason", *OPERATORS), name)
        if "arg" not in entries:
            self._fail(f"{name} has no 'arg' naming the argument it reads", node)
        ops = [key_name for key_name in entries if key_name in OPERATORS]
        if not ops:
            self._fail(
                f"{name} has no operator; give one of {', '.join(OPERATORS)}",
                node,
            )
        if len(ops) > 1:
            self._fail(
                f"{name} has {len(ops)} operators ({', '.join(ops)}); "
                "write one condition per operator",
                entries[ops[1]][0],
                ops[1],
            )
        op = ops[0]
        what = f"{name}.{op}"
        arg = self._string(f"{name}.arg", entries["arg"][1])
        value_node = entries[op][1]
        value: Scalar | tuple[Scalar, ...]
        if op in COMPARISONS:
            value = self._bound(what, value_node)
        elif op == "matches":
            value = self._pattern(what, value_node)
        elif op in ("in", "not_in"):
            value = self._values(what, value_node)
        else:
            value = self._value(what, value_node)
        reason = entries.get("reason")
        return Condition(
            arg=arg,
            op=op,
            value=value,
            reason="" if reason is None else self._string(f"{name}.reason", reason[1]),
        )

    def _pattern(self, name: str, node: Node) -> str:
        if not isinstance(node, ScalarNode) or node.tag != _STR:
            self._fail(f"{name} must be a pattern string, got {self._show(node)}", node)
        pattern: str = node.value
        if not pattern:
            self._fail(f"{name} is empty, so it would match every string", node, pattern)
        try:
            compile_pattern(pattern)
        except PatternError as exc:
            self._fail(f"{name} is not a valid RE2 pattern ({exc}): {pattern!r}", node, pattern)
        return pattern

    def _rate_limit(self, node: Node) -> RateLimit:
        entries = self._mapping(node, "rate_limit")
        known = ("calls", "per_seconds")
        self._check_keys(entries, known, "rate_limit")
        for name in known:
            if name not in entries:
                self._fail(
                    f"rate_limit has no {name!r}; write it as "
                    "'rate_limit: {calls: N, per_seconds: S}'",
                    node,
                )
        return RateLimit(
            calls=self._count("rate_limit.calls", entries["calls"][1]),
            per_seconds=self._positive("rate_limit.per_seconds", entries["per_seconds"][1]),
        )

    def _positive(self, name: str, node: Node) -> float:
        value = self._amount(name, node)
        if value == 0:
            # A zero window counts no calls and a zero expiry lapses before anyone can answer;
            # either is a typo, not a policy.
            text = self._scalar_text(node)
            self._fail(f"{name} must be greater than zero, got {text!r}", node, text)
        return value

    def _on_expiry(self, node: Node) -> OnExpiry:
        value = self._string("on_expiry", node)
        if value == "deny":
            return "deny"
        if value == "allow":
            return "allow"
        self._fail(f"on_expiry must be 'deny' or 'allow', got {value!r}", node, value)

    def _show(self, node: Node) -> str:
        if isinstance(node, ScalarNode):
            if node.tag == _NULL:
                return f"null ({node.value!r})" if node.value else "nothing (empty value)"
            if node.tag == _STR:
                return f"the string {node.value!r}"
            return repr(node.value)
        kind = "a list" if isinstance(node, SequenceNode) else "a mapping"
        return f"{kind} {self._snippet(node)!r}"

    def _scalar_text(self, node: Node) -> str:
        return str(node.value) if isinstance(node, ScalarNode) else self._snippet(node)

    def _snippet(self, node: Node) -> str:
        text = self._text[node.start_mark.index : node.end_mark.index].strip()
        text = " ".join(text.split())
        return text if len(text) <= _SNIPPET else text[: _SNIPPET - 3] + "..."

    def _line_text(self, line: int) -> str:
        lines = self._text.split("\n")
        return lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""

    def _fail(
        self,
        message: str,
        node: Node | None = None,
        value: object = None,
        *,
        line: int | None = None,
        cause: BaseException | None = None,
    ) -> NoReturn:
        if node is not None:
            line = node.start_mark.line + 1
            if value is None:
                value = node.value if isinstance(node, ScalarNode) else self._snippet(node)
        raise PolicyError(message, path=self._source, line=line, value=value) from cause
