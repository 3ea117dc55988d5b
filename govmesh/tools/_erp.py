"""A simulated ERP system: the enterprise tool of the procurement scenario.

It keeps its own record of every purchase order it executed, in Redis, separate from
anything governance or the gateway record, so tests can check what really happened.

Like a real ERP's API with idempotency keys, it executes one order per key: an order and its
key are recorded together in one script, and a repeated key returns the order already
executed. That makes `ERP_CREATE_PO` an idempotent tool, which the gateway may re-run after a
crash.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from govmesh.errors import ToolError
from govmesh.tools._registry import ToolContext

__all__ = ["ERP_CREATE_PO", "PurchaseOrder", "SimulatedErp"]

ERP_CREATE_PO = "erp.create_purchase_order"

# KEYS: by-key, orders. ARGV: idempotency key, order (JSON). Returns the key's order.
_CREATE_ONCE: Final = """
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return existing end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[2])
return ARGV[2]
"""


class PurchaseOrder(msgspec.Struct, frozen=True, kw_only=True):
    """One executed purchase order, as the ERP recorded it."""

    po_id: str
    workflow: str
    agent: str
    item: str
    vendor: str
    amount_usd: float
    decision_id: str
    approval_id: str = ""
    approved_by: str = ""
    created_at: float


class SimulatedErp:
    """Creates purchase orders and records them under ``<prefix>:erp:orders``, each with its
    idempotency key under ``<prefix>:erp:by-key`` (key -> order)."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str) -> None:
        self._redis = redis
        self._key = f"{prefix}:erp:orders"
        self._by_key = f"{prefix}:erp:by-key"
        self._create_once = redis.register_script(_CREATE_ONCE)

    async def create_purchase_order(self, args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        """Execute one order; args need ``vendor``, ``amount_usd`` and ``item``.

        With ``ctx.idempotency_key``, an order already executed under that key is returned
        instead of a new one.

        Raises:
            ValueError: an argument is missing or invalid; nothing was executed.
            ToolError: the ERP's store could not be reached; retryable with an idempotency
                key, since a repeated call under the key executes no second order.
        """
        vendor, amount, item = args.get("vendor"), args.get("amount_usd"), args.get("item", "")
        if not isinstance(vendor, str) or not vendor:
            raise ValueError(f"vendor must be a non-empty string, got {vendor!r}")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or amount <= 0:
            raise ValueError(f"amount_usd must be a positive number, got {amount!r}")
        order = PurchaseOrder(
            po_id=f"PO-{uuid.uuid4().hex[:12]}",
            workflow=ctx.workflow,
            agent=ctx.agent,
            item=str(item),
            vendor=vendor,
            amount_usd=float(amount),
            decision_id=ctx.decision_id,
            approval_id=ctx.approval_id,
            approved_by=ctx.approved_by,
            created_at=time.time(),
        )
        encoded = msgspec.json.encode(order)
        try:
            if ctx.idempotency_key:
                stored = await self._create_once(
                    keys=[self._by_key, self._key], args=[ctx.idempotency_key, encoded]
                )
                order = msgspec.json.decode(stored, type=PurchaseOrder)
            else:
                await self._redis.rpush(self._key, encoded)
        except RedisError as exc:
            raise ToolError(
                f"the ERP is unreachable: {exc}", retryable=bool(ctx.idempotency_key)
            ) from exc
        return {"po_id": order.po_id, "vendor": order.vendor, "amount_usd": order.amount_usd}

    async def orders(self) -> list[PurchaseOrder]:
        """Every order executed so far."""
        raw = await self._redis.lrange(self._key, 0, -1)
        return [msgspec.json.decode(r, type=PurchaseOrder) for r in raw]
