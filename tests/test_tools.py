"""``@tool``: typed arguments and results with errors that name the field, the JSON Schema,
the context a tool gets, and the record of its effects."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import pytest
import redis.asyncio as aioredis

import govmesh
from govmesh.errors import ConfigError, ToolArgumentError
from govmesh.tools import Effect, ToolContext, ToolSpec, load_tools, tool

from procurement.tools import Order, Placed, create_purchase_order, orders


class Line(msgspec.Struct, frozen=True):
    sku: str
    qty: Annotated[int, msgspec.Meta(ge=1)]


class Basket(msgspec.Struct, frozen=True):
    vendor: str
    lines: list[Line]
    notes: dict[str, str] = {}


class Pair(msgspec.Struct, array_like=True):
    a: int


class Node(msgspec.Struct, frozen=True):
    """A tree: a type that refers to itself."""

    name: str
    children: list[Node] = []


@tool(name="shop.basket")
async def basket(b: Basket, ctx: ToolContext) -> dict[str, int]:
    """Count a basket's units."""
    return {"units": sum(line.qty for line in b.lines)}


def test_the_public_api_is_the_tools_own() -> None:
    assert govmesh.tool is tool and govmesh.ToolSpec is ToolSpec
    assert govmesh.Effect is Effect and govmesh.ToolContext is ToolContext


@pytest.mark.parametrize(
    ("args", "error", "path", "value"),
    [
        (
            {"vendor": "V", "lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": "2"}]},
            "bad argument $.lines[1].qty = '2': Expected `int`, got `str`",
            "$.lines[1].qty",
            "2",
        ),
        (
            {"vendor": "V", "lines": [{"sku": "a", "qty": 0}]},
            "bad argument $.lines[0].qty = 0: Expected `int` >= 1",
            "$.lines[0].qty",
            0,
        ),
        (
            {"vendor": ["V"], "lines": []},
            "bad argument $.vendor = ['V']: Expected `str`, got `array`",
            "$.vendor",
            ["V"],
        ),
        # A mapping's key is not named by the path, so no value is quoted.
        (
            {"vendor": "V", "lines": [], "notes": {"k": 1}},
            "bad argument $.notes[...]: Expected `str`, got `int`",
            "$.notes[...]",
            None,
        ),
        (
            {"lines": []},
            "bad arguments: Object missing required field `vendor`",
            "",
            None,
        ),
    ],
)
def test_arguments_that_do_not_fit_name_the_field_path_and_quote_the_value(
    args: dict[str, Any], error: str, path: str, value: Any
) -> None:
    with pytest.raises(ToolArgumentError) as raised:
        basket.load_args(args)
    assert str(raised.value) == f"shop.basket: {error}"
    assert raised.value.problem == error
    assert (raised.value.tool, raised.value.path, raised.value.value) == (
        "shop.basket",
        path,
        value,
    )
    assert isinstance(raised.value, ValueError)


def test_arguments_and_results_convert_between_types_and_builtins() -> None:
    order = create_purchase_order.load_args({"item": "desk", "vendor": "V", "amount_usd": 5})
    assert order == Order(item="desk", vendor="V", amount_usd=5.0)
    assert create_purchase_order.dump_args(order) == {
        "item": "desk",
        "vendor": "V",
        "amount_usd": 5.0,
    }
    assert create_purchase_order.dump_result(Placed(po_id="PO-1")) == {"po_id": "PO-1"}
    # Making a Struct checks no constraint; what a call would carry is checked.
    with pytest.raises(ToolArgumentError, match=r"\$.amount_usd = -1.0: Expected `float` > 0"):
        create_purchase_order.dump_args(Order(item="desk", vendor="V", amount_usd=-1.0))
    assert create_purchase_order.load_result({"po_id": "PO-1"}) == Placed(po_id="PO-1")


def test_a_result_that_is_not_the_declared_type_is_a_tool_error() -> None:
    with pytest.raises(govmesh.ToolError, match=r"returned \{'po': 1\}, not a Placed") as raised:
        create_purchase_order.dump_result({"po": 1})  # type: ignore[arg-type]
    assert not raised.value.retryable
    with pytest.raises(govmesh.ToolError, match=r"answered \{'po': 1\}, not a Placed") as raised:
        create_purchase_order.load_result({"po": 1})
    assert not raised.value.retryable


def test_the_schema_describes_arguments_and_result_from_their_types() -> None:
    schema = create_purchase_order.schema()
    assert schema["name"] == "erp.create_purchase_order"
    assert schema["description"].startswith("Place a purchase order")
    args = schema["arguments"]
    assert (args["type"], args["title"], args["required"]) == (
        "object",
        "Order",
        ["item", "vendor", "amount_usd"],
    )
    assert args["properties"]["amount_usd"] == {"type": "number", "exclusiveMinimum": 0}
    assert args["properties"]["vendor"] == {"type": "string", "minLength": 1}
    assert schema["result"]["properties"] == {"po_id": {"type": "string"}}
    assert "$defs" not in args and "$defs" not in schema["result"]
    # Nested types are referenced from the schema's own $defs.
    nested = basket.schema()["arguments"]
    assert nested["properties"]["lines"]["items"] == {"$ref": "#/$defs/Line"}
    assert set(nested["$defs"]) == {"Line"}
    assert basket.schema()["result"] == {
        "type": "object",
        "additionalProperties": {"type": "integer"},
    }


