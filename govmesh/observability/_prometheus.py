"""A running deployment's metrics on an HTTP port for Prometheus to scrape, only when asked.

A deployment decides and calls models in its actors, each a process of its own and, on a
Ray cluster, on whichever node Ray placed it; OpenTelemetry's Prometheus exporter serves
the metrics of the one process it runs in. So the endpoint does not read the actors'
instruments: it follows the deployment's verified event stream (`EventStream`, as ``govmesh
watch`` does) and records what the events say into govmesh's instruments (the same names,
units and attributes as the actors' own, `Instruments`) on a meter provider of its own,
which the exporter serves. One endpoint covers the whole deployment, on any number of
nodes, and counts only what was signed by a member the deployment trusts.

Prometheus names (OpenTelemetry's translation of the instruments'):

- ``govmesh_decisions_total``: decisions, by ``govmesh_decision_outcome`` and
  ``govmesh_decision_source`` (``policy``, or ``approval`` when settling an escalation);
- ``gen_ai_client_token_usage``: tokens of each model call (a histogram), by
  ``gen_ai_token_type`` (input, output) and ``gen_ai_request_model``;
- ``govmesh_model_cost_USD_total``: what model calls cost, by ``gen_ai_request_model``;
- ``govmesh_security_rejections_total``: messages refused, by ``govmesh_security_reason``:
  those receivers reported and those the stream refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric

from govmesh.bus import SecurityEvent
from govmesh.errors import ConfigError, GovmeshError
from govmesh.forecasting.messages import Usage
from govmesh.governance.messages import Decision
from govmesh.observability._events import Event, EventError, EventStart, EventStream
from govmesh.observability._stored import RefusedMessage
from govmesh.telemetry._metrics import Instruments, record_decision, record_model_usage

if TYPE_CHECKING:
    from govmesh.runtime import JoinedDeployment

__all__ = ["PrometheusEndpoint"]

log = logging.getLogger(__name__)

_SCOPE: Final = "govmesh"
_DECISIONS_KEPT: Final = 100_000
"""Decisions remembered to count an answer given again once: an agent asks again within
minutes, so the latest hundred thousand are plenty."""
_CATCH_UP_S: Final = 30.0
"""How long `serve_final` waits to count what the stream holds: a pull waits at most a
second, and counting a hundred thousand events takes a few more."""
_POLL_S: Final = 0.05


class _ScrapeWitness:
    """A collector with no metrics that notes each scrape. Registered before the
    exporter's collector, it is called before the metrics are read, so a scrape noted
    after a moment served the figures of that moment or later."""

    def __init__(self) -> None:
        self.scraped = threading.Event()

    def collect(self) -> Iterable[Metric]:
        self.scraped.set()
        return ()


class PrometheusEndpoint:
    """Serves a running deployment's metrics at ``http://HOST:PORT/metrics`` while open
    (see the module docs for what it serves and why from the event stream).

    An async context manager: opening binds the port, joins the deployment and starts
    following its events; closing stops both. `close` is safe to call twice.

    Args:
        port: the TCP port (0: a free one; `port` tells which).
        host: the address to bind: this machine only by default; ``0.0.0.0`` for a
            Prometheus on another one.
        tenant: the deployment's tenant (see `EventStream`).
        deployment: a deployment already joined, instead of ``tenant``.
        start: where in the stream to start counting: ``"new"`` (from now) by default.
        wait_s: how long to wait for the deployment to be advertised.

    Raises:
        ConfigError: (on opening) the port cannot be bound, or the deployment cannot be
            joined (see `EventStream`).
    """

    def __init__(
        self,
        *,
        port: int,
        host: str = "127.0.0.1",
        tenant: str | None = None,
        deployment: JoinedDeployment | None = None,
        start: EventStart = "new",
        wait_s: float = 0.0,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"prometheus port: must be from 0 to 65535, got {port!r}")
        self._asked = port
        self._host = host
        self._registry = CollectorRegistry()
        self._witness = _ScrapeWitness()
        self._registry.register(self._witness)
        self._provider = MeterProvider(
            metric_readers=[PrometheusMetricReader(registry=self._registry)],
            resource=Resource.create({"service.name": "govmesh"}),
        )
        self._into = Instruments.of(self._provider.get_meter(_SCOPE))
        self._decided: OrderedDict[tuple[str, str, bool], None] = OrderedDict()
        self._counted_seq = 0
        self._events = EventStream(
            tenant=tenant,
            deployment=deployment,
            start=start,
            on_refused=self.refused,
            wait_s=wait_s,
        )
        self._server: WSGIServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def port(self) -> int:
        """The port it serves on (the one chosen when asked for 0); only once open."""
        return self._asked if self._server is None else self._server.server_port

    @property
    def url(self) -> str:
        """Where Prometheus scrapes it."""
        return f"http://{self._host}:{self.port}/metrics"

    def page(self) -> str:
        """What a scrape gets now, in Prometheus' text format."""
        return generate_latest(self._registry).decode()

    async def open(self) -> None:
        """Bind the port, join the deployment and start following its events."""
        if self._server is not None or self._closed:
            return
        try:
            self._server, _ = start_http_server(
                self._asked, addr=self._host, registry=self._registry
            )
        except OSError as exc:
            raise ConfigError(
                f"prometheus port: cannot serve on {self._host}:{self._asked}: {exc.strerror}"
            ) from None
        try:
            await self._events.open()
        except BaseException:
            await self.close()
            raise
        self._task = asyncio.create_task(self._follow(), name="govmesh-prometheus")

    async def serve_final(self, linger_s: float) -> dict[str, int | bool]:
        """Count every event the deployment's stream holds now, then serve until a scrape
        has read those figures, for at most ``linger_s`` seconds: a run that ends between
        two of Prometheus' scrapes still has its final figures scraped once.

        Returns:
            ``counted_seq``: the stream sequence number counted up to; ``caught_up``:
            whether that is all the stream held (False when following it fell more than
            30 s behind, or stopped); ``scraped``: whether a scrape read them.
        """
        target = await self._events.latest_seq()
        deadline = time.monotonic() + _CATCH_UP_S
        task = self._task
        while self._counted_seq < target and time.monotonic() < deadline:
            if task is None or task.done():
                break
            await asyncio.sleep(_POLL_S)
        caught_up = self._counted_seq >= target
        if not caught_up:
            log.warning(
                "the Prometheus endpoint counted the stream to %d of %d",
                self._counted_seq,
                target,
            )
        scraped = self._witness.scraped
        scraped.clear()
        until = time.monotonic() + linger_s
        while not scraped.is_set() and time.monotonic() < until:
            await asyncio.sleep(_POLL_S)
        return {
            "counted_seq": self._counted_seq,
            "caught_up": caught_up,
            "scraped": scraped.is_set(),
        }

    async def close(self) -> None:
        """Stop following the events and serving; what was not scraped is lost. Safe to
        call twice."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._events.close()
        server, self._server = self._server, None
        if server is not None:
            # serve_forever runs on the server's own thread; shutdown waits for it.
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        self._provider.shutdown()

    async def __aenter__(self) -> PrometheusEndpoint:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _follow(self) -> None:
        try:
            async for event in self._events:
                try:
                    self.record(event)
                except EventError as exc:
                    # Signed by a trusted member, yet not the body its kind has.
                    log.warning("not counted: %s", exc)
        except GovmeshError:
            # Metrics are a view: a deployment gone wrong must not take its run down.
            log.exception("the Prometheus endpoint stopped following the deployment")

    def record(self, event: Event) -> None:
        """Record what ``event`` says into the endpoint's instruments."""
        self._counted_seq = max(self._counted_seq, event.seq)
        match event.kind:
            case "Decision":
                decision = event.decode(Decision)
                settles = decision.final and bool(decision.approval_id)
                # Governance answers an intent asked again with the same decision, and
                # counts it once; so does this.
                key = (decision.workflow, decision.intent_hash, settles)
                if key in self._decided:
                    return
                self._decided[key] = None
                if len(self._decided) > _DECISIONS_KEPT:
                    self._decided.popitem(last=False)
                record_decision(
                    decision.outcome,
                    source="approval" if settles else "policy",
                    into=self._into,
                )
            case "Usage":
                usage = event.decode(Usage)
                record_model_usage(
                    {"gen_ai.request.model": usage.model},
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    cost_usd=usage.cost_usd,
                    into=self._into,
                )
            case "SecurityEvent":
                reported = event.decode(SecurityEvent)
                self._into.security_rejections.add(1, {"govmesh.security.reason": reported.reason})

    def refused(self, message: RefusedMessage) -> None:
        """Count ``message``, refused on the stream, as a security rejection."""
        self._counted_seq = max(self._counted_seq, message.seq)
        self._into.security_rejections.add(1, {"govmesh.security.reason": message.reason})
