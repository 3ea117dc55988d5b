"""The one interface every model provider implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec

__all__ = ["ModelProvider", "ModelRequest", "ModelResponse"]


class ModelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One model call.

    Attributes:
        key: a stable name for this call (workflow, agent, step, attempt), which seeded
            providers use so the same run gives the same answers.
    """

    prompt: str
    max_tokens: int
    key: str


class ModelResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A model's answer and its provider-reported usage.

    Attributes:
        error: the answer was unusable (malformed output, refusal), so the agent reflects
            and retries.
        cache_read_tokens, cache_write_tokens, reasoning_tokens: further token kinds some
            providers report and price apart (see `govmesh.forecasting.Price`).
    """

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    error: bool = False
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@runtime_checkable
class ModelProvider(Protocol):
    """Something that answers model calls."""

    @property
    def model(self) -> str:
        """The model name, as priced in the price table."""
        ...

    def max_input_tokens(self, request: ModelRequest) -> int:
        """An upper bound of the prompt tokens ``request`` will be charged, known before the
        call, so its maximum cost can be reserved."""
        ...

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Answer one call."""
        ...
