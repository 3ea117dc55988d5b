"""The JetStream stream that records every govmesh event."""

from __future__ import annotations

from typing import Final

from nats.aio.client import Client as NATS
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from govmesh.bus._subjects import ROOT

__all__ = ["EVENT_STREAM", "ensure_event_stream"]

EVENT_STREAM: Final = "GOVMESH_EVENTS"


async def ensure_event_stream(nc: NATS, *, max_age_s: float = 7 * 24 * 3600) -> StreamConfig:
    """Create (or keep) the stream capturing ``gm.>`` and return its config.

    ``no_ack`` is set because agents use plain request/reply on captured subjects: with acks
    on, JetStream would answer every request with a publish ack that races the real reply.
    """
    js = nc.jetstream()
    config = StreamConfig(
        name=EVENT_STREAM,
        subjects=[f"{ROOT}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age_s,
        no_ack=True,
    )
    try:
        await js.stream_info(EVENT_STREAM)
    except NotFoundError:
        await js.add_stream(config)
    return config
