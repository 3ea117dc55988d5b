"""The bus: one envelope, one codec, one subject scheme, signed and verified messages."""

from govmesh.bus._bus import Bus, Delivery, Handler
from govmesh.bus._codec import Codec, kind_of
from govmesh.bus._envelope import Envelope, Sealed, SecurityEvent
from govmesh.bus._stream import ensure_event_stream
from govmesh.bus._subjects import Subjects
from govmesh.bus._verify import MessageVerifier, Verified

__all__ = [
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
