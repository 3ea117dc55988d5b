"""The budget actor: counts token burn and cost from usage events in real time, puts a
workflow that reached its soft threshold to a person, and settles reservations that lapsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Final, cast

import msgspec
from redis.exceptions import RedisError

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.forecasting._prices import Price, PriceTable
from govmesh.forecasting._reservations import INTERRUPT_TOOL, BudgetCaps, ReservationBook
from govmesh.forecasting.messages import (
    BudgetInterrupt,
    BudgetQuery,
    BudgetReport,
    InterruptAck,
    Usage,
    WorkflowBurn,
)
from govmesh.governance._approvals import ApprovalStore
from govmesh.governance.messages import ApprovalRequest
from govmesh.identity import Identity
from govmesh.service import Service, being_cancelled

__all__ = ["BudgetService"]

log = logging.getLogger(__name__)

QUEUE = "budget"
_FIELDS: Final = ("calls", "input_tokens", "output_tokens", "cost_usd", "errors", "first", "last")


class BudgetService(Service):
    """Keeps spend per workflow, agent and tenant in Redis, so several budget actors agree.

    Per workflow it keeps calls, tokens, cost, unusable answers (each a reflection) and the
    first and last call's time, so burn (tokens per minute) is known while it runs.

    Args:
        deployment: where the services are and whom to trust.
        identity: this actor's identity.
        prices: price per model; every model in use must have one.
        caps: the caps agents reserve against; says how long an interrupt waits for a
            person (`BudgetCaps.interrupt_expiry_s`).
        sweep_interval_s: how often to settle reservations that lapsed.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        prices: dict[str, Price],
        caps: BudgetCaps | None = None,
        sweep_interval_s: float = 1.0,
    ) -> None:
        super().__init__(deployment, identity)
        self.prices = PriceTable(prices)
        self.caps = caps or BudgetCaps()
        self._sweep_interval_s = sweep_interval_s
        self._sweep: asyncio.Task[None] | None = None
        self.lapsed = 0
        self.interrupts = 0

    async def on_start(self) -> None:
        """Subscribe to usage events and budget requests; start sweeping reservations."""
        self.book = ReservationBook(self.redis, self.deployment.key_prefix, self.caps)
        self.approvals = ApprovalStore(self.redis, self.deployment.key_prefix)
        await self.bus.subscribe(
            self.subjects.all("usage"), self._on_usage, accepts=Usage, queue=QUEUE
        )
        await self.bus.subscribe(
            self.subjects.ctl("budget"),
            self._on_request,
            accepts=BudgetQuery | BudgetInterrupt,
            queue=QUEUE,
        )
        self._sweep = asyncio.create_task(self._sweep_lapsed(), name="reservation-sweep")

    def stats(self) -> dict[str, Any]:
        """Counters, plus lapsed reservations settled and interrupts put to people."""
        return {**super().stats(), "lapsed": self.lapsed, "interrupts_put": self.interrupts}

    async def close(self) -> None:
        """Stop sweeping, then leave. Safe to call twice."""
        sweep, self._sweep = self._sweep, None
        if sweep is not None:
            sweep.cancel()
            await asyncio.gather(sweep, return_exceptions=True)
        await super().close()

    async def _sweep_lapsed(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                self.lapsed += await self.book.settle_lapsed()
            except (RedisError, OSError) as exc:
                if being_cancelled():
                    raise
                log.warning("reservation sweep postponed: %s", exc)

    async def _on_usage(self, d: Delivery) -> None:
        usage: Usage = d.body
        cost = self.prices.price(usage.model).cost(usage.input_tokens, usage.output_tokens)
        now = repr(time.time())
        async with self.redis.pipeline(transaction=True) as pipe:
            for key in (self.key("spend", "tenant"), self.key("spend", "wf", d.envelope.workflow)):
                pipe.hincrby(key, "calls", 1)
                pipe.hincrby(key, "input_tokens", usage.input_tokens)
                pipe.hincrby(key, "output_tokens", usage.output_tokens)
                pipe.hincrbyfloat(key, "cost_usd", cost)
                pipe.hincrby(key, "errors", int(usage.error))
                pipe.hsetnx(key, "first", now)
                pipe.hset(key, "last", now)
            await pipe.execute()

    async def _on_request(self, d: Delivery) -> None:
        match d.body:
            case BudgetQuery() as query:
                await self.bus.respond(d, await self._report(query))
            case BudgetInterrupt() as interrupt:
                await self.bus.respond(d, await self._interrupt(d, interrupt))

    async def _report(self, query: BudgetQuery) -> BudgetReport:
        keys = (
            [self.key("spend", "wf", w) for w in query.workflows]
            if query.workflows
            else [self.key("spend", "tenant")]
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, list(_FIELDS))
            rows = cast(list[list[bytes | None]], await pipe.execute())
        report = BudgetReport()
        burns = []
        for workflow, row in zip(query.workflows or ("",), rows, strict=False):
            calls, inp, out, usd, errors, first, last = (0 if v is None else v for v in row)
            report = BudgetReport(
                calls=report.calls + int(calls),
                input_tokens=report.input_tokens + int(inp),
                output_tokens=report.output_tokens + int(out),
                cost_usd=report.cost_usd + float(usd),
            )
            if query.detail and workflow:
                minutes = max(float(last) - float(first), 1.0) / 60
                burns.append(
                    WorkflowBurn(
                        workflow=workflow,
                        calls=int(calls),
                        reflections=int(errors),
                        tokens=int(inp) + int(out),
                        cost_usd=float(usd),
                        tokens_per_min=(int(inp) + int(out)) / minutes if calls else 0.0,
                    )
                )
        return msgspec.structs.replace(report, burn=tuple(burns))

    async def _interrupt(self, d: Delivery, interrupt: BudgetInterrupt) -> InterruptAck:
        """Put a workflow at its soft threshold to a person as a pending approval, once per
        workflow: asked again (the agent restarted), it answers with the same approval."""
        workflow = d.envelope.workflow
        marker = self.key("budget", "interrupt", workflow)
        now = time.time()
        expiry = self.caps.interrupt_expiry_s
        request = ApprovalRequest(
            approval_id=uuid.uuid4().hex,
            workflow=workflow,
            agent=d.claims.sub,
            tool=INTERRUPT_TOOL,
            args={"settled_usd": interrupt.settled_usd, "cap_usd": interrupt.cap_usd},
            intent_id=d.envelope.id,
            intent_hash="",
            reasons=(interrupt.reason,),
            escalation="budget_review",
            policy_hash="",
            requested_at=now,
            role=d.claims.role,
            expires_at=now + expiry if expiry else 0.0,
            on_expiry="deny",
            trace=d.envelope.trace,
        )
        if not await self.redis.set(marker, request.approval_id, nx=True):
            known = cast(bytes, await self.redis.get(marker)).decode()
            settled = await self.approvals.done(known)
            if settled is not None:
                return InterruptAck(approval_id=known, settled=True, outcome=settled.outcome)
            pending = await self.approvals.get(known)
            return InterruptAck(
                approval_id=known, expires_at=0.0 if pending is None else pending.expires_at
            )
        await self.approvals.add(request)
        self.interrupts += 1
        await self.bus.publish(
            self.subjects.approval(workflow),
            request,
            workflow=workflow,
            causation=d.envelope.id,
            trace=d.envelope.trace,
        )
        return InterruptAck(approval_id=request.approval_id, expires_at=request.expires_at)
