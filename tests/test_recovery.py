"""Actors that die come back: Ray restarts the process and the swarm puts it back on the bus."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from govmesh.agents.messages import InFlight, PurchaseOutcome, PurchaseRequest
from govmesh.bus import Bus, Delivery
from govmesh.scenarios._schema import load_scenario
from govmesh.scenarios._swarm import Swarm
from govmesh.state.messages import Snapshot

from _deploy import deployment

ROOT = Path(__file__).parent.parent


async def test_a_killed_agent_actor_is_restarted_and_serves_the_next_workflow(
    secure_nats, redis_server, prefix, ray_session
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    scenario = load_scenario(ROOT / "scenarios" / "procurement.yaml")
    swarm = Swarm(scenario, dep, issuer, seed=1)
    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    outcomes: asyncio.Queue[PurchaseOutcome] = asyncio.Queue()

    async def on_outcome(d: Delivery) -> None:
        await outcomes.put(d.body)

    await coordinator.subscribe(
        coordinator.subjects.msg("coordinator-1"), on_outcome, accepts=PurchaseOutcome
    )
    await coordinator.flush()
    agent = scenario.agents.procurement.id
    try:
        await swarm.start()
        before = (await swarm.pids())[agent]
        os.kill(before, signal.SIGKILL)

        deadline = time.monotonic() + 60
        while swarm.restarts.get(agent, 0) == 0:
            assert time.monotonic() < deadline, "the agent actor never came back"
            await asyncio.sleep(0.1)
        after = (await swarm.pids())[agent]
        assert after != before

        await coordinator.publish(
            coordinator.subjects.msg(agent),
            PurchaseRequest(item="monitors", vendor="Vendor_A", amount_usd=1200.0),
            workflow="wf-after-restart",
        )
        outcome = await asyncio.wait_for(outcomes.get(), 60)
        assert outcome.result == "executed", outcome
        assert swarm.restarts == {agent: 1}, "only the killed actor restarted"
    finally:
        await coordinator.close()
        await swarm.close()


async def test_a_restarted_agent_takes_up_its_unfinished_workflows(
    secure_nats, redis_server, prefix, tmp_path
) -> None:
    import msgspec
    import redis.asyncio as aioredis

    from govmesh.agents import ProcurementAgent
    from govmesh.governance._actor import GovernanceService
    from govmesh.llm import SimulatedModel
    from govmesh.state import StateService
    from govmesh.tools import ERP_CREATE_PO, GatewayService, SimulatedErp

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    scenario = load_scenario(ROOT / "scenarios" / "procurement.yaml")
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies" / "procurement-agent-v2.yaml").read_text())
    services = [
        GovernanceService(
            dep, issuer.identity("governance-1", "governance"), policy_paths=[str(policy)]
        ),
        GatewayService(dep, issuer.identity("gateway-1", "gateway")),
        StateService(dep, issuer.identity("state-1", "state")),
    ]
    identity = issuer.identity(
        "procurement-1", "Procurement-Agent-v2", capabilities=(ERP_CREATE_PO,), budget_usd=25_000
    )

    def agent(latency_ms: float) -> ProcurementAgent:
        settings = msgspec.structs.replace(
            scenario.model, latency_ms=latency_ms, error_probability=0.0
        )
        return ProcurementAgent(dep, identity, model=SimulatedModel(settings, seed=1))

    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    outcomes: asyncio.Queue[tuple[str, PurchaseOutcome]] = asyncio.Queue()

    async def on_outcome(d: Delivery) -> None:
        await outcomes.put((d.envelope.workflow, d.body))

    await coordinator.subscribe(
        coordinator.subjects.msg("coordinator-1"), on_outcome, accepts=PurchaseOutcome
    )
    await coordinator.flush()
    redis = aioredis.Redis.from_url(redis_server.url)
    in_flight = f"{dep.key_prefix}:in-flight:procurement-1"
    first = agent(latency_ms=60_000)  # still planning when it dies
    second = agent(latency_ms=1)
    try:
        for service in (*services, first):
            await service.start()
        await coordinator.publish(
            coordinator.subjects.msg("procurement-1"),
            PurchaseRequest(item="monitors", vendor="Vendor_A", amount_usd=1500.0),
            workflow="wf-planning",
        )
        deadline = time.monotonic() + 20
        while not await redis.hexists(in_flight, "wf-planning"):
            assert time.monotonic() < deadline, "the request was never taken on"
            await asyncio.sleep(0.02)
        # A second workflow that had already asked governance when the agent died.
        await redis.hset(
            in_flight,
            "wf-decided",
            msgspec.msgpack.encode(
                InFlight(
                    request=PurchaseRequest(item="chairs", vendor="Vendor_A", amount_usd=900.0),
                    requester="coordinator-1",
                    causation="c-1",
                )
            ),
        )
        await first.bus.publish(
            first.subjects.state("procurement-1"),
            Snapshot(workflow="wf-decided", version=2, goal={"phase": "decided"}),
            workflow="wf-decided",
        )
        await asyncio.sleep(0.3)
        await first.close()  # dies mid-plan; the request stays in flight

        await second.start()
        got = dict([await asyncio.wait_for(outcomes.get(), 30) for _ in range(2)])
        assert got["wf-planning"].result == "executed", got
        # Past planning: the plan is not made again (its reflection count is in the
        # snapshot), governance and the gateway are asked and answer.
        assert got["wf-decided"].result == "executed", got
        assert got["wf-decided"].model_calls == 1
        assert second.resumed == {"planning": 1, "decided": 1}
        assert await redis.hlen(in_flight) == 0

        # The requester asks again (its answer was lost, say): the kept outcome answers.
        await coordinator.publish(
            coordinator.subjects.msg("procurement-1"),
            PurchaseRequest(item="monitors", vendor="Vendor_A", amount_usd=1500.0),
            workflow="wf-planning",
        )
        again = await asyncio.wait_for(outcomes.get(), 30)
        assert again == ("wf-planning", got["wf-planning"])
        assert second.answered_again == 1
        orders = await SimulatedErp(redis, prefix=dep.key_prefix).orders()
        assert sorted(o.workflow for o in orders) == ["wf-decided", "wf-planning"]
    finally:
        await redis.aclose()
        await coordinator.close()
        for service in (second, first, *services):
            await service.close()
