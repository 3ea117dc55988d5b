"""Helpers that build a deployment on the session's real servers, one tenant per test."""

from __future__ import annotations

import asyncio
from typing import Any

from govmesh.bus import Bus
from govmesh.config import Deployment
from govmesh.governance._starts import record_start
from govmesh.governance._terms import ToolTerms
from govmesh.identity import Identity, Issuer
from govmesh.roles import COORDINATOR_ROLE
from govmesh.runtime import Transport

ERP_TERMS = ToolTerms(
    name="erp.create_purchase_order", spend=("amount_usd",), show=("vendor", "amount_usd")
)
"""The purchase order tool's terms, as its ``@tool`` declares them: governance built with
them counts ``amount_usd`` as spend."""


class EnrollingIssuer(Issuer):
    """An issuer whose every new identity is also admitted to the mutual-TLS server, so a
    test's members connect exactly as a deployment's do."""

    def __init__(self, *, name: str, audience: str, transport: Transport, tenant: str) -> None:
        super().__init__(name=name, audience=audience)
        self.transport = transport
        self.tenant = tenant

    def identity(self, agent_id: str, role: str, **kwargs: Any) -> Identity:
        made = super().identity(agent_id, role, **kwargs)
        self.transport.enrol([made], tenant=self.tenant)
        return made


def deployment(
    nats_url: str, redis_url: str, tenant: str, transport: Transport | None = None
) -> tuple[Deployment, Issuer]:
    """A fresh issuer and a deployment of ``tenant`` that trusts it; with ``transport``,
    every identity the issuer makes is admitted to the mutual-TLS server."""
    name, audience = f"test:{tenant}", f"govmesh:{tenant}"
    issuer = (
        EnrollingIssuer(name=name, audience=audience, transport=transport, tenant=tenant)
        if transport is not None
        else Issuer(name=name, audience=audience)
    )
    dep = issuer.deployment(
        tenant=tenant, nats_url=nats_url, redis_url=redis_url, tls=transport is not None
    )
    return dep, issuer


class Coordinator:
    """Records workflow starts as a run's coordinator does (`record_start`), each workflow
    once, so that governance decides the intents a test sends.

    Args:
        bus: a member of role ``coordinator``.
        agents: the agents each workflow names.
    """

    def __init__(self, bus: Bus, agents: tuple[str, ...]) -> None:
        self.bus = bus
        self.agents = agents
        self._started: set[str] = set()

    @classmethod
    async def connect(cls, dep: Deployment, issuer: Issuer, agents: tuple[str, ...]) -> Coordinator:
        """A coordinator of its own on the deployment ``dep``."""
        bus = await Bus.connect(dep, issuer.identity("coordinator-1", COORDINATOR_ROLE))
        return cls(bus, agents)

    async def start(self, *workflows: str) -> None:
        """Record the start of each of ``workflows`` not started yet."""
        fresh = [w for w in dict.fromkeys(workflows) if w not in self._started]
        await asyncio.gather(*(record_start(self.bus, w, self.agents) for w in fresh))
        self._started.update(fresh)

    async def close(self) -> None:
        """Leave the bus."""
        await self.bus.close()
