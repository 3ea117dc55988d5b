"""Actors that die come back: Ray restarts the process and the swarm puts it back on the bus."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from govmesh.agents.messages import PurchaseOutcome, PurchaseRequest
from govmesh.bus import Bus, Delivery
from govmesh.scenarios._schema import load_scenario
from govmesh.scenarios._swarm import Swarm

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
