"""The budget actor: counts token burn and cost from usage events in real time, puts a
workflow that reached its soft threshold to a person, and settles reservations that lapsed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any, cast

from redis.exceptions import RedisError

from govmesh.bus import Delivery
from govmesh.config import Deployment
from govmesh.forecasting._prices import Price, PriceTable
from govmesh.forecasting.messages import (
    BudgetInterrupt,
    BudgetQuery,
    BudgetReport,
    BurnScope,
    InterruptAck,
    RoleUsage,
    Usage,
    WorkflowBurn,
)
from govmesh.governance._approvals import ApprovalStore
from govmesh.governance.messages import ApprovalRequest
from govmesh.identity import Identity
from govmesh.reservations import INTERRUPT_TOOL, BudgetCaps, ReservationBook
from govmesh.service import Service, being_cancelled, raise_if_cancelled

__all__ = ["BudgetService", "workflow_spend_keys"]

log = logging.getLogger(__name__)

QUEUE = "budget"


def workflow_spend_keys(prefix: str, workflow: str) -> tuple[str, str]:
    """The budget's Redis keys of one workflow under the tenant's ``prefix``: its totals
    (hash: calls, tokens, ``cost_usd``, the same per role as ``<role>|...``) and each model
    call's cost (hash: the usage event's id -> USD, at the price the budget counted)."""
    return f"{prefix}:spend:wf:{workflow}", f"{prefix}:spend:call:{workflow}"


def _burn(name: str, row: dict[str, str], *, scope: BurnScope = "workflow") -> WorkflowBurn:
    """The burn of a workflow, an agent or the tenant from its spend hash (see
    `BudgetService._on_usage`)."""
    calls, tokens = int(row.get("calls", 0)), int(row.get("input_tokens", 0))
    tokens += int(row.get("output_tokens", 0))
    minutes = max(float(row.get("last", 0)) - float(row.get("first", 0)), 1.0) / 60
    roles = sorted({k.split("|", 1)[0] for k in row if "|" in k})
    return WorkflowBurn(
        workflow=name if scope == "workflow" else "",
        scope=scope,
        agent=name if scope == "agent" else "",
        calls=calls,
        input_tokens=int(row.get("input_tokens", 0)),
        output_tokens=int(row.get("output_tokens", 0)),
        reflections=int(row.get("errors", 0)),
        tokens=tokens,
        cost_usd=float(row.get("cost_usd", 0.0)),
        tokens_per_min=tokens / minutes if calls else 0.0,
        roles=tuple(
            RoleUsage(
                role=role,
                model=row.get(f"{role}|model", ""),
                calls=int(row.get(f"{role}|calls", 0)),
                errors=int(row.get(f"{role}|errors", 0)),
                input_tokens=int(row.get(f"{role}|input_tokens", 0)),
                output_tokens=int(row.get(f"{role}|output_tokens", 0)),
                cost_usd=float(row.get(f"{role}|cost_usd", 0.0)),
            )
            for role in roles
        ),
    )


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
            raise_if_cancelled()
            await asyncio.sleep(self._sweep_interval_s)
            try:
                self.lapsed += await self.book.settle_lapsed()
            except (RedisError, OSError) as exc:
                if being_cancelled():
                    raise
                log.warning("reservation sweep postponed: %s", exc)

    async def _on_usage(self, d: Delivery) -> None:
        usage: Usage = d.body
        cost = usage.cost(self.prices.price(usage.model))
        now = repr(time.time())
        role = d.claims.role
        workflow_key, calls_key = workflow_spend_keys(
            self.deployment.key_prefix, d.envelope.workflow
        )
        agent_key = self.key("spend", "agent", d.claims.sub)
        # Every token the provider charged counts, of whatever kind, as it reports them.
        prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
        completion = usage.output_tokens + usage.reasoning_tokens
        async with self.redis.pipeline(transaction=True) as pipe:
            for key, part in (
                (self.key("spend", "tenant"), ""),
                (agent_key, ""),
                (workflow_key, ""),
                # Per role too: the usage history that forecasts are calibrated on.
                (workflow_key, f"{role}|"),
            ):
                pipe.hincrby(key, f"{part}calls", 1)
                pipe.hincrby(key, f"{part}input_tokens", prompt)
                pipe.hincrby(key, f"{part}output_tokens", completion)
                pipe.hincrbyfloat(key, f"{part}cost_usd", cost)
                pipe.hincrby(key, f"{part}errors", int(usage.error))
            pipe.hset(workflow_key, f"{role}|model", usage.model)
            pipe.hset(calls_key, d.envelope.id, repr(cost))
            for key in (self.key("spend", "tenant"), agent_key, workflow_key):
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
        """Totals of the workflows asked for (of the tenant if none), and with ``detail``
        the burn of each of them, of each agent asked for, and of the tenant."""
        prefix = self.deployment.key_prefix
        scoped: list[tuple[BurnScope, str, str]] = [
            ("workflow", w, workflow_spend_keys(prefix, w)[0]) for w in query.workflows
        ] or [("tenant", "", self.key("spend", "tenant"))]
        extra: list[tuple[BurnScope, str, str]] = [
            ("agent", a, self.key("spend", "agent", a)) for a in query.agents
        ]
        if query.detail and query.workflows:
            extra.append(("tenant", "", self.key("spend", "tenant")))
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, _, key in (*scoped, *extra):
                pipe.hgetall(key)
            rows = cast(list[dict[bytes, bytes]], await pipe.execute())
        burns = [
            _burn(name, {k.decode(): v.decode() for k, v in raw.items()}, scope=scope)
            for (scope, name, _), raw in zip((*scoped, *extra), rows, strict=True)
        ]
        totals = burns[: len(scoped)]
        return BudgetReport(
            calls=sum(b.calls for b in totals),
            input_tokens=sum(b.input_tokens for b in totals),
            output_tokens=sum(b.output_tokens for b in totals),
            cost_usd=math.fsum(b.cost_usd for b in totals),
            burn=tuple(burns) if query.detail else tuple(b for b in burns[len(scoped) :]),
        )

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
