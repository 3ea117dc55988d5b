"""Message bodies of token renewal."""

from __future__ import annotations

import msgspec

__all__ = ["TokenGrant", "TokenRenewal"]


class TokenRenewal(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A member asks for a fresh token; signed with its current token and key as proof.

    Attributes:
        cert_pem: the member's current client certificate, when it is due for renewal too.
    """

    reason: str = "half-life"
    cert_pem: bytes = b""


class TokenGrant(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The new token (same subject, role, capabilities, budget authority and key) and, when
    asked, the renewed client certificate (same subject and key, new validity)."""

    token: str
    cert_pem: bytes = b""
