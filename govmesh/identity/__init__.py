"""Identity: signing keys, Agent-ID tokens, replay protection, and the deployment CA with
per-role NATS permissions (transport layer of mTLS-A)."""

from govmesh.identity._ca import (
    DEFAULT_CLIENT_TTL,
    ClientCert,
    DeploymentCA,
    load_client_cert,
    member_dn,
    renew_before,
    ssl_context,
)
from govmesh.identity._keys import SigningKey, VerifyKey
from govmesh.identity._permissions import PLATFORM_ROLES, Permissions, permissions_for
from govmesh.identity._replay import NonceCache
from govmesh.identity._tokens import (
    DEFAULT_TOKEN_TTL_S,
    Claims,
    Identity,
    Issuer,
    TokenVerifier,
)

__all__ = [
    "DEFAULT_CLIENT_TTL",
    "DEFAULT_TOKEN_TTL_S",
    "PLATFORM_ROLES",
    "Claims",
    "ClientCert",
    "DeploymentCA",
    "Identity",
    "Issuer",
    "NonceCache",
    "Permissions",
    "SigningKey",
    "TokenVerifier",
    "VerifyKey",
    "load_client_cert",
    "member_dn",
    "permissions_for",
    "renew_before",
    "ssl_context",
]
