"""Rules on a tool call's arguments: ``allowed_values``, ``denied_values``, ``escalate_if`` and
``deny_if`` entries, compiled once when a policy loads.

Values compare by kind as well as by value: a string equals only a string, a boolean only a
boolean, and numbers compare as numbers (``3`` equals ``3.0``; ``true`` is not ``1``).
Patterns are RE2 syntax and are searched for, as ``re.search`` does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Final, Literal, TypeGuard

import msgspec
import re2

__all__ = [
    "COMPARISONS",
    "OPERATORS",
    "ArgValues",
    "Condition",
    "Operator",
    "PatternError",
    "Scalar",
    "canonical_value",
    "compile_pattern",
    "shown",
    "value_order",
    "value_text",
]

Scalar = str | float | bool
"""A value a rule names: a string, a number (kept as a float) or a boolean."""

Operator = Literal[
    "over", "at_least", "under", "at_most", "equals", "not_equals", "in", "not_in", "matches"
]
"""How a condition compares its argument with its value."""

COMPARISONS: Final = ("over", "at_least", "under", "at_most")
"""The operators that compare numbers."""
OPERATORS: Final[tuple[Operator, ...]] = (
    *COMPARISONS,
    "equals",
    "not_equals",
    "in",
    "not_in",
    "matches",
)

_RELATION: Final[dict[str, str]] = {
    "over": "is over",
    "at_least": "is at least",
    "under": "is under",
    "at_most": "is at most",
    "equals": "is",
    "not_equals": "is not",
    "in": "is one of",
    "not_in": "is not one of",
    "matches": "matches",
}
_INF: Final = math.inf
_SHOW_LIMIT: Final = 80


class PatternError(ValueError):
    """A ``matches`` pattern that RE2 cannot compile; the message is RE2's."""


def _re2_options() -> re2.Options:
    options = re2.Options()
    # Errors come back as PatternError with file and line; RE2 must not also log them.
    options.log_errors = False
    options.never_capture = True
    return options


_OPTIONS: Final = _re2_options()


def compile_pattern(pattern: str) -> re2._Regexp:
    """Compile a ``matches`` pattern with RE2.

    RE2 matches in time linear in the input, whatever the pattern: Python's ``re``
    backtracks, so an author's ``(a+)+$`` and a model-written argument could hold the
    decision point, and every tenant it serves, for minutes. The price is RE2's syntax (no
    backreferences or lookaround; ``\\z`` for the end of the text) and about 1 us a search
    through its Python binding, paid only by intents a ``matches`` condition reads.

    Raises:
        PatternError: RE2 cannot compile ``pattern``.
    """
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else "invalid pattern"
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise PatternError(str(detail)) from None


def _is_number(value: object) -> TypeGuard[float]:
    """Whether ``value`` is a finite number (an int or a float, not a bool)."""
    # bool is an int subclass, but True is not a number to a policy.
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (isinstance(value, int) or -_INF < value < _INF)
    )


class _ValueSet:
    """Values split by kind, so that membership never mixes them up: Python's ``1 == True``
    and ``hash(1) == hash(True)`` would otherwise let ``true`` match ``1``."""

    __slots__ = ("bools", "numbers", "strings")

    def __init__(self, values: Iterable[Scalar]) -> None:
        strings: set[str] = set()
        numbers: set[float] = set()
        bools: set[bool] = set()
        for value in values:
            if isinstance(value, bool):
                bools.add(value)
            elif isinstance(value, str):
                strings.add(value)
            else:
                numbers.add(value)
        self.strings = frozenset(strings)
        self.numbers = frozenset(numbers)
        self.bools = frozenset(bools)

    def holds(self, value: object) -> bool:
        if isinstance(value, str):
            return value in self.strings
        if isinstance(value, bool):
            return value in self.bools
        if isinstance(value, int | float):
            # An int finds an equal float: equal numbers hash alike; NaN finds nothing.
            return value in self.numbers
        return False


