"""Actors that die come back: Ray restarts the process and the swarm puts it back on the bus.

(How an agent takes up its unfinished workflows after a restart, and wakes from a durable
timer after its agent and state actor restart, is in test_sdk.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgspec

from govmesh.agents.messages import Outcome, WorkflowStart
from govmesh.bus import Bus, Delivery, ensure_event_stream
from govmesh.governance._starts import record_start
from govmesh.scenarios import Swarm, scenario_app

from _deploy import deployment
from procurement.agents import Purchase

ROOT = Path(__file__).parent.parent


async def _coordinator(dep, issuer) -> tuple[Bus, asyncio.Queue[tuple[str, Outcome]]]:
    """A bus member the outcomes are sent to, and the queue of (workflow, outcome)."""
    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    # The audit actor reads the event stream; only a coordinator may create it.
    await ensure_event_stream(coordinator.nc, dep.tenant)
    outcomes: asyncio.Queue[tuple[str, Outcome]] = asyncio.Queue()

    async def on_outcome(d: Delivery) -> None:
        await outcomes.put((d.envelope.workflow, d.body))

    await coordinator.subscribe(
        coordinator.subjects.msg("coordinator-1"), on_outcome, accepts=Outcome
    )
    await coordinator.flush()
    return coordinator, outcomes


async def test_a_killed_agent_actor_is_restarted_and_serves_the_next_workflow(
    secure_nats, redis_server, prefix, ray_session
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    app = scenario_app(ROOT / "scenarios" / "procurement.yaml")
    swarm = Swarm(app, dep, issuer, seed=1, transport=transport)
    coordinator, outcomes = await _coordinator(dep, issuer)
    agent = "procurement-1"
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
            WorkflowStart(
                kind="Purchase",
                body=msgspec.msgpack.encode(
                    Purchase(item="monitors", vendor="Vendor_A", amount_usd=1200.0)
                ),
            ),
            workflow="wf-after-restart",
        )
        _, outcome = await asyncio.wait_for(outcomes.get(), 60)
        assert outcome.result == "completed", outcome
        assert swarm.restarts == {agent: 1}, "only the killed actor restarted"
    finally:
        await coordinator.close()
        await swarm.close()