def test_a_type_that_refers_to_itself_keeps_its_definition() -> None:
    @tool(name="tree.walk")
    async def walk(node: Node, ctx: ToolContext) -> Node:
        return node

    args = walk.schema()["arguments"]
    assert args["type"] == "object"
    assert args["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    assert set(args["$defs"]) == {"Node"}


def test_a_declaration_that_cannot_be_typed_is_refused_with_the_reason() -> None:
    async def untyped(args, ctx):  # type: ignore[no-untyped-def]
        return {}

    async def by_parameters(vendor: str, ctx: ToolContext) -> dict[str, int]:
        return {}

    async def listed(b: Basket, ctx: ToolContext) -> list[int]:
        return []

    async def paired(p: Pair, ctx: ToolContext) -> dict[str, int]:
        return {}

    def sync(b: Basket, ctx: ToolContext) -> dict[str, int]:
        return {}

    class Local(msgspec.Struct):
        a: int

    async def local(args: Local, ctx: ToolContext) -> dict[str, int]:
        return {}

    cases: list[tuple[Any, dict[str, Any], str]] = [
        (untyped, {}, "with type hints"),
        (by_parameters, {}, "must be a msgspec Struct .* got str"),
        (listed, {}, "result must be a Struct, dataclass, TypedDict or dict .* got list"),
        (paired, {}, "not array_like"),
        (sync, {}, "must be an async function"),
        (local, {}, r"do not resolve \(name 'Local' is not defined\); declare its types at"),
        (
            basket.run,
            {"spend": "amount_usd"},
            r"spend names \['amount_usd'\], not fields of Basket",
        ),
        (basket.run, {"show": ("vendor", "total")}, r"show names \['total'\]"),
    ]
    for run, options, message in cases:
        with pytest.raises(ConfigError, match=message):
            tool(**options)(run)


def test_loading_tools_by_path_names_what_is_wrong() -> None:
    assert load_tools(["procurement.tools:create_purchase_order", basket]) == {
        "erp.create_purchase_order": create_purchase_order,
        "shop.basket": basket,
    }
    with pytest.raises(ConfigError, match=r"'procurement.tools:Order' is a StructMeta, not a tool"):
        load_tools(["procurement.tools:Order"])
    with pytest.raises(ConfigError, match=r"'procurement.tools' has no 'nothing'"):
        load_tools(["procurement.tools:nothing"])
    with pytest.raises(ConfigError, match=r"must be 'package.module:name'"):
        load_tools(["procurement.tools.create_purchase_order"])


def test_a_context_namespaces_keys_and_says_when_it_has_no_redis() -> None:
    ctx = ToolContext(workflow="wf", agent="a", step=1, decision_id="d", key_prefix="gm:acme")
    assert ctx.key("erp", "orders") == "gm:acme:erp:orders"
    for bad in ((), ("erp", "")):
        with pytest.raises(ValueError, match="key parts must be non-empty"):
            ctx.key(*bad)
    with pytest.raises(govmesh.ToolError, match="no Redis connection"):
        ctx.redis  # noqa: B018
    with pytest.raises(ValueError, match="no key_prefix"):
        ToolContext(workflow="wf", agent="a", step=1, decision_id="d").key("x")


def test_an_effects_lister_is_declared_once_and_must_be_async() -> None:
    @tool(name="t.effects")
    async def noop(b: Basket, ctx: ToolContext) -> dict[str, int]:
        return {}

    assert noop.effects_lister is None

    def sync(redis: aioredis.Redis, key_prefix: str) -> list[Effect]:
        return []

    with pytest.raises(ConfigError, match="must be async"):
        noop.effects(sync)  # type: ignore[arg-type]

    async def lister(redis: aioredis.Redis, key_prefix: str) -> list[Effect]:
        return []

    assert noop.effects(lister) is lister and noop.effects_lister is lister
    with pytest.raises(ConfigError, match="already declares an effects lister"):
        noop.effects(lister)


async def test_the_erps_effects_are_listed_from_its_own_record(redis_server, prefix) -> None:
    redis = aioredis.Redis.from_url(redis_server.url)
    key_prefix = f"gm:{prefix}"
    try:
        placed = []
        for workflow, step, key in (("wf-1", 1, "k1"), ("wf-1", 1, "k1"), ("wf-2", 3, "")):
            ctx = ToolContext(
                workflow=workflow,
                agent="procurement-1",
                step=step,
                decision_id="d",
                idempotency_key=key,
                key_prefix=key_prefix,
                redis=redis,
            )
            placed.append(await create_purchase_order(Order("desk", "V", 10.0), ctx))
        assert create_purchase_order.effects_lister is not None
        effects = await create_purchase_order.effects_lister(redis, key_prefix)
        recorded = await orders(redis, key_prefix)
    finally:
        await redis.aclose()
    # The same idempotency key placed one order; the call without a key placed its own.
    assert placed[0] == placed[1] != placed[2]
    assert effects == [
        Effect(workflow="wf-1", step=1, id=placed[0].po_id),
        Effect(workflow="wf-2", step=3, id=placed[2].po_id),
    ]
    assert [(o.workflow, o.step, o.item, o.amount_usd) for o in recorded] == [
        ("wf-1", 1, "desk", 10.0),
        ("wf-2", 3, "desk", 10.0),
    ]
