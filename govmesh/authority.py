"""The token authority: renews members' Agent-ID tokens over the bus.

A bus member, so it sits above both the bus and identity (the bus depends on identity).
"""

from __future__ import annotations

import asyncio
import datetime as dt

from govmesh.bus import Bus, Delivery
from govmesh.config import Deployment
from govmesh.errors import ConfigError, SecurityError
from govmesh.identity._ca import DEFAULT_CLIENT_TTL, DeploymentCA
from govmesh.identity._tokens import DEFAULT_TOKEN_TTL_S, Issuer
from govmesh.identity.messages import TokenGrant, TokenRenewal
from govmesh.roles import ISSUER_ROLE

__all__ = ["TokenAuthority"]

QUEUE = "identity"


class TokenAuthority:
    """Answers `TokenRenewal` requests with a fresh token carrying the same claims.

    A renewal is itself a verified message, so only the holder of a valid token and its
    key can renew it; a revoked member is refused and reported.

    Args:
        deployment: where the bus is and whom to trust.
        issuer: signs the new tokens.
        ttl_s: lifetime of the tokens it grants.
        ca: the deployment CA, to renew members' client certificates as well.
        cert_ttl: lifetime of the certificates it renews.
    """

    def __init__(
        self,
        deployment: Deployment,
        issuer: Issuer,
        *,
        ttl_s: float = DEFAULT_TOKEN_TTL_S,
        ca: DeploymentCA | None = None,
        cert_ttl: dt.timedelta = DEFAULT_CLIENT_TTL,
    ) -> None:
        self.deployment = deployment
        self.issuer = issuer
        self.ttl_s = ttl_s
        self.ca = ca
        self.cert_ttl = cert_ttl
        self.renewed_certs = 0
        self.identity = issuer.identity(
            f"{ISSUER_ROLE}-{deployment.tenant}", ISSUER_ROLE, ttl_s=ttl_s
        )
        self.revoked: set[str] = set()
        self.granted = 0
        self._bus: Bus | None = None
        self._self_renewal: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Join the bus and serve renewals."""
        self._bus = await Bus.connect(self.deployment, self.identity, rotate=False)
        self._self_renewal = asyncio.create_task(self._renew_own_token(), name="authority-renew")
        await self._bus.subscribe(
            self._bus.subjects.ctl("identity"), self._on_renewal, accepts=TokenRenewal, queue=QUEUE
        )
        await self._bus.flush()

    async def _renew_own_token(self) -> None:
        """The authority holds the issuer, so it re-issues its own token at half-life."""
        assert self._bus is not None
        identity = self._bus.identity
        while True:
            await asyncio.sleep(self.ttl_s / 2)
            identity.token = self.issuer.issue(
                sub=identity.agent_id, role=ISSUER_ROLE, key=identity.key.public, ttl_s=self.ttl_s
            )

    async def _on_renewal(self, d: Delivery) -> None:
        assert self._bus is not None
        c = d.claims
        if c.sub in self.revoked:
            self._bus.report(
                SecurityError("revoked", f"{c.sub!r} asked to renew a revoked identity"),
                subject=d.envelope.subject,
                data=d.data,
            )
            return
        token = self.issuer.issue(
            sub=c.sub,
            role=c.role,
            key=c.key,
            capabilities=c.capabilities,
            budget_usd=c.budget_usd,
            ttl_s=self.ttl_s,
        )
        cert_pem = b""
        asked: TokenRenewal = d.body
        if asked.cert_pem and self.ca is not None:
            try:
                cert_pem = self.ca.renew_client_cert(
                    asked.cert_pem, member_id=c.sub, ttl=self.cert_ttl
                )
                self.renewed_certs += 1
            except ConfigError as exc:
                self._bus.report(
                    SecurityError("bad_certificate_renewal", str(exc)),
                    subject=d.envelope.subject,
                    data=d.data,
                )
        self.granted += 1
        await self._bus.respond(d, TokenGrant(token=token, cert_pem=cert_pem))

    async def close(self) -> None:
        """Stop renewing and leave the bus. Safe to call twice."""
        if self._self_renewal is not None:
            self._self_renewal.cancel()
            await asyncio.gather(self._self_renewal, return_exceptions=True)
            self._self_renewal = None
        if self._bus is not None:
            await self._bus.close()
