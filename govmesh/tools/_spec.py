"""``@tool``: a typed tool, its JSON Schema, the record of its effects, and what governance
and reports must know of it."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Generic, TypeVar, get_type_hints

import msgspec
import msgspec.inspect as type_info
import redis.asyncio as aioredis

from govmesh._load import load_object
from govmesh.errors import ConfigError, ToolArgumentError, ToolError
from govmesh.governance._terms import ToolTerms
from govmesh.tools._registry import ToolContext

__all__ = ["Effect", "EffectLister", "ToolSpec", "load_tools", "tool"]

A = TypeVar("A")
R = TypeVar("R")

_AT: Final = re.compile(r"^(?P<problem>.*) - at `(?P<path>\$[^`]*)`$", re.DOTALL)
_STEP: Final = re.compile(r"\.(?P<field>[^.\[]+)|\[(?P<index>\d+)\]")
_MAX_VALUE: Final = 100
"""Characters of a bad argument's repr that its error quotes."""
_OBJECT_TYPES: Final = (
    type_info.StructType,
    type_info.DataclassType,
    type_info.TypedDictType,
    type_info.DictType,
)


class Effect(msgspec.Struct, frozen=True, kw_only=True):
    """One effect a tool had, as the tool's own record of its effects holds it.

    Attributes:
        workflow: the workflow whose call had the effect.
        step: the step of that workflow.
        id: the effect's id in the tool's record (a purchase order number, a payment id).
    """

    workflow: str
    step: int
    id: str


EffectLister = Callable[[aioredis.Redis, str], Awaitable[list[Effect]]]
"""Lists a tool's effects from its own record: ``async (redis, key_prefix) -> [Effect]``."""


