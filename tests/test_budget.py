"""Model-spend reservations on a real Redis-protocol server: caps that no interleaving of
concurrent calls can pass, a soft threshold that stops a workflow for a person, and
reservations that lapse settled high, never low."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis

from govmesh.reservations import (
    BudgetCaps,
    Granted,
    Refused,
    ReservationBook,
    micro_usd,
)


@pytest.fixture
async def redis(redis_server):
    # As in the services: a burst waits for one of 32 connections.
    pool = aioredis.BlockingConnectionPool.from_url(redis_server.url, max_connections=32)
    client = aioredis.Redis(connection_pool=pool)
    yield client
    await client.aclose()


async def test_a_thousand_concurrent_reservations_never_pass_the_cap(redis, prefix) -> None:
    book = ReservationBook(redis, prefix, BudgetCaps(workflow_usd=1.0, soft_threshold=None))
    max_cost = 0.005
    rng = random.Random(7)
    actuals = [round(rng.uniform(0.001, max_cost), 6) for _ in range(1000)]

    async def call(actual: float) -> int | None:
        granted = await book.reserve("wf-1", "agent-1", max_cost)
        if isinstance(granted, Refused):
            assert granted.kind == "hard" and granted.scope == "workflow"
            return None
        await asyncio.sleep(rng.random() / 1000)  # the model call; others interleave
        assert await book.settle(granted, actual)
        return micro_usd(actual)

    results = await asyncio.gather(*(call(a) for a in actuals))

    granted = [r for r in results if r is not None]
    refused = results.count(None)
    settled, reserved = await book.spent("wf-1")
    assert settled <= 1.0 and reserved == 0
    assert micro_usd(settled) == sum(granted)  # every granted call settled, exactly once
    assert len(granted) + refused == 1000
    # At least a cap's worth of maximum-cost calls got through, and the rest were refused.
    assert len(granted) >= 1.0 / max_cost and refused > 0


async def test_the_soft_threshold_stops_the_workflow_until_released(redis, prefix) -> None:
    book = ReservationBook(redis, prefix, BudgetCaps(workflow_usd=1.0, soft_threshold=0.8))
    first = await book.reserve("wf-soft", "agent-1", 0.5)
    assert isinstance(first, Granted)
    await book.settle(first, 0.5)

    stopped = await book.reserve("wf-soft", "agent-1", 0.35)
    assert isinstance(stopped, Refused) and stopped.kind == "soft"
    assert (stopped.settled_usd, stopped.reserved_usd, stopped.cap_usd) == (0.5, 0.0, 1.0)
    assert "soft threshold" in stopped.reason()

    await book.release("wf-soft")
    allowed = await book.reserve("wf-soft", "agent-1", 0.35)
    assert isinstance(allowed, Granted)
    await book.settle(allowed, 0.35)
    halted = await book.reserve("wf-soft", "agent-1", 0.2)
    assert isinstance(halted, Refused) and halted.kind == "hard"
    assert await book.spent("wf-soft") == (0.85, 0.0)


async def test_an_agents_daily_cap_holds_across_its_workflows(redis, prefix) -> None:
    book = ReservationBook(redis, prefix, BudgetCaps(agent_daily_usd=0.3, soft_threshold=None))
    for workflow in ("wf-a", "wf-b"):
        granted = await book.reserve(workflow, "agent-1", 0.1)
        assert isinstance(granted, Granted)
        await book.settle(granted, 0.1)
    refused = await book.reserve("wf-c", "agent-1", 0.15)
    assert isinstance(refused, Refused) and refused.scope == "agent"
    assert isinstance(await book.reserve("wf-c", "agent-2", 0.15), Granted)


async def test_a_lapsed_reservation_is_settled_at_its_full_amount_once(redis, prefix) -> None:
    book = ReservationBook(
        redis, prefix, BudgetCaps(workflow_usd=1.0, soft_threshold=None, reservation_ttl_s=1.0)
    )
    granted = await book.reserve("wf-lapse", "agent-1", 0.25, now=1_000.0)
    assert isinstance(granted, Granted)

    assert await book.settle_lapsed(now=1_002.0) == 1  # the agent died mid-call
    assert await book.spent("wf-lapse") == (0.25, 0.0)
    assert not await book.settle(granted, 0.1)  # its late settlement changes nothing
    assert await book.spent("wf-lapse") == (0.25, 0.0)


async def _runaway(
    secure_nats, redis_server, prefix, *, approve: float, workflows: int = 3, on_burn=None
):
    """The runaway scenario on Ray actors; returns the report and the spend of each
    workflow, read from the reservation keys."""
    from pathlib import Path

    import msgspec

    from govmesh.scenarios import load_scenario, run_workflows, scenario_app
    from govmesh.state import Keyring

    from _deploy import deployment

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    scenario = load_scenario(Path(__file__).parent.parent / "scenarios" / "runaway.yaml")
    # Every answer unusable: each workflow loops until the budget stops it.
    scenario = msgspec.structs.replace(
        scenario,
        model=msgspec.structs.replace(scenario.model, error_probability=1.0, latency_ms=80),
        approvals=msgspec.structs.replace(scenario.approvals, approve_probability=approve),
    )
    keyring = Keyring.generate("runaway")
    report = await run_workflows(
        scenario_app(scenario),
        dep,
        issuer,
        workflows=workflows,
        seed=3,
        timeout_s=240,
        transport=transport,
        keyring=keyring,
        on_burn=on_burn,
    )
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        book = ReservationBook(client, dep.key_prefix, scenario.budget)
        spent = {
            f"{report['run_id']}-{i:05d}": await book.spent(f"{report['run_id']}-{i:05d}")
            for i in range(workflows)
        }
    finally:
        await client.aclose()
    return report, spent, scenario.budget, dep, issuer, keyring


async def test_a_looping_model_is_put_to_a_person_then_halted_at_the_cap(
    secure_nats, redis_server, prefix, ray_session
) -> None:
    from govmesh.bus import Bus
    from govmesh.state import StateService
    from govmesh.state.messages import SnapshotQuery, SnapshotReply

    seen: list[list] = []
    report, spent, caps, dep, issuer, keyring = await _runaway(
        secure_nats, redis_server, prefix, approve=1.0, on_burn=seen.append
    )
    w, interrupts = report["workflows"], report["budget"]["interrupts"]
    assert w["finished"] == w["results"]["halted"] == w["total"] == 3, w
    # Each workflow reached its soft threshold once, was let go on, and kept under its cap.
    assert interrupts["asked"] == interrupts["released"] == 3, interrupts
    for settled, reserved in spent.values():
        assert (
            reserved == 0 and caps.soft_threshold * caps.workflow_usd < settled <= caps.workflow_usd
        )
    assert report["cost_usd"] <= 3 * caps.workflow_usd
    # The live view saw the burn of workflows in flight grow, costliest first.
    views = [view for view in seen if view]
    assert views, "no burn was reported while the workflows ran"
    assert all(v == sorted(v, key=lambda b: -b.cost_usd) for v in views)
    assert {b.workflow for v in views for b in v} <= set(spent)
    assert max(b.calls for v in views for b in v) > 1 and all(
        b.tokens_per_min > 0 for v in views for b in v if b.calls
    )
    # A halted workflow's state is saved, saying why (read through a state actor of the
    # run's keys: the run's own actors are gone).
    state = StateService(dep, issuer.identity("state-9", "state"), keyring=keyring)
    await state.start()
    try:
        phases = []
        for agent, role in (
            ("requester-1", "Requester"),
            ("procurement-1", "Procurement-Agent-v2"),
        ):
            # Only the agent itself may read its snapshots: ask as the agent.
            async with await Bus.connect(dep, issuer.identity(agent, role)) as bus:
                for workflow in spent:
                    reply = await bus.request(
                        bus.subjects.ctl("state"),
                        SnapshotQuery(workflow=workflow, agent=agent),
                        accepts=SnapshotReply,
                    )
                    answer: SnapshotReply = reply.body
                    if answer.snapshot is not None and answer.snapshot.goal["phase"] == "halted":
                        phases.append(answer.snapshot.goal["reason"])
    finally:
        await state.close()
    assert len(phases) == w["results"]["halted"]
    assert all("would pass its cap" in reason for reason in phases), phases


async def test_a_person_who_says_no_halts_the_workflow_at_the_soft_threshold(
    secure_nats, redis_server, prefix, ray_session
) -> None:
    report, spent, caps, *_ = await _runaway(secure_nats, redis_server, prefix, approve=0.0)
    w, interrupts = report["workflows"], report["budget"]["interrupts"]
    assert w["results"]["halted"] == w["total"] == 3, w
    assert interrupts["asked"] == interrupts["halted"] == 3, interrupts
    for settled, reserved in spent.values():
        assert reserved == 0 and settled <= caps.soft_threshold * caps.workflow_usd


async def test_the_budget_actor_keeps_burn_per_workflow_agent_and_tenant(
    secure_nats, redis_server, prefix
) -> None:
    from govmesh.bus import Bus
    from govmesh.forecasting import BudgetQuery, BudgetReport, BudgetService, Price, Usage

    from _deploy import deployment

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    price = Price(input_per_1k=1.0, output_per_1k=2.0)
    budget = BudgetService(dep, issuer.identity("budget-1", "budget"), prices={"m": price})
    await budget.start()
    agents = {
        name: await Bus.connect(dep, issuer.identity(name, role, capabilities=()))
        for name, role in (("a-1", "agent"), ("a-2", "agent"))
    }
    asker = await Bus.connect(dep, issuer.identity("asker-1", "coordinator"))
    try:
        calls = [("a-1", "wf-1", False), ("a-1", "wf-1", True), ("a-2", "wf-1", False)]
        calls += [("a-2", "wf-2", True)]
        for agent, workflow, error in calls:
            bus = agents[agent]
            await bus.publish(
                bus.subjects.usage(agent),
                Usage(model="m", input_tokens=1000, output_tokens=500, error=error),
                workflow=workflow,
            )
        want = BudgetQuery(workflows=("wf-1", "wf-2"), agents=("a-1", "a-2"), detail=True)
        for _ in range(200):  # usage events are asynchronous
            reply = await asker.request(asker.subjects.ctl("budget"), want, accepts=BudgetReport)
            report: BudgetReport = reply.body
            if report.calls == 4:
                break
            await asyncio.sleep(0.02)
    finally:
        for bus in (*agents.values(), asker):
            await bus.close()
        await budget.close()

    per_call = price.cost(1000, 500)
    assert report.calls == 4 and report.cost_usd == pytest.approx(4 * per_call)
    rows = {(b.scope, b.workflow or b.agent): b for b in report.burn}
    assert rows["workflow", "wf-1"].calls == 3 and rows["workflow", "wf-1"].reflections == 1
    assert rows["workflow", "wf-2"].reflections == 1
    assert rows["agent", "a-1"].cost_usd == pytest.approx(2 * per_call)
    assert rows["agent", "a-2"].calls == 2
    tenant = rows["tenant", ""]
    assert (tenant.calls, tenant.tokens) == (4, 4 * 1500)  # the test's own tenant
    assert all(b.tokens_per_min > 0 for b in report.burn)
    roles = {r.role: r for r in rows["workflow", "wf-1"].roles}
    assert roles["agent"].calls == 3 and roles["agent"].errors == 1
