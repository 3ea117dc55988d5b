"""Identity: signing keys, Agent-ID tokens and replay protection."""

from govmesh.identity._keys import SigningKey, VerifyKey
from govmesh.identity._replay import NonceCache
from govmesh.identity._tokens import (
    DEFAULT_TOKEN_TTL_S,
    Claims,
    Identity,
    Issuer,
    TokenVerifier,
)

__all__ = [
    "DEFAULT_TOKEN_TTL_S",
    "Claims",
    "Identity",
    "Issuer",
    "NonceCache",
    "SigningKey",
    "TokenVerifier",
    "VerifyKey",
]
