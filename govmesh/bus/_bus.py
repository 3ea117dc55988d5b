"""The Bus: signed publish, verified subscribe, and request/reply over NATS."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError, SlowConsumerError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry.trace import SpanKind

from govmesh.bus._codec import Codec
from govmesh.bus._envelope import Envelope, SecurityEvent
from govmesh.bus._verify import MessageVerifier
from govmesh.config import Deployment, nats_servers
from govmesh.errors import BusError, ConfigError, SecurityError
from govmesh.identity import (
    Claims,
    ClientCert,
    Identity,
    TokenVerifier,
    load_client_cert,
    ssl_context,
)
from govmesh.identity.messages import TokenGrant, TokenRenewal
from govmesh.subjects import Subjects
from govmesh.telemetry._metrics import HANDLER_DURATION, SECURITY_REJECTIONS
from govmesh.telemetry._tracing import current_traceparent, span

__all__ = [
    "MAX_HANDLERS",
    "PENDING_BYTES_LIMIT",
    "PENDING_MSGS_LIMIT",
    "SLOW_CONSUMER",
    "Authorize",
    "Bus",
    "Delivery",
    "Handler",
]

log = logging.getLogger(__name__)

_CLOSE_FLUSH_S: Final = 2
"""How long closing waits for what was published to reach the server."""

MAX_HANDLERS: Final = 256
"""Handlers one subscription runs at once unless it asks otherwise; further messages wait
in its pending buffer."""
PENDING_MSGS_LIMIT: Final = 65_536
"""Messages one subscription holds while its handlers are busy; beyond it nats-py drops
them and the bus reports a slow consumer."""
PENDING_BYTES_LIMIT: Final = 64 * 1024 * 1024
"""Bytes of messages one subscription holds while its handlers are busy (as above)."""
SLOW_CONSUMER: Final = "slow_consumer"
"""The security event reason for messages dropped because a subscription fell behind."""
_SLOW_CONSUMER_REPORT_S: Final = 1.0
"""At most one slow-consumer event per subscription in this many seconds: a flood must not
become a flood of security events; every dropped message is still counted."""


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """A verified message handed to a handler.

    Attributes:
        envelope: the verified envelope.
        body: the decoded typed body.
        claims: the sender's verified token claims.
        reply: the reply subject, for requests.
        data: the exact wire bytes, so a signed message can be forwarded as proof.
    """

    envelope: Envelope
    body: Any
    claims: Claims
    reply: str = ""
    data: bytes = b""


Handler = Callable[[Delivery], Awaitable[None]]
Authorize = Callable[[Claims, Any], None]
"""Checks what a verified sender may ask for; raises `SecurityError` to drop the message."""

_RENEW_RETRY_S = 2.0


def _not_tls_eof(record: logging.LogRecord) -> bool:
    return "eof_received" not in record.getMessage()


def _hush_tls_eof() -> None:
    """nats-py's protocol answers True to ``eof_received``; asyncio (and uvloop) warn that
    this has no effect for every TLS connection the server closes, which says nothing to a
    user. Every process that joins the bus drops that one warning (once: a filter is added
    once however often this runs)."""
    logging.getLogger("asyncio").addFilter(_not_tls_eof)


_QUOTED = re.compile(r'"([^"]+)"')


class Bus:
    """One member's connection to the bus.

    Every outgoing message is sealed with the member's key and token; every incoming one is
    verified before any handler runs. A refused message is counted in `rejected`, reported on
    the security subject and dropped; the receiver keeps running. Each verified message runs
    in its own task, so one member serves many workflows at once, up to a bound per
    subscription; a subscription that falls behind drops what its pending buffer cannot
    hold and reports it as a slow consumer (`slow_consumers`).

    Use `Bus.connect`; `close` cancels handler tasks still running and is safe to call twice.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        identity: Identity,
        tokens: TokenVerifier,
        subjects: Subjects,
        codec: Codec | None = None,
    ) -> None:
        self.nc = nc
        self.identity = identity
        self.subjects = subjects
        self.codec = codec or Codec()
        self.verifier = MessageVerifier(tokens=tokens, codec=self.codec)
        self.tokens = tokens
        self.rejected: Counter[str] = Counter()
        self.slow_consumers: Counter[str] = Counter()
        """Messages dropped by each subscription (by its subject) that fell behind."""
        self._unreported: Counter[str] = Counter()
        self._slow_reported_at: dict[str, float] = {}
        self.rotations = 0
        self.cert_renewals = 0
        self._tls: ssl.SSLContext | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def _spawn(
        self,
        coro: Coroutine[Any, Any, None],
        *,
        name: str,
        slot: asyncio.Semaphore | None = None,
    ) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if slot is not None:
            # Released however the task ends, cancelled before it started included.
            task.add_done_callback(lambda _: slot.release())

    async def _rotate(self) -> None:
        """Renew this member's token at each half-life, and its client certificate once past
        the certificate's half-life. Messages signed with the old token stay valid until it
        expires and the live connection keeps its TLS session, so rotation loses nothing;
        the renewed certificate is presented from the next reconnect on."""
        while not self._closed:
            claims = self.tokens.verify(self.identity.token)
            wake = claims.iat + (claims.exp - claims.iat) / 2
            cert = self.identity.cert
            if cert is not None:
                wake = min(wake, cert.renew_before().timestamp())
            await asyncio.sleep(max(0.0, wake - time.time()))
            cert = self.identity.cert
            due = cert is not None and time.time() >= cert.renew_before().timestamp()
            while not self._closed:
                try:
                    reply = await self.request(
                        self.subjects.ctl("identity"),
                        TokenRenewal(cert_pem=cert.cert_pem if cert and due else b""),
                        accepts=TokenGrant,
                        timeout=5.0,
                    )
                    grant: TokenGrant = reply.body
                    fresh = self.tokens.verify(grant.token)
                    if fresh.sub != claims.sub or fresh.key.raw != claims.key.raw:
                        raise SecurityError("bad_grant", f"granted token is for {fresh.sub!r}")
                except (BusError, SecurityError) as exc:
                    log.warning("token renewal for %s failed: %s", claims.sub, exc)
                    await asyncio.sleep(_RENEW_RETRY_S)
                    continue
                self.identity.token = grant.token
                self.rotations += 1
                if grant.cert_pem and cert is not None:
                    self._use_cert(msgspec.structs.replace(cert, cert_pem=grant.cert_pem))
                break

    def _use_cert(self, cert: ClientCert) -> None:
        self.identity.cert = cert
        if self._tls is not None:
            load_client_cert(self._tls, cert)
        self.cert_renewals += 1

    @classmethod
    async def connect(
        cls,
        deployment: Deployment,
        identity: Identity,
        *,
        rotate: bool = True,
        client_cert: ClientCert | None = None,
        **options: Any,
    ) -> Bus:
        """Connect ``identity`` to the deployment's NATS server, or to one of its cluster's.

        Args:
            deployment: where the server is and whom to trust.
            identity: this member's identity.
            rotate: renew the token at each half-life from the token authority.
            client_cert: join over mutual TLS with this certificate (default: the
                identity's own), replies under the member's own inbox prefix (the only
                inboxes its permissions let it read).
            **options: passed to ``nats.connect`` (e.g. ``tls=``).
        """
        client_cert = client_cert or identity.cert
        if client_cert is not None:
            identity.cert = client_cert
            options.setdefault("tls", ssl_context(client_cert))
            inbox = Subjects(deployment.tenant).inbox_prefix(client_cert.member_id)
            options.setdefault("inbox_prefix", inbox)
        joined: list[Bus] = []

        async def on_error(exc: Exception) -> None:
            # The server refuses a forbidden publish or subscribe with -ERR and keeps the
            # connection open; nats-py only hands it to this callback.
            text = str(exc)
            if joined and isinstance(exc, SlowConsumerError):
                joined[0].slow_consumer(exc.sub.subject, exc.subject)
            elif joined and "permissions violation" in text.lower():
                found = _QUOTED.search(text)
                joined[0].report(
                    SecurityError("permission_violation", text),
                    subject=found.group(1) if found else "",
                )
            else:
                log.warning("NATS error for %s: %s", identity.agent_id, text)

        _hush_tls_eof()
        options.setdefault("error_cb", on_error)
        options.setdefault("name", identity.agent_id)
        options.setdefault("max_reconnect_attempts", -1)
        options.setdefault("reconnect_time_wait", 0.2)
        try:
            # Every server of a NATS cluster: the client fails over to another when one goes.
            nc = await nats.connect(nats_servers(deployment.nats_url), **options)
        except Exception as exc:
            raise BusError(f"cannot connect to NATS at {deployment.nats_url!r}: {exc}") from exc
        tokens = TokenVerifier(issuers=list(deployment.issuers), audience=deployment.audience)
        bus = cls(nc, identity=identity, tokens=tokens, subjects=Subjects(deployment.tenant))
        bus._tls = options.get("tls")
        joined.append(bus)
        if rotate:
            bus._spawn(bus._rotate(), name=f"rotate-{identity.agent_id}")
        return bus

    async def publish(
        self,
        subject: str,
        body: msgspec.Struct,
        *,
        workflow: str = "",
        causation: str = "",
        trace: str = "",
    ) -> Envelope:
        """Sign and publish ``body`` on ``subject``; returns the envelope sent.

        Inside a span, the envelope carries that span's trace context (so the receiver's
        span is its child); otherwise ``trace``.
        """
        envelope, data = self.codec.seal(
            self.identity,
            subject=subject,
            body=body,
            workflow=workflow,
            causation=causation,
            trace=current_traceparent() or trace,
        )
        await self.send(subject, data)
        return envelope

    async def send(self, subject: str, data: bytes) -> None:
        """Publish a message sealed for ``subject`` already (`Codec.seal` with this member's
        identity): for one signed before the moment it goes out."""
        await self.nc.publish(subject, data)

    async def respond(self, to: Delivery, body: msgspec.Struct) -> Envelope:
        """Answer a request ``to`` on its reply subject."""
        if not to.reply:
            raise BusError(f"message {to.envelope.id} on {to.envelope.subject!r} is not a request")
        return await self.publish(
            to.reply,
            body,
            workflow=to.envelope.workflow,
            causation=to.envelope.id,
            trace=to.envelope.trace,
        )

    async def request(
        self,
        subject: str,
        body: msgspec.Struct,
        *,
        accepts: Any,
        timeout: float = 10.0,
        workflow: str = "",
        causation: str = "",
        trace: str = "",
    ) -> Delivery:
        """Send a request and return the verified reply.

        Raises:
            BusError: nobody answered within ``timeout`` seconds.
            SecurityError: the reply failed verification (also reported as a security event).
        """
        _, data = self.codec.seal(
            self.identity,
            subject=subject,
            body=body,
            workflow=workflow,
            causation=causation,
            trace=current_traceparent() or trace,  # as `publish`
        )
        try:
            msg = await self.nc.request(subject, data, timeout=timeout)
        except NatsTimeoutError:
            raise BusError(f"no answer on {subject!r} within {timeout}s") from None
        except NoRespondersError:
            raise BusError(f"nobody serves {subject!r}") from None
        delivery = self._accept(msg, accepts)
        if delivery is None:
            raise SecurityError("bad_reply", f"the reply on {subject!r} failed verification")
        return delivery

    async def subscribe(
        self,
        subject: str,
        handler: Handler,
        *,
        accepts: Any,
        queue: str = "",
        authorize: Authorize | None = None,
        concurrent: bool = True,
        max_handlers: int = MAX_HANDLERS,
        pending_msgs_limit: int = PENDING_MSGS_LIMIT,
        pending_bytes_limit: int = PENDING_BYTES_LIMIT,
    ) -> Subscription:
        """Run ``handler`` for every verified message on ``subject`` whose body is ``accepts``.

        Work is bounded as nats.py bounds it: at most ``max_handlers`` handlers run at once;
        the messages that arrive meanwhile wait, unread, in the subscription's pending
        buffer; what the buffer cannot hold is dropped by nats-py and reported as a slow
        consumer (`slow_consumer`). A handler that waits for a later message of its own
        subscription must hand its long work to a task of its own, or a full set of such
        handlers would wait for each other.

        Args:
            subject: subject or wildcard.
            handler: coroutine function taking a `Delivery`.
            accepts: the body type or tagged union this subscription accepts.
            queue: queue group; members of one group share the messages.
            authorize: checks the sender's claims against what the body asks for (a
                capability, a budget authority); a refusal drops the message before the
                handler and is reported like any other.
            concurrent: run each message's handler in its own task (many workflows at
                once); False runs handlers one after another on the subscription's own
                task, which saves a task per message for quick request/reply services.
            max_handlers: handlers run at once when ``concurrent``.
            pending_msgs_limit: messages held while the handlers are busy.
            pending_bytes_limit: bytes of messages held while the handlers are busy.

        Raises:
            ConfigError: a bound below 1.
        """
        for name, bound in (
            ("max_handlers", max_handlers),
            ("pending_msgs_limit", pending_msgs_limit),
            ("pending_bytes_limit", pending_bytes_limit),
        ):
            # nats-py reads 0 or -1 as "no limit": never what a caller of the bus means.
            if bound < 1:
                raise ConfigError(
                    f"{name} of the subscription to {subject!r} must be at least 1, got {bound!r}"
                )
        slots = asyncio.Semaphore(max_handlers)

        async def on_message(msg: Msg) -> None:
            delivery = self._accept(msg, accepts, authorize)
            if delivery is None:
                return
            if not concurrent:
                await self._run(handler, delivery)
                return
            # Waiting here keeps later messages in nats-py's bounded pending buffer.
            await slots.acquire()
            self._spawn(
                self._run(handler, delivery),
                name=f"handle-{delivery.envelope.kind}",
                slot=slots,
            )

        return await self.nc.subscribe(
            subject,
            queue=queue,
            cb=on_message,
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
        )

    def check(self, subject: str, data: bytes, accepts: Any, *, replay: bool = True) -> Delivery:
        """Verify a message carried inside another one (e.g. a decision inside a tool call).

        Raises:
            SecurityError: with the reason; the caller decides whether to report it.
        """
        verified = self.verifier.verify(subject, data, replay=replay)
        body = self.codec.body(verified.envelope, accepts)
        return Delivery(envelope=verified.envelope, body=body, claims=verified.claims, data=data)

    def _accept(
        self, msg: Msg, accepts: Any, authorize: Authorize | None = None
    ) -> Delivery | None:
        try:
            verified = self.verifier.verify(msg.subject, msg.data)
            body = self.codec.body(verified.envelope, accepts)
            if authorize is not None:
                authorize(verified.claims, body)
        except SecurityError as exc:
            self.report(exc, subject=msg.subject, data=msg.data)
            return None
        return Delivery(
            envelope=verified.envelope,
            body=body,
            claims=verified.claims,
            reply=msg.reply or "",
            data=msg.data,
        )

    def report(self, exc: SecurityError, *, subject: str, data: bytes = b"") -> None:
        """Count a refused message and publish a security event about it."""
        self.rejected[exc.reason] += 1
        SECURITY_REJECTIONS.add(1, {"govmesh.security.reason": exc.reason})
        claimed = self._claimed_sender(data)
        log.warning("refused message on %s from %r: %s", subject, claimed, exc)
        if subject == self.subjects.security or self._closed:
            return
        event = SecurityEvent(
            reason=exc.reason,
            subject=subject,
            claimed_sender=claimed,
            receiver=self.identity.agent_id,
            detail=str(exc)[:500],
        )
        self._spawn(self._report_quietly(event), name="security-event")

    def slow_consumer(self, watched: str, subject: str) -> None:
        """Count a message dropped because the subscription to ``watched`` fell behind, and
        report it as a security event (at most one a second per subscription, with the
        number dropped since the last one): a burst that outruns a receiver is an attack
        when one member sends it, and an operator must see it beside the other refusals.

        Args:
            watched: the subject of the subscription that dropped the message.
            subject: the subject the dropped message arrived on (it names the sender's
                area, e.g. ``intent.<agent>``); the message itself was never read.
        """
        self.rejected[SLOW_CONSUMER] += 1
        self.slow_consumers[watched] += 1
        self._unreported[watched] += 1
        SECURITY_REJECTIONS.add(1, {"govmesh.security.reason": SLOW_CONSUMER})
        now = time.monotonic()
        last = self._slow_reported_at.get(watched)
        if last is not None and now - last < _SLOW_CONSUMER_REPORT_S:
            return
        self._slow_reported_at[watched] = now
        dropped = self._unreported.pop(watched)
        detail = (
            f"slow consumer: {dropped} message(s) dropped by the subscription to {watched!r}, "
            f"the last on {subject!r}; its handlers were busy and its pending buffer full"
        )
        log.warning("%s: %s", self.identity.agent_id, detail)
        if watched == self.subjects.security or self._closed:
            return
        event = SecurityEvent(
            reason=SLOW_CONSUMER,
            subject=subject,
            receiver=self.identity.agent_id,
            detail=detail,
        )
        self._spawn(self._report_quietly(event), name="security-event")

    async def _report_quietly(self, event: SecurityEvent) -> None:
        try:
            await self.publish(self.subjects.security, event)
        except Exception as exc:  # a failing report must never take the receiver down
            log.error("could not publish security event %s: %s", event.reason, exc)

    def _claimed_sender(self, data: bytes) -> str:
        try:
            return self.codec.envelope(self.codec.open(data).envelope).sender[:200]
        except SecurityError:
            return ""

    async def _run(self, handler: Handler, delivery: Delivery) -> None:
        envelope = delivery.envelope
        started = time.perf_counter()
        try:
            # One span per handled message, a child of the sender's span (the envelope's
            # trace context): what the handler sends next carries this span's context.
            with span(
                f"handle {envelope.kind}",
                traceparent=envelope.trace,
                kind=SpanKind.CONSUMER,
                attributes={
                    "govmesh.member": self.identity.agent_id,
                    "govmesh.message.kind": envelope.kind,
                    "govmesh.message.sender": envelope.sender,
                    "govmesh.workflow": envelope.workflow or None,
                },
            ):
                await handler(delivery)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "handler failed for %s %s on %s",
                delivery.envelope.kind,
                delivery.envelope.id,
                delivery.envelope.subject,
            )
        HANDLER_DURATION.record(
            time.perf_counter() - started, {"govmesh.message.kind": envelope.kind}
        )

    async def flush(self, timeout: int = 5) -> None:
        """Wait until the server has everything sent so far, subscriptions included.

        Twice, because nats-py writes its PING straight to the socket while a SUB may still
        sit in its pending buffer, so one PONG does not prove the SUB arrived; the second
        PING goes out after the buffer holding the SUB has been written.
        """
        await self.nc.flush(timeout=timeout)
        await self.nc.flush(timeout=timeout)

    async def close(self) -> None:
        """Cancel running handlers, drain and close the connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self.nc.is_closed:
            # Not nc.drain(): it swallows its own cancellation and then flushes with a 10 s
            # timeout, so a close bounded by asyncio.wait_for could still take 10 s. Handlers
            # are cancelled already; what is left is to send what was published.
            try:
                await self.nc.flush(timeout=_CLOSE_FLUSH_S)
            except Exception as exc:
                log.debug("flush before close failed: %s", exc)
            try:
                await self.nc.close()
            except (OSError, AttributeError) as exc:
                # The server went away with our last writes unsent; nothing is left to close.
                # (asyncio's TLS transport, once lost, raises AttributeError on a write.)
                log.debug("connection lost before close: %s", exc)

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
