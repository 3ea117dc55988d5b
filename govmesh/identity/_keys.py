"""Ed25519 signing keys for agents, operators and platform actors."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["SigningKey", "VerifyKey"]


class VerifyKey:
    """An Ed25519 public key that checks signatures."""

    __slots__ = ("_key", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        self.raw = raw
        self._key = Ed25519PublicKey.from_public_bytes(raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Return whether ``signature`` is this key's signature over ``data``."""
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """An Ed25519 private key. Picklable as its 32 raw bytes so Ray can ship it to an actor."""

    __slots__ = ("_key", "public")

    def __init__(self, raw: bytes | None = None) -> None:
        self._key = (
            Ed25519PrivateKey.from_private_bytes(raw)
            if raw is not None
            else Ed25519PrivateKey.generate()
        )
        self.public = VerifyKey(self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    @property
    def raw(self) -> bytes:
        """The 32-byte private seed."""
        return self._key.private_bytes_raw()

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The underlying ``cryptography`` key, for JWT signing."""
        return self._key

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``; returns the 64-byte signature."""
        return self._key.sign(data)

    def __reduce__(self) -> tuple[type[SigningKey], tuple[bytes]]:
        return (SigningKey, (self.raw,))
