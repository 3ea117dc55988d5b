"""Tools the gateway can run, what it tells a tool about the call, and which tools may run
again safely."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = ["RegisteredTool", "Tool", "ToolContext", "ToolRegistry"]


class ToolContext(msgspec.Struct, frozen=True, kw_only=True):
    """Who asked for the call and under which decision.

    Attributes:
        idempotency_key: the same for every attempt at one step's call (tenant, workflow,
            step and intent hash), different for any other call; an idempotent tool passes it
            to the system it changes (or dedupes on it itself) so a repeated attempt has no
            further effect. Empty when the tool is called outside the gateway.
    """

    workflow: str
    agent: str
    step: int
    decision_id: str
    approval_id: str = ""
    approved_by: str = ""
    idempotency_key: str = ""


Tool = Callable[[dict[str, Any], ToolContext], Awaitable[dict[str, Any]]]
"""A tool: arguments and context in, a JSON-able result out. It raises ``ValueError`` or
``TypeError`` for bad arguments, before it has changed anything, and `govmesh.ToolError` for
a failure, saying whether it may be retried; the gateway answers any other exception as a
failure that is not retried."""


@dataclass(frozen=True, kw_only=True)
class RegisteredTool:
    """A tool and what the gateway may do with it after a crash.

    Attributes:
        name: the tool's name, as calls and decisions name it.
        run: the tool itself.
        idempotent: running it again with the same `ToolContext.idempotency_key` has no
            further effect and returns the first run's result, so the gateway may re-run it
            when it cannot tell whether an earlier attempt took effect. A tool that is not
            idempotent is never run twice for one step: such a step is left to a person.
    """

    name: str
    run: Tool
    idempotent: bool


class ToolRegistry:
    """The tools one gateway runs, by name."""

    def __init__(self) -> None:
        self._tools: dict[str, RegisteredTool] = {}

    def register(self, name: str, run: Tool, *, idempotent: bool) -> RegisteredTool:
        """Add a tool; ``idempotent`` is the tool's promise (see `RegisteredTool`).

        Raises:
            ValueError: a tool of that name is already registered.
        """
        if name in self._tools:
            raise ValueError(f"tool {name!r} is already registered")
        tool = RegisteredTool(name=name, run=run, idempotent=idempotent)
        self._tools[name] = tool
        return tool

    def get(self, name: str) -> RegisteredTool | None:
        """The tool called ``name``, or None."""
        return self._tools.get(name)
