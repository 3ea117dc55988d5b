"""Tools the gateway can run, and what it tells a tool about the call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

__all__ = ["Tool", "ToolContext"]


class ToolContext(msgspec.Struct, frozen=True, kw_only=True):
    """Who asked for the call and under which decision."""

    workflow: str
    agent: str
    step: int
    decision_id: str
    approval_id: str = ""
    approved_by: str = ""


Tool = Callable[[dict[str, Any], ToolContext], Awaitable[dict[str, Any]]]
