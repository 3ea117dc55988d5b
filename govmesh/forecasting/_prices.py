"""Model prices. A model with no price is an error, never free."""

from __future__ import annotations

import msgspec

from govmesh.errors import ConfigError

__all__ = ["Price", "PriceTable"]


class Price(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """USD per 1,000 tokens of each kind."""

    input_per_1k: float
    output_per_1k: float

    def __post_init__(self) -> None:
        if self.input_per_1k < 0 or self.output_per_1k < 0:
            raise ValueError(f"prices cannot be negative: {self!r}")

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for one call's usage."""
        return (input_tokens * self.input_per_1k + output_tokens * self.output_per_1k) / 1000


class PriceTable:
    """Prices by model name."""

    def __init__(self, prices: dict[str, Price]) -> None:
        self._prices = dict(prices)

    def price(self, model: str) -> Price:
        """The price of ``model``; raises `ConfigError` when it has none."""
        try:
            return self._prices[model]
        except KeyError:
            raise ConfigError(
                f"model {model!r} has no price; known: {sorted(self._prices)}"
            ) from None
