"""``@tool``: a typed tool, its JSON Schema, and what governance and reports must know of it."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar, get_type_hints

import msgspec

from govmesh.errors import ConfigError
from govmesh.governance._terms import ToolTerms
from govmesh.tools._registry import ToolContext

__all__ = ["ToolSpec", "tool"]

A = TypeVar("A")
R = TypeVar("R")


class ToolSpec(Generic[A, R]):
    """A tool declared with `tool`: its function, its argument and result types, and its
    terms. Call it as the function it wraps; the gateway runs it, agents name it in
    ``Workflow.call_tool``.

    Attributes:
        name: the tool's name, as intents, decisions and capabilities name it.
        run: the tool function: ``async (args, ctx) -> result``.
        args_type: the type of its arguments (a msgspec Struct).
        result_type: the type of its result (a msgspec Struct, or a JSON-able type).
        idempotent: see `govmesh.tools.RegisteredTool`.
        terms: spend and show, for governance and reports.
        description: the tool's docstring, for models and people.
    """

    def __init__(
        self,
        run: Callable[[A, ToolContext], Awaitable[R]],
        *,
        name: str,
        args_type: type[A],
        result_type: type[R],
        idempotent: bool,
        terms: ToolTerms,
        description: str,
    ) -> None:
        self.run = run
        self.name = name
        self.args_type = args_type
        self.result_type = result_type
        self.idempotent = idempotent
        self.terms = terms
        self.description = description

    async def __call__(self, args: A, ctx: ToolContext) -> R:
        return await self.run(args, ctx)

    def __repr__(self) -> str:
        return f"<tool {self.name}>"


def tool(
    *,
    name: str | None = None,
    idempotent: bool = False,
    spend: str | Sequence[str] = (),
    show: Sequence[str] = (),
) -> Callable[[Callable[[A, ToolContext], Awaitable[R]]], ToolSpec[A, R]]:
    """Declare a tool: ``async def f(args: SomeStruct, ctx: ToolContext) -> Result``.

    Args:
        name: the tool's name (default: the function's name).
        idempotent: running it again under the same ``ctx.idempotency_key`` has no further
            effect (see `govmesh.tools.RegisteredTool`).
        spend: the arguments that are money (US dollars); only they count toward spending
            limits and budget authority.
        show: the arguments shown in approvals, watch, reports and audit summaries.

    Raises:
        ConfigError: the function is not async, lacks type hints, or ``spend``/``show``
            name a field its argument type does not have.
    """
    spends = (spend,) if isinstance(spend, str) else tuple(spend)

    def declare(run: Callable[[A, ToolContext], Awaitable[R]]) -> ToolSpec[A, R]:
        label = name or run.__name__
        if not inspect.iscoroutinefunction(run):
            raise ConfigError(f"tool {label!r}: {run.__qualname__} must be an async function")
        hints = get_type_hints(run)
        params = [p for p in inspect.signature(run).parameters if p != "return"]
        if len(params) != 2 or params[0] not in hints or "return" not in hints:
            raise ConfigError(
                f"tool {label!r}: {run.__qualname__} must be (args: <Struct>, ctx: ToolContext) "
                "-> <result>, with type hints"
            )
        args_type: Any = hints[params[0]]
        fields = (
            {f.name for f in msgspec.structs.fields(args_type)}
            if isinstance(args_type, type) and issubclass(args_type, msgspec.Struct)
            else None
        )
        if fields is None:
            raise ConfigError(f"tool {label!r}: its arguments must be a msgspec Struct")
        for what, names in (("spend", spends), ("show", tuple(show))):
            unknown = sorted(set(names) - fields)
            if unknown:
                raise ConfigError(
                    f"tool {label!r}: {what} names {unknown!r}, not fields of "
                    f"{args_type.__qualname__}"
                )
        return ToolSpec(
            run,
            name=label,
            args_type=args_type,
            result_type=hints["return"],
            idempotent=idempotent,
            terms=ToolTerms(name=label, spend=spends, show=tuple(show)),
            description=inspect.getdoc(run) or "",
        )

    return declare
