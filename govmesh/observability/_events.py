"""A running deployment's events, verified and typed, as an async iterator: the public
monitoring API, and what ``govmesh watch`` and the Prometheus endpoint read.

`EventStream` joins the deployment advertised under ``$GOVMESH_HOME`` (see
`govmesh.runtime.join`) as its watch member, in the ``auditor`` role, with keys it makes and
enrols over the deployment's socket: it reads every event of the tenant's stream and can
change nothing. Each message is checked as a receiver checks it (`StreamVerifier`): token of
a trusted issuer, signature, sender, subject, freshness, replay. A message that fails is
never yielded: it is counted (`EventStream.refused`) and handed, as a `RefusedMessage`, to
the ``on_refused`` callback, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, Final, Literal, TypeVar

import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError

from govmesh.bus import Bus
from govmesh.errors import ConfigError, GovmeshError
from govmesh.observability._audit import Scalar, summarize_body
from govmesh.observability._stored import RefusedMessage, StoredMessage, StreamVerifier
from govmesh.roles import AUDITOR_ROLE
from govmesh.runtime import WATCH_MEMBER, JoinedDeployment, join

__all__ = ["Event", "EventError", "EventStart", "EventStream"]

EventStart = Literal["new", "first"] | int | datetime
"""Where an `EventStream` starts: ``"new"`` (what comes from now on), ``"first"`` (the
stream's first event still kept), a stream sequence number (that event on; an event's
``seq + 1`` resumes after it), or a time (the first event the stream stored at or after it;
timezone-aware)."""

_BATCH: Final = 100
_PULL_S: Final = 1.0
_JOIN_POLL_S: Final = 0.2

B = TypeVar("B", bound=msgspec.Struct)


class EventError(GovmeshError, ValueError):
    """An event's body is not of the kind asked for, or does not decode as it."""


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One verified event of a deployment's stream.

    Attributes:
        seq: its stream sequence number: ``start=event.seq + 1`` resumes after it.
        stored_at: when the stream stored it (Unix time).
        id: the message id.
        kind: its body's kind, e.g. ``"Decision"``, ``"Usage"``, ``"Outcome"``.
        sender: the member that signed it, as its token names it.
        subject: the subject it was published on.
        ts: when its sender sent it (Unix time).
        workflow: the workflow it belongs to ("" for none).
        causation: the id of the message it answers ("" for none).
        trace: its W3C ``traceparent`` ("" for none).
        body: its body, encoded (msgpack); `decode` types it.
    """

    seq: int
    stored_at: float
    id: str
    kind: str
    sender: str
    subject: str
    ts: float
    workflow: str = ""
    causation: str = ""
    trace: str = ""
    body: bytes = b""

    def decode(self, accepts: type[B]) -> B:
        """The body as ``accepts``, the message type of its kind (`govmesh.Decision`,
        `govmesh.Usage`, ...).

        Raises:
            EventError: the event is of another kind, or its body does not decode as
                ``accepts``.
        """
        tag = accepts.__struct_config__.tag
        asked = tag if isinstance(tag, str) else accepts.__name__
        if asked != self.kind:
            raise EventError(f"event {self.id} (seq {self.seq}) is a {self.kind!r}, not {asked!r}")
        try:
            return msgspec.msgpack.decode(self.body, type=accepts)
        except (msgspec.DecodeError, ValueError) as exc:
            raise EventError(f"event {self.id} (seq {self.seq}): {self.kind}: {exc}") from None

    def summary(self) -> dict[str, Scalar]:
        """A few scalar fields of the body, chosen by kind (as ``govmesh watch`` shows it);
        free reasoning only as its hash."""
        return summarize_body(self.kind, self.body)


class EventStream:
    """A running deployment's verified events, oldest first, as an async iterator.

    Use it as an async context manager, so its connection closes however the loop ends::

        async with govmesh.EventStream(kinds={"Decision"}, start="first") as events:
            async for event in events:
                decision = event.decode(govmesh.Decision)

    Iterating without ``async with`` opens it on the first event and closes it when the
    stream ends; a loop left early then leaves it open until `close`.

    A deployment still starting, without its stream yet, is waited for. The stream ends
    once the process that runs the deployment has stopped and no event came for a second,
    or after `stop`. Filters keep only events of the given workflows, kinds
    and senders (each: any of those given; none given: all). A message that fails
    verification is never yielded, whatever the filters: it is counted in `refused` and
    passed to ``on_refused``; what it claims (workflow, kind, sender) is not believed.

    Args:
        tenant: the deployment's tenant; the only one running under ``$GOVMESH_HOME`` when
            None.
        deployment: a deployment already joined (`govmesh.runtime.join`), instead of
            ``tenant``.
        workflows: only events of these workflows.
        kinds: only events of these kinds.
        senders: only events these members sent.
        start: where to start (`EventStart`): ``"new"`` by default.
        on_refused: called with each message refused, in stream order among the events.
        wait_s: how long to wait for the deployment to be advertised (0: it must be now).

    Raises:
        ConfigError: (on opening) no such deployment within ``wait_s``, or a ``start`` that
            is not one (a sequence below 1, a time without a timezone).
        SecurityError: (on opening) the deployment refused to enrol the watch member.
    """

    def __init__(
        self,
        *,
        tenant: str | None = None,
        deployment: JoinedDeployment | None = None,
        workflows: Collection[str] = (),
        kinds: Collection[str] = (),
        senders: Collection[str] = (),
        start: EventStart = "new",
        on_refused: Callable[[RefusedMessage], None] | None = None,
        wait_s: float = 0.0,
    ) -> None:
        self._consumer = _consumer(start)
        self._tenant = tenant
        self._joined = deployment
        self._workflows = frozenset(workflows)
        self._kinds = frozenset(kinds)
        self._senders = frozenset(senders)
        self._on_refused = on_refused
        self._wait_s = wait_s
        # Refused messages wait in line too, so ``on_refused`` hears of each in stream order.
        self._ready: deque[Event | RefusedMessage] = deque()
        self._bus: Bus | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._verifier: StreamVerifier | None = None
        self._stopped = False
        self._closed = False
        self.refused = 0
        """Messages of the stream refused so far (and passed to ``on_refused``)."""

    @property
    def deployment(self) -> JoinedDeployment:
        """The deployment joined; only once open.

        Raises:
            ConfigError: not open yet.
        """
        if self._joined is None:
            raise ConfigError("the event stream is not open yet: use `async with` first")
        return self._joined

    async def open(self) -> None:
        """Join the deployment, enrol the watch member and subscribe; `__aenter__` and the
        first iteration call it. Safe to call twice."""
        if self._bus is not None or self._closed:
            return
        joined = self._joined or await _join(self._tenant, self._wait_s)
        self._joined = joined
        identity = await joined.member(WATCH_MEMBER, AUDITOR_ROLE)
        self._verifier = StreamVerifier.of(joined.deployment)
        self._bus = await Bus.connect(joined.deployment, identity, rotate=False)
        try:
            await self._subscribe()
        except BaseException:
            await self.close()
            raise

    async def _subscribe(self) -> JetStreamContext.PullSubscription | None:
        """The subscription to the deployment's stream, made on first use; None while it
        has no stream yet (a run makes it once its services are up)."""
        bus = self._bus
        if self._sub is not None or bus is None:
            return self._sub
        with contextlib.suppress(NotFoundError):
            self._sub = await bus.nc.jetstream().pull_subscribe(
                bus.subjects.everything,
                durable=None,
                stream=bus.subjects.event_stream,
                config=self._consumer,
            )
        return self._sub

    async def latest_seq(self) -> int:
        """The sequence number of the newest message the deployment's stream holds now, 0
        while it holds none (or the run has not made it yet).

        Raises:
            ConfigError: the stream is not open.
        """
        bus = self._bus
        if bus is None:
            raise ConfigError("the event stream is not open: use `async with` first")
        try:
            info = await bus.nc.jetstream().stream_info(bus.subjects.event_stream)
        except NotFoundError:
            return 0
        return info.state.last_seq or 0

    def stop(self) -> None:
        """End the iteration: events already pulled are still yielded, then it ends. Safe
        from ``on_refused`` and from another task."""
        self._stopped = True

    async def close(self) -> None:
        """Unsubscribe and disconnect; the iteration ends. Safe to call twice."""
        self._closed = True
        self._sub = None
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.close()

    async def __aenter__(self) -> EventStream:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        await self.open()
        while True:
            while not self._ready:
                if self._stopped or self._closed or not await self._pull():
                    await self.close()
                    raise StopAsyncIteration
            item = self._ready.popleft()
            if isinstance(item, Event):
                return item
            self.refused += 1
            if self._on_refused is not None:
                self._on_refused(item)

    async def _pull(self) -> bool:
        """Pull the next batch and queue its events that pass the filters; False once the
        deployment has stopped."""
        joined, verifier = self._joined, self._verifier
        if joined is None or verifier is None:
            return False
        sub = await self._subscribe()
        if sub is None:
            await asyncio.sleep(_JOIN_POLL_S)
            return joined.running
        try:
            msgs = await sub.fetch(_BATCH, timeout=_PULL_S)
        except TimeoutError:
            # nats-py's own, or asyncio's when its deadline passes between two pulls.
            return joined.running
        except ServiceUnavailableError:
            # JetStream did not answer the pull: the server is stopping with the
            # deployment, or restarting; pull again shortly unless it stopped.
            if not joined.running:
                return False
            await asyncio.sleep(0.2)
            return True
        stored = [StoredMessage.of(m) for m in msgs]
        for message, checked in zip(stored, verifier.check_many(stored), strict=True):
            if isinstance(checked, RefusedMessage):
                self._ready.append(checked)
                continue
            if (
                (self._workflows and checked.workflow not in self._workflows)
                or (self._kinds and checked.kind not in self._kinds)
                or (self._senders and checked.sender not in self._senders)
            ):
                continue
            self._ready.append(
                Event(
                    seq=message.seq,
                    stored_at=message.stored_at,
                    id=checked.id,
                    kind=checked.kind,
                    sender=checked.sender,
                    subject=checked.subject,
                    ts=checked.ts,
                    workflow=checked.workflow,
                    causation=checked.causation,
                    trace=checked.trace,
                    body=bytes(checked.body),
                )
            )
        return True


def _consumer(start: EventStart) -> ConsumerConfig:
    """The ephemeral consumer that starts at ``start``; nothing is acknowledged, and the
    server drops it a minute after its reader is gone."""
    where: dict[str, Any]
    if start == "new":
        where = {"deliver_policy": DeliverPolicy.NEW}
    elif start == "first":
        where = {"deliver_policy": DeliverPolicy.ALL}
    elif isinstance(start, datetime):
        if start.tzinfo is None:
            raise ConfigError(f"start: a time needs its timezone, got {start.isoformat()!r}")
        where = {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": start}
    elif isinstance(start, int) and not isinstance(start, bool) and start >= 1:
        where = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start}
    else:
        raise ConfigError(
            'start: "new", "first", a stream sequence from 1 or a timezone-aware time; '
            f"got {start!r}"
        )
    return ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=60.0, **where)


async def _join(tenant: str | None, wait_s: float) -> JoinedDeployment:
    """The deployment of ``tenant`` (see `join`), waiting up to ``wait_s`` for it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return join(tenant)
        except ConfigError:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(_JOIN_POLL_S)
