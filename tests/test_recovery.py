"""Actors that die come back: Ray restarts the process and the swarm puts it back on the bus."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from govmesh.agents.messages import InFlight, PurchaseOutcome, PurchaseRequest
from govmesh.bus import Bus, Delivery, ensure_event_stream
from govmesh.governance._starts import record_start
from govmesh.scenarios._schema import load_scenario
from govmesh.scenarios._swarm import Swarm
from govmesh.state.messages import Snapshot

from _deploy import deployment

ROOT = Path(__file__).parent.parent


def _platform(dep, issuer, tmp_path: Path) -> tuple[list, object]:
    """Governance on the seed policy and the gateway, not started yet, and the procurement
    agent's identity."""
    from govmesh.governance._actor import GovernanceService
    from govmesh.tools import GatewayService

    from procurement.tools import create_purchase_order

    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies" / "procurement-agent-v2.yaml").read_text())
    platform = [
        GovernanceService(
            dep, issuer.identity("governance-1", "governance"), policy_paths=[str(policy)]
        ),
        GatewayService(dep, issuer.identity("gateway-1", "gateway"), tools=[create_purchase_order]),
    ]
    identity = issuer.identity(
        "procurement-1",
        "Procurement-Agent-v2",
        capabilities=(create_purchase_order.name,),
        budget_usd=25_000,
    )
    return platform, identity


async def _buy(coordinator: Bus, workflow: str) -> None:
    await record_start(coordinator, workflow, ("procurement-1",))
    await coordinator.publish(
        coordinator.subjects.msg("procurement-1"),
        PurchaseRequest(item="monitors", vendor="Vendor_A", amount_usd=1500.0),
        workflow=workflow,
    )


async def _coordinator(dep, issuer) -> tuple[Bus, asyncio.Queue[tuple[str, PurchaseOutcome]]]:
    """A bus member the outcomes are sent to, and the queue of (workflow, outcome)."""
    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    # The audit actor reads the event stream; only a coordinator may create it.
    await ensure_event_stream(coordinator.nc, dep.tenant)
    outcomes: asyncio.Queue[tuple[str, PurchaseOutcome]] = asyncio.Queue()

    async def on_outcome(d: Delivery) -> None:
        await outcomes.put((d.envelope.workflow, d.body))

    await coordinator.subscribe(
        coordinator.subjects.msg("coordinator-1"), on_outcome, accepts=PurchaseOutcome
    )
    await coordinator.flush()
    return coordinator, outcomes


