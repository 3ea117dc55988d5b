"""The one codec at the bus edge: msgpack envelopes with typed, tagged bodies."""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

from govmesh.bus._envelope import Envelope, Sealed
from govmesh.errors import SecurityError
from govmesh.identity import Identity

__all__ = ["Codec", "kind_of"]

# msgspec raises DecodeError for bad structure but UnicodeDecodeError (a ValueError) for a
# string field with invalid UTF-8; both are garbage from the wire.
_BAD_INPUT = (msgspec.DecodeError, ValueError)


def kind_of(body: msgspec.Struct) -> str:
    """Return the tag of a tagged body Struct; bodies must be declared with ``tag=True``."""
    tag = type(body).__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"message bodies must be tagged Structs, got {type(body).__name__}")
    return tag


class Codec:
    """Encodes and seals outgoing messages, opens and decodes incoming ones.

    Decoders are built once per accepted body union and reused.
    """

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._sealed = msgspec.msgpack.Decoder(Sealed)
        self._envelope = msgspec.msgpack.Decoder(Envelope)
        self._bodies: dict[Any, msgspec.msgpack.Decoder[Any]] = {}

    def encode(self, value: Any) -> bytes:
        """Encode any msgspec-compatible value."""
        return self._encoder.encode(value)

    def seal(
        self,
        identity: Identity,
        *,
        subject: str,
        body: msgspec.Struct,
        workflow: str = "",
        causation: str = "",
        trace: str = "",
        now: float | None = None,
    ) -> tuple[Envelope, bytes]:
        """Build, sign and encode a message; returns the envelope and the wire bytes."""
        nonce = os.urandom(16)
        envelope = Envelope(
            # The id is the nonce in hex: both must be unique per message, and one random
            # draw serves both.
            id=nonce.hex(),
            kind=kind_of(body),
            sender=identity.agent_id,
            subject=subject,
            ts=time.time() if now is None else now,
            nonce=nonce,
            workflow=workflow,
            causation=causation,
            trace=trace,
            body=msgspec.Raw(self._encoder.encode(body)),
        )
        raw = self._encoder.encode(envelope)
        sealed = Sealed(raw, identity.token, identity.key.sign(raw))
        return envelope, self._encoder.encode(sealed)

    def open(self, data: bytes) -> Sealed:
        """Decode the wire form; garbage raises `SecurityError` ``malformed``."""
        try:
            return self._sealed.decode(data)
        except _BAD_INPUT as exc:
            raise SecurityError("malformed", f"not a sealed message: {exc}") from None

    def envelope(self, raw: bytes) -> Envelope:
        """Decode signed envelope bytes."""
        try:
            return self._envelope.decode(raw)
        except _BAD_INPUT as exc:
            raise SecurityError("malformed", f"bad envelope: {exc}") from None

    def body(self, envelope: Envelope, accepts: Any) -> Any:
        """Decode the body as one of the ``accepts`` types (a Struct or tagged union)."""
        decoder = self._bodies.get(accepts)
        if decoder is None:
            decoder = self._bodies[accepts] = msgspec.msgpack.Decoder(accepts)
        try:
            body = decoder.decode(envelope.body)
        except _BAD_INPUT as exc:
            raise SecurityError(
                "unexpected_kind", f"{envelope.kind!r} is not accepted here: {exc}"
            ) from None
        if kind_of(body) != envelope.kind:
            raise SecurityError("kind_mismatch", f"envelope says {envelope.kind!r}")
        return body
