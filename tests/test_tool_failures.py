"""A failing tool answers its agent at once: the procurement agent retries only what the
tool says may be retried, and the step still takes effect once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from govmesh import ToolError
from govmesh.agents import ProcurementAgent, RetryPolicy
from govmesh.agents.messages import PurchaseOutcome, PurchaseRequest
from govmesh.bus import Bus, Delivery
from govmesh.errors import ConfigError
from govmesh.governance._actor import GovernanceService
from govmesh.governance._starts import record_start
from govmesh.llm import SimulatedModel
from govmesh.scenarios._schema import load_scenario
from govmesh.tools import GatewayService, ToolContext, tool

from _deploy import deployment
from procurement.tools import Order, Placed, create_purchase_order, orders

ROOT = Path(__file__).parent.parent
POLICY = str(ROOT / "policies" / "procurement-agent-v2.yaml")
ROLE = "Procurement-Agent-v2"
AGENT = "procurement-1"
HANG_GUARD_S = 120.0
"""Far above the few seconds a failure takes to reach the agent; only stops a hung test."""
ERP_CREATE_PO = create_purchase_order.name


class Deployed:
    """Governance, a gateway whose ERP fails as a test says, a procurement agent and a
    coordinator that starts purchases and hears how they ended."""

    def __init__(self, dep: Any, issuer: Any, failures: list[Exception]) -> None:
        self.dep, self.issuer = dep, issuer
        self.failures = failures
        self.calls = 0
        self.outcomes: asyncio.Queue[PurchaseOutcome] = asyncio.Queue()

        @tool(name=ERP_CREATE_PO, idempotent=True, spend="amount_usd")
        async def failing(order: Order, ctx: ToolContext) -> Placed:
            """The ERP's order call, raising the next of `failures` while there is one."""
            self.calls += 1
            if self.failures:
                raise self.failures.pop(0)
            return await create_purchase_order(order, ctx)

        self.erp = failing

    async def start(self) -> None:
        model = SimulatedModel(load_scenario(ROOT / "scenarios" / "procurement.yaml").model, seed=1)
        self.governance = GovernanceService(
            self.dep, self.issuer.identity("governance-1", "governance"), policy_paths=[POLICY]
        )
        self.gateway = GatewayService(
            self.dep, self.issuer.identity("gateway-1", "gateway"), tools=[self.erp]
        )
        self.agent = ProcurementAgent(
            self.dep,
            self.issuer.identity(AGENT, ROLE, capabilities=(ERP_CREATE_PO,), budget_usd=25_000),
            model=model,
            tool_retry=RetryPolicy(initial_s=0.01, maximum_attempts=3),
        )
        for service in (self.governance, self.gateway, self.agent):
            await service.start()
        self.coordinator = await Bus.connect(
            self.dep, self.issuer.identity("coordinator-1", "coordinator")
        )

        async def on_outcome(d: Delivery) -> None:
            await self.outcomes.put(d.body)

        await self.coordinator.subscribe(
            self.coordinator.subjects.msg("coordinator-1"), on_outcome, accepts=PurchaseOutcome
        )
        await self.coordinator.flush()

    async def orders(self) -> list[Any]:
        """Every order the ERP placed."""
        return await orders(self.gateway.redis, self.dep.key_prefix)

    async def close(self) -> None:
        await self.coordinator.close()
        for service in (self.agent, self.gateway, self.governance):
            await service.close()

    async def buy(self, workflow: str) -> PurchaseOutcome:
        await record_start(self.coordinator, workflow, (AGENT,))
        await self.coordinator.publish(
            self.coordinator.subjects.msg(AGENT),
            PurchaseRequest(item="monitors", vendor="Vendor_A", amount_usd=1_200.0),
            workflow=workflow,
        )
        return await asyncio.wait_for(self.outcomes.get(), HANG_GUARD_S)


@pytest.fixture
async def deploy(
    secure_nats, redis_server, prefix
) -> AsyncIterator[Callable[..., Awaitable[Deployed]]]:
    transport, server = secure_nats
    started: list[Deployed] = []

    async def build(*failures: Exception) -> Deployed:
        dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
        d = Deployed(dep, issuer, list(failures))
        await d.start()
        started.append(d)
        return d

    yield build
    for d in started:
        await d.close()


async def test_a_tool_raising_runtime_error_is_reported_to_its_agent_as_failed(deploy) -> None:
    d = await deploy(RuntimeError("the ERP's disk is full"))

    outcome = await d.buy("wf-1")

    error = f"{ERP_CREATE_PO}: RuntimeError: the ERP's disk is full"
    assert (outcome.result, outcome.reasons, outcome.first_decision) == (
        "failed",
        (error,),
        "allow",
    )
    assert d.calls == 1
    entries = [e async for e in d.gateway.redis.scan_iter(f"{d.dep.key_prefix}:idem:wf-1:*")]
    assert len(entries) == 1
    found = await d.gateway.ledger.entry(entries[0].decode())
    assert found is not None and found.state == "done" and found.result is not None
    assert (found.result.ok, found.result.error) == (False, error)
    # The run report shows the gateway's counters: a failed tool call, nothing run.
    stats = d.gateway.stats()
    assert (stats["failed"], stats["ran"]) == ({ERP_CREATE_PO: 1}, {})
    assert await d.orders() == []


async def test_a_retryable_tool_error_is_retried_and_the_order_placed_once(deploy) -> None:
    d = await deploy(ToolError("the ERP is busy", retryable=True))

    outcome = await d.buy("wf-2")

    assert outcome.result == "executed", outcome.reasons
    assert d.calls == 2
    assert [o.po_id for o in await d.orders()] == [outcome.order_id]
    assert (d.gateway.failed, d.gateway.ran) == ({ERP_CREATE_PO: 1}, {ERP_CREATE_PO: 1})
    # Retried under the decision it had: governance decided once, and nothing was refused.
    assert d.governance.decided == {"allow": 1}
    assert d.gateway.bus.rejected == {}


async def test_a_tool_error_that_is_not_retryable_is_not_retried(deploy) -> None:
    d = await deploy(ToolError("Vendor_A is blocked in the ERP"))

    outcome = await d.buy("wf-3")

    assert (outcome.result, outcome.reasons) == (
        "failed",
        (f"{ERP_CREATE_PO}: Vendor_A is blocked in the ERP",),
    )
    assert d.calls == 1
    assert await d.orders() == []


async def test_a_tool_that_keeps_failing_retryably_is_retried_a_bounded_number_of_times(
    deploy,
) -> None:
    d = await deploy(*(ToolError(f"busy {n}", retryable=True) for n in range(10)))

    outcome = await d.buy("wf-4")

    assert (outcome.result, outcome.reasons) == ("failed", (f"{ERP_CREATE_PO}: busy 2",))
    assert d.calls == 3
    assert await d.orders() == []


def test_a_retry_policy_names_the_figure_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"maximum_attempts .* got 0"):
        RetryPolicy(maximum_attempts=0)
    with pytest.raises(ConfigError, match=r"backoff .* got 0.5"):
        RetryPolicy(backoff=0.5)
    assert [RetryPolicy(initial_s=1, maximum_s=5).delay(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
