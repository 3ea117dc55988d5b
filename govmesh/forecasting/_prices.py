"""Model prices. A model with no price is an error, never free.

A price table maps model names to USD per 1,000 tokens of each kind a provider reports:
input, output and, where the provider has them, cache reads, cache writes and reasoning
tokens. It is written inline in a scenario (``prices:``) or kept in its own file, a YAML
mapping of the same shape that scenarios name (``prices: ../prices/models.yaml``)::

    simulated-small:
      input_per_1k: 0.003
      output_per_1k: 0.015
      cache_read_per_1k: 0.0003     # optional; input price if absent
      cache_write_per_1k: 0.00375   # optional; input price if absent
      reasoning_per_1k: 0.015       # optional; output price if absent
"""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from govmesh.config import read_yaml_mapping
from govmesh.errors import ConfigError

__all__ = ["Price", "PriceTable", "load_price_file"]


class Price(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """USD per 1,000 tokens of each kind.

    Attributes:
        cache_read_per_1k: prompt tokens read from the provider's cache; the input price
            when not given.
        cache_write_per_1k: prompt tokens written to the cache; the input price when not
            given.
        reasoning_per_1k: hidden reasoning tokens; the output price when not given.
    """

    input_per_1k: float
    output_per_1k: float
    cache_read_per_1k: float | None = None
    cache_write_per_1k: float | None = None
    reasoning_per_1k: float | None = None

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite price of 0 or more, got {value!r}")

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> float:
        """USD for one call's usage."""
        cache_read = self.input_per_1k if self.cache_read_per_1k is None else self.cache_read_per_1k
        cache_write = (
            self.input_per_1k if self.cache_write_per_1k is None else self.cache_write_per_1k
        )
        reasoning = self.output_per_1k if self.reasoning_per_1k is None else self.reasoning_per_1k
        return (
            input_tokens * self.input_per_1k
            + output_tokens * self.output_per_1k
            + cache_read_tokens * cache_read
            + cache_write_tokens * cache_write
            + reasoning_tokens * reasoning
        ) / 1000

    def max_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The most a call with at most these prompt and completion tokens can cost,
        however a provider splits them into kinds: each prompt token at the dearest prompt
        price (input, cache read or write), each completion token at the dearer of output
        and reasoning (a completion cap counts reasoning tokens too)."""
        prompt = max(
            p
            for p in (self.input_per_1k, self.cache_read_per_1k, self.cache_write_per_1k)
            if p is not None
        )
        completion = max(p for p in (self.output_per_1k, self.reasoning_per_1k) if p is not None)
        return (prompt_tokens * prompt + completion_tokens * completion) / 1000


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


def load_price_file(path: str | Path) -> dict[str, Price]:
    """Read a price table file (see the module docs).

    Raises:
        ConfigError: the file cannot be read, is not YAML, or an entry is malformed; the
            message names the file and the model and field at fault.
    """
    where = Path(path)
    data = read_yaml_mapping(where, what="price table", error=ConfigError)
    try:
        return msgspec.convert(data, dict[str, Price])
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None