class ArgValues(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """The values one argument may take (``allowed_values``) or may not (``denied_values``).

    Attributes:
        arg: the argument's name.
        values: the values, in canonical order.
    """

    arg: str
    values: tuple[Scalar, ...]

    @functools.cached_property
    def members(self) -> Callable[[object], bool]:
        """Whether a value is one of `values` (of the same kind); built once."""
        return _ValueSet(self.values).holds


class Condition(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    """One ``escalate_if`` or ``deny_if`` entry: it matches when the argument ``arg``
    compares with ``value`` as ``op`` says. An intent without the argument does not match.

    Attributes:
        arg: the argument's name.
        op: the operator.
        value: a number for a comparison, a string pattern for ``matches``, a tuple of values
            in canonical order for ``in`` and ``not_in``, else one value.
        reason: the sentence the verdict gives when the condition matches, or "".
    """

    arg: str
    op: Operator
    value: Scalar | tuple[Scalar, ...]
    reason: str = ""

    @functools.cached_property
    def test(self) -> Callable[[object], bool | None]:
        """Whether an argument's value matches: ``None`` when the operator cannot read it (a
        comparison of anything but a finite number, a pattern on anything but a string).

        Built once per condition; a ``matches`` condition compiles its pattern here.

        Raises:
            PatternError: the pattern does not compile (the policy parser reports it first).
            TypeError: a comparison's value is not a number.
        """
        op, value = self.op, self.value
        if op == "matches":
            search = compile_pattern(str(value)).search
            # Searched as UTF-8 bytes, as RE2 reads them anyway: a third faster through the
            # binding than a str, and a lone surrogate is one more byte that matches nothing
            # rather than an encoding error.
            return lambda v: (
                search(v.encode("utf-8", "surrogatepass")) is not None
                if isinstance(v, str)
                else None
            )
        if op in COMPARISONS:
            if not _is_number(value):
                raise TypeError(f"{op} compares with a number, got {value!r}")
            bound = float(value)
            compare: Callable[[float], bool] = {
                "over": bound.__lt__,
                "at_least": bound.__le__,
                "under": bound.__gt__,
                "at_most": bound.__ge__,
            }[op]
            return lambda v: compare(v) if _is_number(v) else None
        values = _ValueSet(value if isinstance(value, tuple) else (value,))
        if op in ("equals", "in"):
            return values.holds
        return lambda v: not values.holds(v)

    @functools.cached_property
    def relation(self) -> str:
        """How a matching value relates to the condition, e.g. ``is over 1000``."""
        return f"{_RELATION[self.op]} {value_text(self.value)}"

    @functools.cached_property
    def wants(self) -> str:
        """What the operator can read: ``a number`` or ``a string``."""
        return "a string" if self.op == "matches" else "a number"

    def canonical(self) -> dict[str, object]:
        """The condition's canonical form, for the policy hash."""
        form: dict[str, object] = {"arg": self.arg, self.op: canonical_value(self.value)}
        if self.reason:
            form["reason"] = self.reason
        return form


def canonical_value(value: Scalar | tuple[Scalar, ...]) -> object:
    """``value`` as it enters the policy hash: numbers as floats (so ``3`` and ``3.0`` hash
    alike, and ``-0.0`` as ``0.0``), lists in canonical order."""
    if isinstance(value, tuple):
        return [canonical_value(item) for item in sorted(value, key=value_order)]
    if isinstance(value, bool | str):
        return value
    return float(value) + 0.0


def value_order(value: Scalar) -> tuple[int, float, str]:
    """A total order over values of every kind: strings, then numbers, then booleans."""
    if isinstance(value, str):
        return (0, 0.0, value)
    return (2 if isinstance(value, bool) else 1, float(value), "")


def value_text(value: Scalar | tuple[Scalar, ...]) -> str:
    """A value as a policy writes it: ``'travel'``, ``1000``, ``true``, ``['a', 'b']``."""
    if isinstance(value, tuple):
        return "[" + ", ".join(value_text(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def shown(value: object) -> str:
    """``value`` as a verdict's reasons quote it: its repr, cut to 80 characters."""
    # Arguments come from a model; keep a hostile megabyte string out of the audit trail.
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."
