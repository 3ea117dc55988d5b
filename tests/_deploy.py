"""Helpers that build a deployment on the session's real servers, one tenant per test."""

from __future__ import annotations

from typing import Any

from govmesh.config import Deployment
from govmesh.identity import Identity, Issuer
from govmesh.runtime import Transport


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
