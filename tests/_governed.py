"""Two governance actors in one queue group on the session's real servers, with an agent, an
operator and a coordinator: shared by the governance tests and the attacks on governance."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from govmesh.bus import Bus, Delivery
from govmesh.config import Deployment
from govmesh.governance._actor import GovernanceService
from govmesh.governance.messages import Decision
from govmesh.identity import Issuer

from _deploy import ERP_TERMS, Coordinator, deployment
from procurement.tools import create_purchase_order

ERP_CREATE_PO = create_purchase_order.name

ROOT = Path(__file__).parent.parent
SEED = (ROOT / "policies" / "procurement-agent-v2.yaml").read_text()
ROLE = "Procurement-Agent-v2"
AUTHORITY = 10_000_000.0
"""The agent's budget authority a day: more than any test spends."""


@dataclass
class Governed:
    """Two governance actors in one queue group, an agent that sees every decision, an
    operator's bus, a coordinator, and the deployment with its issuer."""

    agent: Bus
    decisions: asyncio.Queue[Decision]
    actors: list[GovernanceService]
    operator: Bus
    coordinator: Coordinator
    dep: Deployment
    issuer: Issuer


@contextlib.asynccontextmanager
async def two_governance_actors(
    tmp_path, secure_nats, redis_server, prefix, policy_text, *, budget_usd: float = AUTHORITY
) -> AsyncIterator[Governed]:
    """Two governance actors in one queue group, an agent with budget authority
    ``budget_usd`` that sees every decision, an operator and a coordinator."""
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    actors = [
        GovernanceService(
            dep,
            issuer.identity(f"governance-{i}", "governance"),
            policy_paths=[str(policy)],
            tools=[ERP_TERMS],
        )
        for i in (1, 2)
    ]
    for actor in actors:
        await actor.start()
    agent = await Bus.connect(
        dep, issuer.identity("proc-1", ROLE, capabilities=(ERP_CREATE_PO,), budget_usd=budget_usd)
    )
    decisions: asyncio.Queue[Decision] = asyncio.Queue()

    async def on_decision(d: Delivery) -> None:
        await decisions.put(d.body)

    operator = await Bus.connect(dep, issuer.identity("operator-1", "operator"))
    coordinator = await Coordinator.connect(dep, issuer, ("proc-1",))
    try:
        await agent.subscribe(
            agent.subjects.decisions(agent.identity.agent_id), on_decision, accepts=Decision
        )
        await agent.flush()
        yield Governed(
            agent=agent,
            decisions=decisions,
            actors=actors,
            operator=operator,
            coordinator=coordinator,
            dep=dep,
            issuer=issuer,
        )
    finally:
        await coordinator.close()
        await operator.close()
        await agent.close()
        for actor in actors:
            await actor.close()
