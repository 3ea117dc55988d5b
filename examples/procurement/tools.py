"""The procurement example's tool: a simulated ERP that places purchase orders.

The ERP keeps its own record of every order it placed, in the deployment's Redis under
``<key prefix>:erp:orders``, apart from anything governance or the gateway record, so tests
and chaos runs can check what really happened (`orders`, and the tool's effects lister).

Like a real ERP's API with idempotency keys, it places one order per key: the order is
stored under the call's idempotency key only if that key holds none yet, and a repeated key
returns the order placed already. That makes ``create_purchase_order`` idempotent, so the
gateway may run it again after a crash.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

import govmesh

__all__ = ["Order", "Placed", "PurchaseOrder", "create_purchase_order", "orders"]


class Order(msgspec.Struct, frozen=True):
    """A purchase order to place."""

    item: str
    vendor: Annotated[str, msgspec.Meta(min_length=1)]
    amount_usd: Annotated[float, msgspec.Meta(gt=0)]


class Placed(msgspec.Struct, frozen=True):
    """The order the ERP placed."""

    po_id: str


class PurchaseOrder(msgspec.Struct, frozen=True, kw_only=True):
    """One order the ERP placed, as it recorded it."""

    po_id: str
    workflow: str
    agent: str
    step: int
    item: str
    vendor: str
    amount_usd: float
    decision_id: str
    approval_id: str = ""
    approved_by: str = ""
    created_at: float


def _orders_key(key_prefix: str) -> str:
    return f"{key_prefix}:erp:orders"


@govmesh.tool(
    name="erp.create_purchase_order",
    idempotent=True,
    spend="amount_usd",
    show=("vendor", "amount_usd"),
)
async def create_purchase_order(order: Order, ctx: govmesh.ToolContext) -> Placed:
    """Place a purchase order for ``item`` with ``vendor``, for ``amount_usd`` US dollars.

    Under ``ctx.idempotency_key``, an order placed already under that key is returned
    instead of a new one.

    Raises:
        govmesh.ToolError: the ERP's store could not be reached; retryable under an
            idempotency key, since a repeated call under the key places no second order.
    """
    placed = PurchaseOrder(
        po_id=f"PO-{uuid.uuid4().hex[:12]}",
        workflow=ctx.workflow,
        agent=ctx.agent,
        step=ctx.step,
        item=order.item,
        vendor=order.vendor,
        amount_usd=order.amount_usd,
        decision_id=ctx.decision_id,
        approval_id=ctx.approval_id,
        approved_by=ctx.approved_by,
        created_at=time.time(),
    )
    key = _orders_key(ctx.key_prefix)
    try:
        field = ctx.idempotency_key or placed.po_id
        if not await ctx.redis.hsetnx(key, field, msgspec.json.encode(placed)):
            # Placed already under this key (orders are never removed): that order stands.
            first = await ctx.redis.hget(key, field)
            placed = msgspec.json.decode(first or b"", type=PurchaseOrder)
    except RedisError as exc:
        raise govmesh.ToolError(
            f"the ERP is unreachable: {exc}", retryable=bool(ctx.idempotency_key)
        ) from exc
    return Placed(po_id=placed.po_id)


@create_purchase_order.effects
async def placed_orders(redis: aioredis.Redis, key_prefix: str) -> list[govmesh.Effect]:
    """Every order the ERP placed, as an effect of its workflow's step."""
    return [
        govmesh.Effect(workflow=o.workflow, step=o.step, id=o.po_id)
        for o in await orders(redis, key_prefix)
    ]


async def orders(redis: aioredis.Redis, key_prefix: str) -> list[PurchaseOrder]:
    """Every order the ERP placed in the deployment with ``key_prefix``, oldest first."""
    stored = await redis.hvals(_orders_key(key_prefix))
    found = [msgspec.json.decode(raw, type=PurchaseOrder) for raw in stored]
    return sorted(found, key=lambda o: (o.created_at, o.po_id))
