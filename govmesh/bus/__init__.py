"""The bus: one envelope, one codec, one subject scheme, signed and verified messages."""

from govmesh.bus._bus import MAX_HANDLERS, SLOW_CONSUMER, Bus, Delivery, Handler
from govmesh.bus._codec import Codec, kind_of
from govmesh.bus._envelope import Envelope, Sealed, SecurityEvent
from govmesh.bus._stream import ensure_event_stream
from govmesh.bus._verify import MessageVerifier, Verified
from govmesh.subjects import Subjects

__all__ = [
    "MAX_HANDLERS",
    "SLOW_CONSUMER",
    "Bus",
    "Codec",
    "Delivery",
    "Envelope",
    "Handler",
    "MessageVerifier",
    "Sealed",
    "SecurityEvent",
    "Subjects",
    "Verified",
    "ensure_event_stream",
    "kind_of",
]
