"""The procurement agents: a requester and a buyer."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

import govmesh

from procurement.tools import Order, Placed, create_purchase_order

__all__ = ["Buyer", "Draft", "Plan", "Purchase", "Requester"]


class Purchase(msgspec.Struct, frozen=True, kw_only=True):
    """Something to buy: what starts a procurement workflow."""

    item: str
    vendor: str
    amount_usd: float


class Draft(msgspec.Struct, frozen=True, kw_only=True):
    """The purchase request the requester's model drafts (structured output: its answer
    must be this, as JSON). Short fields keep a small model's answers short."""

    title: Annotated[str, msgspec.Meta(max_length=80)]
    justification: Annotated[str, msgspec.Meta(max_length=200)]


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """The buyer's plan of a purchase, as its model answers it (structured output)."""

    summary: Annotated[str, msgspec.Meta(max_length=160)]
    risk: Literal["low", "medium", "high"]


class Requester(govmesh.Agent):
    """Drafts a purchase request with the model and has the buyer place it.

    Args:
        procurement: the buyer's agent id.
    """

    role = "Requester"

    def __init__(self, *, procurement: str = "procurement-1") -> None:
        self.procurement = procurement

    @govmesh.handler
    async def request(self, wf: govmesh.Workflow, purchase: Purchase) -> Placed:
        """Draft the request, then wait for the buyer's order."""
        await wf.think(
            f"Draft a purchase request for {purchase.item} from {purchase.vendor}.",
            schema=Draft,
            key="draft",
        )
        return await wf.ask(self.procurement, purchase, returns=Placed)


class Buyer(govmesh.Agent):
    """Plans a purchase, waits for the vendor's quote, and places the order.

    Args:
        vendor_wait_hours: how long the vendor takes to quote, on the deployment's clock
            (a durable timer); 0 for no wait.
    """

    role = "Procurement-Agent-v2"
    tools = (create_purchase_order,)

    def __init__(self, *, vendor_wait_hours: float = 0.0) -> None:
        self.vendor_wait_hours = vendor_wait_hours

    @govmesh.handler
    async def buy(self, wf: govmesh.Workflow, purchase: Purchase) -> Placed:
        """Plan, wait for the quote, and order under the policy's decision."""
        await wf.think(
            f"Plan a purchase of {purchase.item} from {purchase.vendor} "
            f"for ${purchase.amount_usd:,.2f}: a one-sentence summary and its risk.",
            schema=Plan,
            key="plan",
        )
        if self.vendor_wait_hours:
            await wf.sleep("vendor-reply", self.vendor_wait_hours * 3600)
        order = Order(item=purchase.item, vendor=purchase.vendor, amount_usd=purchase.amount_usd)
        return await wf.call_tool(create_purchase_order, order, step=1)
