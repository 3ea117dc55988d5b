"""The ledger tool: pays an expense claim, once per idempotency key."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

import govmesh

__all__ = ["Paid", "Payment", "pay_expense", "payments"]


class Payment(msgspec.Struct, frozen=True, kw_only=True):
    """An expense to pay.

    Attributes:
        claim: the claim's id.
        employee: whom to pay.
        category: what the money was spent on (policies escalate or deny by it).
        amount_usd: how much, in US dollars.
        currency: the currency the claim was made in.
        memo: the employee's note (policies deny on patterns in it).
    """

    claim: str
    employee: str
    category: str
    amount_usd: float
    currency: str = "USD"
    memo: str = ""


class Paid(msgspec.Struct, frozen=True, kw_only=True):
    """A payment made."""

    payment_id: str


class _Record(msgspec.Struct, frozen=True, kw_only=True):
    payment: Payment
    payment_id: str
    workflow: str
    step: int


_LEDGER = ("ledger", "payments")


@govmesh.tool(
    name="ledger.pay_expense",
    idempotent=True,
    spend="amount_usd",
    show=("employee", "category", "amount_usd", "memo"),
)
async def pay_expense(payment: Payment, ctx: govmesh.ToolContext) -> Paid:
    """Pay an expense claim. Idempotent: a call again under the same idempotency key pays
    nothing more and returns the first payment."""
    payment_id = "pay-" + hashlib.sha256(ctx.idempotency_key.encode()).hexdigest()[:16]
    record = _Record(payment=payment, payment_id=payment_id, workflow=ctx.workflow, step=ctx.step)
    await ctx.redis.hsetnx(ctx.key(*_LEDGER), ctx.idempotency_key, msgspec.json.encode(record))
    return Paid(payment_id=payment_id)


@pay_expense.effects
async def payments(redis: Any, key_prefix: str) -> list[govmesh.Effect]:
    """Every payment the ledger made: one effect per payment."""
    stored = await redis.hgetall(":".join((key_prefix, *_LEDGER)))
    decoder = msgspec.json.Decoder(_Record)
    return [
        govmesh.Effect(workflow=r.workflow, step=r.step, id=r.payment_id)
        for r in (decoder.decode(raw) for raw in stored.values())
    ]
