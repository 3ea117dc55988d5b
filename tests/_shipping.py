"""Agents and a tool of a test's own, written on govmesh's public API as a user writes them:
a shipper that plans with the model, may wait on a durable timer, and ships through a
governed tool; a desk that asks the shipper. The tool's behaviour is the test's to set."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import msgspec

import govmesh

ROLE = "Shipper"
POLICY = """
policy:
  agent: Shipper
  spending_limit_usd: 10000
  require_approval_if_over: 5000
  allowed_vendors: [Vendor_A, Vendor_B]
"""
"""Allows Vendor_A and Vendor_B up to 5,000, escalates up to 10,000, denies the rest."""


class Shipment(msgspec.Struct, frozen=True, kw_only=True):
    """What to ship, from whom, at what cost."""

    item: str
    vendor: str
    amount_usd: float


class Shipped(msgspec.Struct, frozen=True, kw_only=True):
    """A shipment made."""

    tracking: str
    item: str


@dataclass
class Behaviour:
    """How the tool behaves in the current test: it raises each of `failures` in turn,
    then waits for `release` (when set), then ships once per idempotency key."""

    failures: list[Exception] = field(default_factory=list)
    release: asyncio.Event | None = None
    running: asyncio.Event = field(default_factory=asyncio.Event)
    calls: int = 0
    shipped: dict[str, Shipped] = field(default_factory=dict)
    effects: Counter[tuple[str, int]] = field(default_factory=Counter)


BEHAVIOUR = Behaviour()


@govmesh.tool(name="test.ship", idempotent=True, spend="amount_usd", show=("item", "amount_usd"))
async def ship(shipment: Shipment, ctx: govmesh.ToolContext) -> Shipped:
    """Ship something; one shipment per idempotency key."""
    b = BEHAVIOUR
    b.calls += 1
    b.running.set()
    if b.failures:
        raise b.failures.pop(0)
    if b.release is not None:
        await b.release.wait()
    if ctx.idempotency_key not in b.shipped:
        b.shipped[ctx.idempotency_key] = Shipped(
            tracking=f"T-{len(b.shipped) + 1}", item=shipment.item
        )
        b.effects[(ctx.workflow, ctx.step)] += 1
    return b.shipped[ctx.idempotency_key]


class Shipper(govmesh.Agent):
    """Plans a shipment, waits for pickup if told to, and ships it."""

    role = ROLE
    tools = (ship,)

    def __init__(self, *, pickup_s: float = 0.0) -> None:
        self.pickup_s = pickup_s

    @govmesh.handler
    async def send(self, wf: govmesh.Workflow, shipment: Shipment) -> Shipped:
        """Plan, wait, ship."""
        await wf.think(f"Plan shipping {shipment.item} with {shipment.vendor}.", key="plan")
        await wf.snapshot({"planned": shipment.item})
        if self.pickup_s:
            await wf.sleep("pickup", self.pickup_s)
        return await wf.call_tool(ship, shipment, step=1)


class Planner(govmesh.Agent):
    """Lets the model pick the shipment, and makes each call it asks for, governed."""

    role = ROLE
    tools = (ship,)

    @govmesh.handler
    async def plan(self, wf: govmesh.Workflow, shipment: Shipment) -> list[Shipped]:
        """Ask the model, then call the tools it asked for."""
        answer = await wf.think(f"Ship {shipment.item}.", tools=[ship], key="plan")
        return [
            await wf.call_tool(ship, ship.load_args(call.args), step=step)
            for step, call in enumerate(answer.tool_calls, start=1)
            if call.name == ship.name
        ]


class Operator(govmesh.Agent):
    """Lets the model ship through the tool, turn by turn, and answers with its last word."""

    role = ROLE
    tools = (ship,)

    def __init__(self, *, tell_failures: bool = False) -> None:
        self.tell_failures = tell_failures

    @govmesh.handler
    async def operate(self, wf: govmesh.Workflow, shipment: Shipment) -> str:
        """Ship with the model's help until it answers without a tool."""
        answer = await wf.act(
            f"Ship {shipment.item} from {shipment.vendor}.",
            tools=[ship],
            system="You ship things with the tools you are given.",
            tell_failures=self.tell_failures,
            max_turns=4,
        )
        return answer.text


class Desk(govmesh.Agent):
    """Takes a shipment request and has the shipper ship it."""

    role = "Desk"

    def __init__(self, *, shipper: str = "shipper-1") -> None:
        self.shipper = shipper

    @govmesh.handler
    async def take(self, wf: govmesh.Workflow, shipment: Shipment) -> Shipped:
        """Note the request, then ask the shipper."""
        await wf.think(f"Note a request to ship {shipment.item}.", key="note")
        return await wf.ask(self.shipper, shipment, returns=Shipped)


class Dispatcher(govmesh.Agent):
    """Hands a shipment to the shipper and goes on without waiting for it."""

    role = "Dispatcher"

    def __init__(self, *, shipper: str = "shipper-1") -> None:
        self.shipper = shipper

    @govmesh.handler
    async def dispatch(self, wf: govmesh.Workflow, shipment: Shipment) -> str:
        """Send the shipment on, then note that it was sent."""
        await wf.send(self.shipper, shipment)
        await wf.think(f"Note that {shipment.item} went to the shipper.", key="note")
        return "dispatched"


class Clumsy(govmesh.Agent):
    """A handler with a bug."""

    role = ROLE

    @govmesh.handler
    async def send(self, wf: govmesh.Workflow, shipment: Shipment) -> None:
        """Fails on anything it is given."""
        raise ValueError(f"cannot ship {shipment.item!r}")


class Careful(govmesh.Agent):
    """Ships, and settles for no shipment when the call is not allowed; with ``notes``,
    first tries to save that many bytes of notes."""

    role = ROLE
    tools = (ship,)

    def __init__(self, *, notes: int = 0) -> None:
        self.notes = notes

    @govmesh.handler
    async def send(self, wf: govmesh.Workflow, shipment: Shipment) -> Shipped:
        """Ship if allowed."""
        if self.notes:
            await wf.snapshot({"notes": "x" * self.notes})
        try:
            return await wf.call_tool(ship, shipment, step=1)
        except govmesh.Denied as denied:
            await wf.snapshot({"denied": list(denied.reasons), "rejected": denied.rejected})
            return Shipped(tracking="none", item=shipment.item)
