"""The expenses workload: claims drawn from employees, weighted categories and memos."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

from expenses.agents import Claim

__all__ = ["Claims"]


class Claims:
    """Draws expense claims, the same ones for the same seed.

    Args:
        employees: who claims.
        categories: categories with their weights (non-negative, not all zero).
        memos: memos with their weights (non-negative, not all zero).
        amount_usd: ``{min: ..., max: ...}``, with ``0 < min <= max``.

    Raises:
        ValueError: an option is out of range; the message names it and quotes it.
    """

    def __init__(
        self,
        *,
        employees: Sequence[str],
        categories: Mapping[str, float],
        memos: Mapping[str, float],
        amount_usd: Mapping[str, float],
    ) -> None:
        if not employees:
            raise ValueError(f"employees must name at least one employee, got {employees!r}")
        for name, weights in (("categories", categories), ("memos", memos)):
            if not weights or any(w < 0 for w in weights.values()) or not any(weights.values()):
                raise ValueError(f"{name} needs non-negative weights, not all 0, got {weights!r}")
        low, high = amount_usd.get("min"), amount_usd.get("max")
        if low is None or high is None or not 0 < low <= high:
            raise ValueError(f"amount_usd needs 0 < min <= max, got {dict(amount_usd)!r}")
        self.employees = tuple(employees)
        self.categories = dict(categories)
        self.memos = dict(memos)
        self.low, self.high = float(low), float(high)

    def starts(self, count: int, seed: int) -> list[Claim]:
        """``count`` claims; the i-th depends only on ``seed`` and i."""
        categories, memos = list(self.categories), list(self.memos)
        drawn = []
        for i in range(count):
            digest = hashlib.sha256(f"{seed}:claim:{i}".encode()).digest()
            rng = random.Random(int.from_bytes(digest[:8], "big"))
            drawn.append(
                Claim(
                    claim=f"claim-{seed}-{i:05d}",
                    employee=rng.choice(self.employees),
                    category=rng.choices(categories, [self.categories[c] for c in categories])[0],
                    amount_usd=round(rng.uniform(self.low, self.high), 2),
                    memo=rng.choices(memos, [self.memos[m] for m in memos])[0],
                )
            )
        return drawn
