"""The JetStream streams that record govmesh events: one per tenant.

A stream of its own for each tenant lets the NATS permissions name it: a tenant's auditor
reads and its coordinator creates that tenant's stream and no other (see
`Subjects.jetstream_read` and `Subjects.jetstream_admin`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError, ServiceUnavailableError

from govmesh.errors import BusError
from govmesh.subjects import Subjects

__all__ = ["CAPTURED", "captured_subjects", "ensure_event_stream"]

log = logging.getLogger(__name__)

CAPTURED: Final = (
    "intent.>",
    "decision.>",
    "tool.>",
    "result.>",
    "usage.>",
    "msg.>",
    "approval.>",
    "ctl.>",
    "snapshot.>",
    "security",
)
"""What a tenant's stream records of its tree: every area but ``state``. A snapshot carries
its tool tier in the clear to the state actor, which stores it encrypted; kept for days in
the stream, it would undo that. The state actor records each snapshot it stores on
``snapshot.<agent>`` instead: version, policy hash, key id and the sha256 of the sealed
record, no content. A new area must be added here to be recorded."""


def captured_subjects(subjects: Subjects) -> list[str]:
    """The subjects a tenant's event stream records: the one place that says which."""
    return [f"{subjects.prefix}.{area}" for area in CAPTURED]


_JETSTREAM_WAIT_S: Final = 30.0
"""How long a deployment waits for JetStream to answer: a NATS cluster whose node just
restarted takes some seconds to elect its leaders again, and answers nothing meanwhile."""


async def ensure_event_stream(
    nc: NATS,
    tenant: str,
    *,
    replicas: int = 1,
    max_age_s: float = 7 * 24 * 3600,
    wait_s: float = _JETSTREAM_WAIT_S,
) -> StreamConfig:
    """Create (or keep) the event stream of `tenant` and return its config.

    `replicas` is the deployment's (`Deployment.replicas`): on a NATS cluster of three
    nodes, 3 keeps every event through the loss of any one of them. A JetStream that does
    not answer yet (a cluster electing its leaders) is asked again for up to ``wait_s``.

    Raises:
        BusError: JetStream did not answer within ``wait_s``.

    ``no_ack`` is set because agents use plain request/reply on captured subjects: with acks
    on, JetStream would answer every request with a publish ack that races the real reply.
    """
    subjects = Subjects(tenant)
    js = nc.jetstream()
    config = StreamConfig(
        name=subjects.event_stream,
        subjects=captured_subjects(subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age_s,
        no_ack=True,
        # The audit trail's source: no member may take messages out of it, whatever its
        # permissions; events leave it only by age.
        deny_delete=True,
        deny_purge=True,
        num_replicas=replicas,
    )
    deadline = time.monotonic() + wait_s
    while True:
        try:
            try:
                found = await js.stream_info(subjects.event_stream)
            except NotFoundError:
                await js.add_stream(config)
                return config
            break
        except (NatsTimeout, NoRespondersError, ServiceUnavailableError) as exc:
            if time.monotonic() >= deadline:
                raise BusError(
                    f"JetStream did not answer for the event stream {subjects.event_stream} "
                    f"within {wait_s:.0f}s ({type(exc).__name__}): is JetStream on, and has "
                    "the NATS cluster a leader?"
                ) from None
            log.info("JetStream does not answer yet (%s); asking again", type(exc).__name__)
            await asyncio.sleep(0.5)
    if (found.config.num_replicas or 1) != replicas:
        # Only an operator may change a stream (see the permissions); nats-server moves its
        # data to the new peers itself.
        log.warning(
            "event stream %s has %s replicas, the deployment asks for %d: update it "
            "(nats stream edit %s --replicas %d)",
            subjects.event_stream,
            found.config.num_replicas,
            replicas,
            subjects.event_stream,
            replicas,
        )
    if sorted(found.config.subjects or ()) != sorted(config.subjects or ()):
        # No member may change or purge the stream, so an operator must replace it.
        log.warning(
            "event stream %s records %s, not %s; it may hold snapshots in the clear: delete "
            "it (nats stream rm %s) to have it made again",
            subjects.event_stream,
            found.config.subjects,
            config.subjects,
            subjects.event_stream,
        )
    return config
