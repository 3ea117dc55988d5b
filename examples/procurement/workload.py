"""The procurement workload: purchases drawn from items, weighted vendors and an amount range."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

from procurement.agents import Purchase

__all__ = ["Purchases"]


class Purchases:
    """Draws purchases, the same ones for the same seed.

    Args:
        items: what may be bought.
        vendors: the vendors with their weights (non-negative, not all zero).
        amount_usd: ``{min: ..., max: ...}``, with ``0 < min <= max``.

    Raises:
        ValueError: an option is out of range; the message names it and quotes it.
    """

    def __init__(
        self,
        *,
        items: Sequence[str],
        vendors: Mapping[str, float],
        amount_usd: Mapping[str, float],
    ) -> None:
        if not items:
            raise ValueError(f"items must name at least one item, got {items!r}")
        if not vendors or any(w < 0 for w in vendors.values()) or not any(vendors.values()):
            raise ValueError(f"vendors needs non-negative weights, not all 0, got {vendors!r}")
        low, high = amount_usd.get("min"), amount_usd.get("max")
        if low is None or high is None or not 0 < low <= high:
            raise ValueError(f"amount_usd needs 0 < min <= max, got {dict(amount_usd)!r}")
        self.items = tuple(items)
        self.vendors = dict(vendors)
        self.low, self.high = float(low), float(high)

    def starts(self, count: int, seed: int) -> list[Purchase]:
        """``count`` purchases; the i-th depends only on ``seed`` and i."""
        vendors = list(self.vendors)
        weights = [self.vendors[v] for v in vendors]
        drawn = []
        for i in range(count):
            rng = _rng(seed, f"workflow:{i}")
            drawn.append(
                Purchase(
                    item=rng.choice(self.items),
                    vendor=rng.choices(vendors, weights)[0],
                    amount_usd=round(rng.uniform(self.low, self.high), 2),
                )
            )
        return drawn


def _rng(seed: int, key: str) -> random.Random:
    """A random stream that depends only on (seed, key), the same in every process."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
