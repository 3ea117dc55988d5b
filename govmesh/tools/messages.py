"""Message bodies of tool calls through the gateway."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["ToolCall", "ToolResult"]


class ToolCall(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A request to run ``tool``, carrying governance's signed decision as proof.

    Attributes:
        decision: the exact wire bytes of the decision message, re-verified by the gateway.
    """

    tool: str
    args: dict[str, Any]
    step: int
    decision: bytes


class ToolResult(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The gateway's answer: the tool's normalised result, or why it failed or nothing ran.

    Attributes:
        replayed: the step had already run; this is the result recorded then, and nothing
            ran now.
        retryable: the tool failed with ``ToolError(retryable=True)``: nothing took effect,
            and calling again under a valid decision may succeed.
    """

    ok: bool
    result: dict[str, Any] = {}
    error: str = ""
    replayed: bool = False
    retryable: bool = False
