"""Ed25519 signing keys for agents, operators and platform actors.

Per-message signing and verification use libsodium (PyNaCl), which verifies about twice as
fast as OpenSSL's Ed25519 here; token signing, once per token, uses ``cryptography``.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError

__all__ = ["SigningKey", "VerifyKey"]

_SIGNATURE_BYTES = 64


class VerifyKey:
    """An Ed25519 public key that checks signatures."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        self.raw = raw

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Return whether ``signature`` is this key's signature over ``data``."""
        if len(signature) != _SIGNATURE_BYTES:
            return False
        try:
            crypto_sign_open(signature + data, self.raw)
        except (BadSignatureError, ValueError):
            return False
        return True


class SigningKey:
    """An Ed25519 private key. Picklable as its 32-byte seed so Ray can ship it to an actor."""

    __slots__ = ("_secret", "public", "raw")

    def __init__(self, raw: bytes | None = None) -> None:
        seed = os.urandom(32) if raw is None else raw
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        public, self._secret = crypto_sign_seed_keypair(seed)
        self.raw = seed
        self.public = VerifyKey(public)

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The key as a ``cryptography`` object, for JWT signing."""
        return Ed25519PrivateKey.from_private_bytes(self.raw)

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``; returns the 64-byte signature."""
        return crypto_sign(data, self._secret)[:_SIGNATURE_BYTES]

    def __reduce__(self) -> tuple[type[SigningKey], tuple[bytes]]:
        return (SigningKey, (self.raw,))
