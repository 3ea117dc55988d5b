"""``govmesh watch``: a running deployment's events as they happen, from another terminal.

The watcher joins the deployment advertised under ``$GOVMESH_HOME`` (see
`govmesh.runtime.join`) as its watch member, in the ``auditor`` role: it reads every event of
the tenant's stream and can change nothing. It reads the stream through an ephemeral
JetStream consumer, from now on or, to join late, from the stream's start.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from govmesh.bus import EVENT_STREAM, Bus, Codec
from govmesh.identity._permissions import AUDITOR_ROLE
from govmesh.observability._audit import summarize_body
from govmesh.runtime import WATCH_MEMBER, JoinedDeployment

__all__ = ["WatchedEvent", "watch_events"]

_WATCH_TTL_S: Final = 600.0


class WatchedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event of the stream, as the watcher shows it.

    Attributes:
        summary: a few fields of the body (`summarize_body`); reasoning only as a hash.
    """

    ts: float
    workflow: str
    kind: str
    sender: str
    subject: str
    id: str
    causation: str
    summary: dict[str, Any]


async def watch_events(
    joined: JoinedDeployment,
    *,
    replay: bool = False,
    workflow: str = "",
    kinds: tuple[str, ...] = (),
) -> AsyncIterator[WatchedEvent]:
    """The deployment's events as they come, oldest first; from the stream's start with
    ``replay``, else from now. ``workflow`` and ``kinds`` keep only those."""
    deployment = joined.deployment
    identity, cert = joined.member(WATCH_MEMBER, AUDITOR_ROLE, ttl_s=_WATCH_TTL_S)
    bus = await Bus.connect(deployment, identity, rotate=False, client_cert=cert)
    codec = Codec()
    try:
        js = bus.nc.jetstream()
        sub = await js.pull_subscribe(
            bus.subjects.everything,
            durable=None,
            stream=EVENT_STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL if replay else DeliverPolicy.NEW,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
            ),
        )
        while True:
            try:
                msgs = await sub.fetch(100, timeout=1.0)
            except NatsTimeoutError:
                continue
            for msg in msgs:
                try:
                    envelope = codec.envelope(codec.open(msg.data).envelope)
                except (msgspec.DecodeError, ValueError):
                    continue
                if workflow and envelope.workflow != workflow:
                    continue
                if kinds and envelope.kind not in kinds:
                    continue
                yield WatchedEvent(
                    ts=envelope.ts,
                    workflow=envelope.workflow,
                    kind=envelope.kind,
                    sender=envelope.sender,
                    subject=envelope.subject,
                    id=envelope.id,
                    causation=envelope.causation,
                    summary=summarize_body(envelope.kind, bytes(envelope.body)),
                )
            await asyncio.sleep(0)
    finally:
        await bus.close()
