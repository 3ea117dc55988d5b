"""The budget actor: counts token burn and cost from usage events, in real time."""

from __future__ import annotations

from typing import Any

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.forecasting._prices import Price, PriceTable
from govmesh.forecasting.messages import BudgetQuery, BudgetReport, Usage
from govmesh.identity import Identity
from govmesh.service import Service

__all__ = ["BudgetService"]

QUEUE = "budget"
_FIELDS = ("calls", "input_tokens", "output_tokens", "cost_usd")


class BudgetService(Service):
    """Keeps spend per workflow and per tenant in Redis, so several budget actors agree.

    Args:
        deployment: where the services are and whom to trust.
        identity: this actor's identity.
        prices: price per model; every model in use must have one.
    """

    def __init__(
        self, deployment: Deployment, identity: Identity, *, prices: dict[str, Price]
    ) -> None:
        super().__init__(deployment, identity)
        self.prices = PriceTable(prices)

    async def on_start(self) -> None:
        """Subscribe to usage events and budget queries."""
        await self.bus.subscribe(
            self.subjects.all("usage"), self._on_usage, accepts=Usage, queue=QUEUE
        )
        await self.bus.subscribe(
            self.subjects.ctl("budget"),
            self._on_query,
            accepts=BudgetQuery,
            queue=QUEUE,
            concurrent=False,
        )

    async def _on_usage(self, d: Delivery) -> None:
        usage: Usage = d.body
        cost = self.prices.price(usage.model).cost(usage.input_tokens, usage.output_tokens)
        async with self.redis.pipeline(transaction=True) as pipe:
            for key in (self.key("spend", "tenant"), self.key("spend", "wf", d.envelope.workflow)):
                pipe.hincrby(key, "calls", 1)
                pipe.hincrby(key, "input_tokens", usage.input_tokens)
                pipe.hincrby(key, "output_tokens", usage.output_tokens)
                pipe.hincrbyfloat(key, "cost_usd", cost)
            await pipe.execute()

    async def _on_query(self, d: Delivery) -> None:
        query: BudgetQuery = d.body
        keys = (
            [self.key("spend", "wf", w) for w in query.workflows]
            if query.workflows
            else [self.key("spend", "tenant")]
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, list(_FIELDS))
            rows: list[list[Any]] = await pipe.execute()
        calls = inp = out = 0
        cost = 0.0
        for row in rows:
            c, i, o, usd = (0 if v is None else v for v in row)
            calls, inp, out, cost = calls + int(c), inp + int(i), out + int(o), cost + float(usd)
        await self.bus.respond(
            d,
            BudgetReport(calls=calls, input_tokens=inp, output_tokens=out, cost_usd=cost),
        )
