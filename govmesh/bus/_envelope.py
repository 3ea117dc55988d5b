"""The one envelope every govmesh message travels in, and its signed wire form."""

from __future__ import annotations

import msgspec

__all__ = ["Envelope", "Sealed", "SecurityEvent"]


class Envelope(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """Routing, identity and causality for one message; ``body`` holds the encoded typed body.

    Attributes:
        id: unique message id (hex).
        kind: the body's tag, e.g. ``"ToolIntent"``.
        sender: the agent id of the signer; must equal the token's ``sub``.
        subject: the NATS subject it was published on; receivers refuse any other.
        ts: send time, unix seconds.
        nonce: 16 random bytes; a second sighting inside the freshness window is a replay.
        workflow: the workflow this message belongs to, if any.
        causation: id of the message this one answers, if any.
        trace: W3C ``traceparent`` of the sender's span, if any.
        body: the msgpack-encoded body, decoded by the receiver with its own typed decoder.
    """

    id: str
    kind: str
    sender: str
    subject: str
    ts: float
    nonce: bytes
    workflow: str = ""
    causation: str = ""
    trace: str = ""
    body: msgspec.Raw = msgspec.Raw(b"")


class Sealed(msgspec.Struct, frozen=True, array_like=True):
    """What goes on the wire: the encoded envelope, the sender's token, and its signature.

    The signature covers the exact envelope bytes, which include the subject, so a message
    moved to another subject fails verification.
    """

    envelope: bytes
    token: str
    signature: bytes


class SecurityEvent(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A message a receiver refused, reported on the security subject.

    Attributes:
        reason: machine-readable reason (``bad_signature``, ``replay``, ``stale``...).
        subject: the subject the refused message arrived on.
        claimed_sender: the sender it claimed, when that much could be read.
        receiver: the agent id of the receiver that refused it.
        detail: a human-readable explanation.
    """

    reason: str
    subject: str
    claimed_sender: str = ""
    receiver: str = ""
    detail: str = ""
