"""Message bodies of token renewal."""

from __future__ import annotations

import msgspec

__all__ = ["TokenGrant", "TokenRenewal"]


class TokenRenewal(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A member asks for a fresh token; signed with its current token and key as proof."""

    reason: str = "half-life"


class TokenGrant(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The new token: same subject, role, capabilities, budget authority and key."""

    token: str
