"""Settings shared by every process of one deployment."""

from __future__ import annotations

import msgspec

__all__ = ["Deployment", "key_prefix"]


def key_prefix(tenant: str) -> str:
    """The Redis key prefix of ``tenant``; every key govmesh writes starts with it."""
    return f"gm:{tenant}"


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """Where a deployment's services are and whom its members trust.

    Passed to every actor so each can join the bus and verify its peers.

    Attributes:
        tenant: the tenant id; the second token of every subject.
        nats_url: the NATS server URL.
        redis_url: the Redis-protocol server URL.
        audience: the token audience every member accepts.
        issuers: raw Ed25519 public keys of the trusted token issuers.
        tls: the NATS server requires mutual TLS; members connect with a client certificate.
    """

    tenant: str
    nats_url: str
    redis_url: str
    audience: str
    issuers: tuple[bytes, ...]
    tls: bool = False

    @property
    def key_prefix(self) -> str:
        """The Redis key prefix for this tenant."""
        return key_prefix(self.tenant)
