"""The audit actor: keeps the tenant's audit index while a deployment runs."""

from __future__ import annotations

import time
from typing import Any

from govmesh.config import Deployment
from govmesh.identity import Identity
from govmesh.observability._audit import AuditConsumer, AuditIndex
from govmesh.observability._stored import StreamVerifier
from govmesh.service import Service

__all__ = ["AuditService"]


class AuditService(Service):
    """Consumes the tenant's event stream into the hash-chained audit index (see
    `AuditIndex`), verifying every message as the deployment's receivers do and keeping
    those it refuses apart as security events, and signs a checkpoint of the chain heads
    with its own key every ``checkpoint_every_s``. Its role (``auditor``) reads every event
    and changes nothing.

    The durable JetStream consumer outlives the actor: a restarted one goes on from the
    first event not yet stored, and an event stored twice is recognised by its id. A
    resumed run has a new token issuer; the index remembers the issuers it trusted before,
    and trusts them for the messages the stream stored before the current one came into
    force (those left to index when the run stopped), never for later ones.

    Args:
        deployment: where the services are and whom to trust.
        identity: this actor's identity (role ``auditor``); its key signs checkpoints.
        checkpoint_every_s: seconds between signed checkpoints.
    """

    def __init__(
        self, deployment: Deployment, identity: Identity, *, checkpoint_every_s: float = 10.0
    ) -> None:
        super().__init__(deployment, identity)
        self._checkpoint_every_s = checkpoint_every_s
        self._consumer: AuditConsumer | None = None

    async def on_start(self) -> None:
        """Start consuming the event stream."""
        dep = self.deployment
        self.index = AuditIndex(self.redis, prefix=dep.key_prefix)
        trusted = await self.index.trust(dep.issuers, now=time.time())
        verifier = StreamVerifier(
            issuers=dep.issuers,
            audience=dep.audience,
            retired=[k for k in trusted if k not in dep.issuers],
            since=min(trusted[k] for k in dep.issuers),
        )
        self._consumer = AuditConsumer(
            self.bus.nc,
            self.index,
            tenant=dep.tenant,
            verifier=verifier,
            checkpoint_key=self.identity.key,
            checkpoint_every_s=self._checkpoint_every_s,
            signer=self.identity.agent_id,
            replicas=dep.replicas,
        )
        await self._consumer.start()

    def stats(self) -> dict[str, Any]:
        """Counters, plus events stored, duplicates recognised, messages refused and
        checkpoints signed."""
        c = self._consumer
        return {
            **super().stats(),
            "stored": 0 if c is None else c.stored,
            "duplicates": 0 if c is None else c.duplicates,
            "refused": 0 if c is None else c.refused,
            "checkpoints": 0 if c is None else c.checkpoints,
        }

    async def close(self) -> None:
        """Stop consuming (the durable consumer stays), then leave. Safe to call twice."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.close()
        await super().close()