class ToolSpec(Generic[A, R]):
    """A tool declared with `tool`: its function, its argument and result types, and its
    terms. Call it as the function it wraps; the gateway runs it, agents name it in
    ``Workflow.call_tool``.

    Attributes:
        name: the tool's name, as intents, decisions and capabilities name it.
        run: the tool function: ``async (args, ctx) -> result``.
        args_type: the type of its arguments (a msgspec Struct).
        result_type: the type of its result (a msgspec Struct, a dataclass, a TypedDict or
            a dict: something that is a JSON object).
        idempotent: running it again with the same `ToolContext.idempotency_key` has no
            further effect and returns the first run's result, so the gateway may re-run it
            when it cannot tell whether an earlier attempt took effect. A tool that is not
            idempotent is never run twice for one step: such a step is left to a person.
        terms: spend and show, for governance and reports.
        description: the tool's docstring, for models and people.
        effects_lister: how to list the effects it had from its own record (see
            `effects`), or None if it declares none.
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
        self.effects_lister: EffectLister | None = None

    async def __call__(self, args: A, ctx: ToolContext) -> R:
        return await self.run(args, ctx)

    def __repr__(self) -> str:
        return f"<tool {self.name}>"

    def effects(self, lister: EffectLister) -> EffectLister:
        """Declare how to list the effects this tool had, from its own record (decorator).

        ``lister(redis, key_prefix)`` gets the deployment's Redis and key prefix (the
        `ToolContext.key_prefix` the tool ran with) and returns one `Effect` per effect, so
        chaos runs count an effect that happened twice for one (workflow, step).

        Raises:
            ConfigError: ``lister`` is not an async function, or one is declared already.
        """
        if not inspect.iscoroutinefunction(lister):
            raise ConfigError(f"tool {self.name!r}: its effects lister must be async")
        if self.effects_lister is not None:
            raise ConfigError(f"tool {self.name!r} already declares an effects lister")
        self.effects_lister = lister
        return lister

    def schema(self) -> dict[str, Any]:
        """The tool as models and people see it: name, description, and a JSON Schema of its
        arguments and of its result (each complete by itself, from msgspec)."""
        return {
            "name": self.name,
            "description": self.description,
            "arguments": standalone_schema(self.args_type),
            "result": standalone_schema(self.result_type),
        }

    def load_args(self, args: Mapping[str, Any]) -> A:
        """``args`` as a call carries them (JSON-able builtins) converted to `args_type`.

        Raises:
            ToolArgumentError: they do not fit; it names the field path and quotes the value.
        """
        try:
            return msgspec.convert(args, self.args_type)
        except msgspec.ValidationError as exc:
            raise _argument_error(self.name, str(exc), args) from None

    def dump_args(self, args: A) -> dict[str, Any]:
        """``args`` as a call carries them: JSON-able builtins, as governance decides on them.

        Checked as the gateway will check them (`load_args`), since making a Struct checks
        no constraint (``Meta(gt=0)``): arguments the tool would refuse are found before
        an intent is sent.

        Raises:
            ToolArgumentError: they do not fit; it names the field path and quotes the value.
        """
        dumped: dict[str, Any] = msgspec.to_builtins(args)
        self.load_args(dumped)
        return dumped

    def dump_result(self, result: R) -> dict[str, Any]:
        """``result`` as the gateway answers it: JSON-able builtins, checked against
        `result_type` so that `load_result` takes what the gateway answers.

        Raises:
            ToolError: the tool returned something that is not a `result_type` (a bug in the
                tool; not retryable, since the effect may have happened).
        """
        try:
            dumped: Any = msgspec.to_builtins(result)
            msgspec.convert(dumped, self.result_type)
        except (msgspec.ValidationError, TypeError) as exc:
            raise ToolError(
                f"returned {_quoted(result)}, not a {_type_name(self.result_type)}: {exc}"
            ) from None
        if not isinstance(dumped, dict):
            raise ToolError(f"returned {_quoted(result)}, not a JSON object")
        return dumped

    def load_result(self, result: Mapping[str, Any]) -> R:
        """A result the gateway answered, converted back to `result_type`.

        Raises:
            ToolError: it does not fit (the tool changed since it answered); not retryable.
        """
        try:
            return msgspec.convert(result, self.result_type)
        except msgspec.ValidationError as exc:
            raise ToolError(
                f"{self.name} answered {_quoted(result)}, not a {_type_name(self.result_type)}: "
                f"{exc}"
            ) from None


def standalone_schema(t: Any) -> dict[str, Any]:
    """The JSON Schema of ``t``, with the top-level type written out in place rather than
    referenced, and ``$defs`` for the types it refers to."""
    (schema,), defs = msgspec.json.schema_components((t,), ref_template="#/$defs/{name}")
    ref = schema.get("$ref", "")
    name = ref.removeprefix("#/$defs/")
    if set(schema) == {"$ref"} and name in defs:
        schema = dict(defs[name])
        # Kept when the type refers to itself, so the reference still resolves.
        if ref.encode() not in msgspec.json.encode(list(defs.values())):
            del defs[name]
    return {**schema, "$defs": defs} if defs else dict(schema)


def _argument_error(tool: str, message: str, args: Mapping[str, Any]) -> ToolArgumentError:
    """The error for arguments msgspec refused with ``message``, quoting the value there."""
    found = _AT.match(message)
    if found is None:
        return ToolArgumentError(tool, f"bad arguments: {message}")
    path = found["path"]
    known, value = _value_at(args, path)
    shown = f" = {_quoted(value)}" if known else ""
    return ToolArgumentError(
        tool, f"bad argument {path}{shown}: {found['problem']}", path=path, value=value
    )


def _value_at(args: Any, path: str) -> tuple[bool, Any]:
    """The value at a msgspec error path (``$.lines[2].sku``), if the path leads to one."""
    value, pos = args, 1
    while pos < len(path):
        step = _STEP.match(path, pos)
        if step is None:  # ``[...]``: a mapping's key, which msgspec does not name
            return False, None
        try:
            field, index = step["field"], step["index"]
            value = value[field] if field is not None else value[int(index)]
        except (KeyError, IndexError, TypeError):
            return False, None
        pos = step.end()
    return True, value


def _quoted(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE else f"{text[:_MAX_VALUE]}..."


def _type_name(t: Any) -> str:
    return getattr(t, "__qualname__", None) or repr(t)


def tool(
    *,
    name: str | None = None,
    idempotent: bool = False,
    spend: str | Sequence[str] = (),
    show: Sequence[str] = (),
) -> Callable[[Callable[[A, ToolContext], Awaitable[R]]], ToolSpec[A, R]]:
    """Declare a tool: ``async def f(args: SomeStruct, ctx: ToolContext) -> Result``.

    Arguments are one msgspec Struct (not parameters of their own), so that
    ``Workflow.call_tool(tool, args)`` is typed by it under ``mypy --strict``; the result is
    a Struct, a dataclass, a TypedDict or a dict. Both give the tool's JSON Schema
    (`ToolSpec.schema`).

    Args:
        name: the tool's name (default: the function's name).
        idempotent: running it again under the same ``ctx.idempotency_key`` has no further
            effect (see `ToolSpec.idempotent`).
        spend: the arguments that are money (US dollars); only they count toward spending
            limits and budget authority.
        show: the arguments shown in approvals, watch, reports and audit summaries.

    Raises:
        ConfigError: the function is not async, lacks type hints, its arguments are not a
            Struct that encodes as an object, its result does not encode as an object, or
            ``spend``/``show`` name a field its argument type does not have.
    """
    spends = (spend,) if isinstance(spend, str) else tuple(spend)

    def declare(run: Callable[[A, ToolContext], Awaitable[R]]) -> ToolSpec[A, R]:
        label = name or run.__name__
        if not inspect.iscoroutinefunction(run):
            raise ConfigError(f"tool {label!r}: {run.__qualname__} must be an async function")
        try:
            hints = get_type_hints(run)
        except NameError as exc:
            raise ConfigError(
                f"tool {label!r}: the type hints of {run.__qualname__} do not resolve ({exc}); "
                "declare its types at module level"
            ) from None
        params = [p for p in inspect.signature(run).parameters if p != "return"]
        if len(params) != 2 or params[0] not in hints or "return" not in hints:
            raise ConfigError(
                f"tool {label!r}: {run.__qualname__} must be (args: <Struct>, ctx: ToolContext) "
                "-> <result>, with type hints"
            )
        args_type: Any = hints[params[0]]
        result_type: Any = hints["return"]
        is_struct = isinstance(args_type, type) and issubclass(args_type, msgspec.Struct)
        if not is_struct or args_type.__struct_config__.array_like:
            raise ConfigError(
                f"tool {label!r}: its arguments must be a msgspec Struct (not array_like), "
                f"got {_type_name(args_type)}"
            )
        fields = {f.encode_name for f in msgspec.structs.fields(args_type)}
        for what, names in (("spend", spends), ("show", tuple(show))):
            unknown = sorted(set(names) - fields)
            if unknown:
                raise ConfigError(
                    f"tool {label!r}: {what} names {unknown!r}, not fields of "
                    f"{args_type.__qualname__}"
                )
        info = type_info.type_info(result_type)
        if not isinstance(info, _OBJECT_TYPES) or getattr(info, "array_like", False):
            raise ConfigError(
                f"tool {label!r}: its result must be a Struct, dataclass, TypedDict or dict "
                f"(a JSON object), got {_type_name(result_type)}"
            )
        return ToolSpec(
            run,
            name=label,
            args_type=args_type,
            result_type=result_type,
            idempotent=idempotent,
            terms=ToolTerms(name=label, spend=spends, show=tuple(show)),
            description=inspect.getdoc(run) or "",
        )

    return declare


def load_tools(
    tools: Iterable[str | ToolSpec[Any, Any]], *, search_path: Sequence[str] = ()
) -> dict[str, ToolSpec[Any, Any]]:
    """The tools named by ``tools`` (``ToolSpec`` s, or paths ``"pkg.module:name"`` of
    ones), by name; each path's module is imported here, ``search_path`` folders first.

    Raises:
        ConfigError: a path does not load or names something that is not a `ToolSpec`
            (a function without ``@govmesh.tool``, say), or two tools share a name.
    """
    found: dict[str, ToolSpec[Any, Any]] = {}
    for given in tools:
        spec = given
        if isinstance(given, str):
            spec = load_object(given, search_path=search_path, what="tool")
        if not isinstance(spec, ToolSpec):
            raise ConfigError(
                f"tool {given!r} is a {type(spec).__qualname__}, not a tool: declare it with "
                "@govmesh.tool(...)"
            )
        if spec.name in found:
            raise ConfigError(f"tool {given!r}: another tool is named {spec.name!r} too")
        found[spec.name] = spec
    return found
