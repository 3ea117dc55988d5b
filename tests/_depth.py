"""How many examples a property test draws: the count it names in `make test`, times
``GOVMESH_TEST_DEPTH`` (4 in `make test-all`) for a deeper search.

`make test` keeps within its 15 minutes on a 2-core machine; the counts it draws still
find the mistakes these tests were written against (each was seen to fail on them).
"""

from __future__ import annotations

import os

_VAR = "GOVMESH_TEST_DEPTH"


def _depth() -> float:
    raw = os.environ.get(_VAR, "1")
    try:
        depth = float(raw)
    except ValueError:
        depth = 0.0
    if not depth > 0:
        raise ValueError(f"{_VAR} must be a number above 0, got {raw!r}")
    return depth


DEPTH = _depth()


def examples(count: int) -> int:
    """``count`` examples, times the depth asked for."""
    return max(1, round(count * DEPTH))
