"""Message bodies of cost accounting."""

from __future__ import annotations

import msgspec

__all__ = ["BudgetQuery", "BudgetReport", "Usage"]


class Usage(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Token use of one model call, reported by the agent that made it."""

    model: str
    input_tokens: int
    output_tokens: int
    error: bool = False


class BudgetQuery(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Ask the budget actor for totals of ``workflows``; none means the whole tenant."""

    workflows: tuple[str, ...] = ()


class BudgetReport(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Counted spend."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens
