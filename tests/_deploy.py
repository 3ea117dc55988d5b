"""Helpers that build a deployment on the session's real servers, one tenant per test."""

from __future__ import annotations

from govmesh.config import Deployment
from govmesh.identity import Issuer


def deployment(nats_url: str, redis_url: str, tenant: str) -> tuple[Deployment, Issuer]:
    """A fresh issuer and a deployment of ``tenant`` that trusts it."""
    issuer = Issuer(name=f"test:{tenant}", audience=f"govmesh:{tenant}")
    dep = Deployment(
        tenant=tenant,
        nats_url=nats_url,
        redis_url=redis_url,
        audience=issuer.audience,
        issuers=(issuer.public_key,),
    )
    return dep, issuer