async def test_a_killed_agent_actor_is_restarted_and_serves_the_next_workflow(
    secure_nats, redis_server, prefix, ray_session
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    scenario = load_scenario(ROOT / "scenarios" / "procurement.yaml")
    swarm = Swarm(scenario, dep, issuer, seed=1, transport=transport)
    coordinator, outcomes = await _coordinator(dep, issuer)
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

        await record_start(coordinator, "wf-after-restart", swarm.agent_ids)
        await coordinator.publish(
            coordinator.subjects.msg(agent),
            PurchaseRequest(item="monitors", vendor="Vendor_A", amount_usd=1200.0),
            workflow="wf-after-restart",
        )
        _, outcome = await asyncio.wait_for(outcomes.get(), 60)
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
    from govmesh.llm import SimulatedModel
    from govmesh.state import StateService

    from procurement.tools import orders as placed_orders

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    scenario = load_scenario(ROOT / "scenarios" / "procurement.yaml")
    platform, identity = _platform(dep, issuer, tmp_path)
    services = [*platform, StateService(dep, issuer.identity("state-1", "state"))]

    def agent(latency_ms: float) -> ProcurementAgent:
        settings = msgspec.structs.replace(
            scenario.model, latency_ms=latency_ms, error_probability=0.0
        )
        return ProcurementAgent(dep, identity, model=SimulatedModel(settings, seed=1))

    coordinator, outcomes = await _coordinator(dep, issuer)
    redis = aioredis.Redis.from_url(redis_server.url)
    in_flight = f"{dep.key_prefix}:in-flight:procurement-1"
    first = agent(latency_ms=60_000)  # still planning when it dies
    second = agent(latency_ms=1)
    try:
        for service in (*services, first):
            await service.start()
        await _buy(coordinator, "wf-planning")
        deadline = time.monotonic() + 20
        while not await redis.hexists(in_flight, "wf-planning"):
            assert time.monotonic() < deadline, "the request was never taken on"
            await asyncio.sleep(0.02)
        # A second workflow that had already asked governance when the agent died.
        await record_start(coordinator, "wf-decided", ("procurement-1",))
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
        await _buy(coordinator, "wf-planning")
        again = await asyncio.wait_for(outcomes.get(), 30)
        assert again == ("wf-planning", got["wf-planning"])
        assert second.answered_again == 1
        orders = await placed_orders(redis, dep.key_prefix)
        assert sorted(o.workflow for o in orders) == ["wf-decided", "wf-planning"]
    finally:
        await redis.aclose()
        await coordinator.close()
        for service in (second, first, *services):
            await service.close()


async def test_a_workflow_waiting_two_simulated_days_wakes_after_its_agent_and_state_restart(
    secure_nats, redis_server, prefix, tmp_path
) -> None:
    import msgspec
    import redis.asyncio as aioredis

    from govmesh.agents import ProcurementAgent
    from govmesh.config import Clock
    from govmesh.llm import SimulatedModel
    from govmesh.state import StateService
    from govmesh.state.messages import SnapshotQuery, SnapshotReply

    from procurement.tools import orders as placed_orders

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    two_days = 2 * 86_400.0
    # Two simulated days take four real seconds.
    dep = msgspec.structs.replace(dep, clock=Clock(origin=time.time(), speed=two_days / 4))
    scenario = load_scenario(ROOT / "scenarios" / "procurement.yaml")
    platform, identity = _platform(dep, issuer, tmp_path)
    model = SimulatedModel(
        msgspec.structs.replace(scenario.model, error_probability=0.0, latency_ms=1), seed=1
    )

    def agent() -> ProcurementAgent:
        return ProcurementAgent(dep, identity, model=model, vendor_wait_s=two_days)

    def state(n: int) -> StateService:
        return StateService(dep, issuer.identity(f"state-{n}", "state"))

    coordinator, outcomes = await _coordinator(dep, issuer)

    async def latest() -> SnapshotReply:
        # Only the agent itself may read its snapshots.
        reply = await first.bus.request(
            first.subjects.ctl("state"),
            SnapshotQuery(workflow="wf-wait", agent="procurement-1"),
            accepts=SnapshotReply,
        )
        return reply.body

    redis = aioredis.Redis.from_url(redis_server.url)
    first, second, state_1, state_2 = agent(), agent(), state(1), state(2)
    try:
        for service in (*platform, state_1, first):
            await service.start()
        await _buy(coordinator, "wf-wait")
        deadline = time.monotonic() + 20
        while True:
            reply = await latest()
            if reply.snapshot is not None and reply.snapshot.goal["phase"] == "waiting_for_vendor":
                break
            assert time.monotonic() < deadline, "the workflow never started waiting"
            await asyncio.sleep(0.05)
        due = reply.snapshot.goal["reply_due"]
        assert due - dep.clock.now() > two_days - 3_600  # set for two days from now

        # The agent and the state actor go away mid-wait; new ones take over.
        await first.close()
        await state_1.close()
        await state_2.start()
        await second.start()

        _, outcome = await asyncio.wait_for(outcomes.get(), 30)
        assert outcome.result == "executed", outcome
        assert dep.clock.now() >= due  # it did not go on before the two days were over
        assert second.resumed == {"waiting_for_vendor": 1}
        assert second.timers == {"fired": 1, "missed": 0}  # woken by the timer itself
        orders = await placed_orders(redis, dep.key_prefix)
        assert [o.workflow for o in orders] == ["wf-wait"]
    finally:
        await redis.aclose()
        await coordinator.close()
        for service in (second, first, state_2, state_1, *platform):
            await service.close()
