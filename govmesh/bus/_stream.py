"""The JetStream stream that records every govmesh event."""

from __future__ import annotations

from typing import Final

from nats.aio.client import Client as NATS
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from govmesh.bus._subjects import ROOT

__all__ = ["CAPTURED", "EVENT_STREAM", "ensure_event_stream"]

EVENT_STREAM: Final = "GOVMESH_EVENTS"

CAPTURED: Final = (
    "intent.*",
    "decision.*",
    "tool.>",
    "usage.*",
    "msg.*",
    "approval.*",
    "ctl.*",
    "snapshot.*",
    "security",
)
"""What the stream records of each tenant's tree (`govmesh.bus.Subjects`): every area but
``state``. A snapshot carries its tool tier in the clear to the state actor, which stores it
encrypted; recorded for days in the stream, it would undo that. The state actor records each
snapshot it stores on ``snapshot.<agent>`` instead: version, policy hash, key id and the
sha256 of the sealed record, no content. A new area must be added here to be recorded."""
_UNCAPTURED: Final = "state"


async def ensure_event_stream(nc: NATS, *, max_age_s: float = 7 * 24 * 3600) -> StreamConfig:
    """Create the stream capturing the `CAPTURED` subjects of every tenant, or bring an
    existing one to them, and return its config.

    ``no_ack`` is set because agents use plain request/reply on captured subjects: with acks
    on, JetStream would answer every request with a publish ack that races the real reply.
    """
    js = nc.jetstream()
    config = StreamConfig(
        name=EVENT_STREAM,
        subjects=[f"{ROOT}.*.{area}" for area in CAPTURED],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age_s,
        no_ack=True,
    )
    try:
        found = await js.stream_info(EVENT_STREAM)
    except NotFoundError:
        await js.add_stream(config)
        return config
    if sorted(found.config.subjects or ()) != sorted(config.subjects or ()):
        # A stream made by an earlier version recorded snapshots in the clear: stop that, and
        # drop those it holds.
        await js.update_stream(config)
        await js.purge_stream(EVENT_STREAM, subject=f"{ROOT}.*.{_UNCAPTURED}.>")
    return config
