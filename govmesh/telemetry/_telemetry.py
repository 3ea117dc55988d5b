"""Telemetry export: where this process's spans and metrics go, chosen by its environment.

govmesh exports only when told to, and only where it is told:

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
  and ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``) sends that signal over OTLP (HTTP/protobuf);
- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` choose explicitly among ``otlp``,
  ``console`` (to stderr) and ``none``, comma-separated;
- ``OTEL_SDK_DISABLED=true`` turns everything off.

With none of them set nothing is installed at all: the OpenTelemetry API stays on its
no-op providers and tracing costs nothing (see `govmesh.telemetry._tracing`). govmesh
never exports anywhere else by default. The OTLP exporter reads the rest of the standard
variables itself (``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT``, ``..._CERTIFICATE``), and
the metric reader ``OTEL_METRIC_EXPORT_INTERVAL``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Final, Literal, cast

import msgspec
from opentelemetry import metrics, trace
from opentelemetry.metrics._internal import _ProxyMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from govmesh.errors import ConfigError

__all__ = ["Telemetry", "TelemetrySettings", "configure_telemetry"]

log = logging.getLogger(__name__)

Exporter = Literal["otlp", "console"]
Signal = Literal["traces", "metrics"]

_EXPORTERS: Final[frozenset[str]] = frozenset({"otlp", "console", "none"})
_PROTOCOL: Final = "http/protobuf"
_LOCAL_COLLECTOR: Final = "http://localhost:4318"
"""The OTLP/HTTP endpoint the OpenTelemetry specification names for an explicit
``OTEL_<SIGNAL>_EXPORTER=otlp`` without any endpoint: a collector on this machine."""


class TelemetrySettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where this process's spans and metrics go.

    Attributes:
        service_name: the ``service.name`` of everything exported.
        traces: the span exporters; none means no tracer provider is installed.
        metrics: the metric exporters; none means no meter provider is installed.
        traces_endpoint: the OTLP URL spans are posted to, when ``traces`` has ``otlp``.
        metrics_endpoint: the OTLP URL metrics are posted to, when ``metrics`` has ``otlp``.
    """

    service_name: str = "govmesh"
    traces: tuple[Exporter, ...] = ()
    metrics: tuple[Exporter, ...] = ()
    traces_endpoint: str = ""
    metrics_endpoint: str = ""

    @property
    def enabled(self) -> bool:
        """Whether anything is exported at all."""
        return bool(self.traces or self.metrics)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TelemetrySettings:
        """The settings the standard OpenTelemetry variables in ``environ`` ask for (see the
        module docs).

        Raises:
            ConfigError: an exporter other than ``otlp``, ``console`` or ``none``, or an
                OTLP protocol other than ``http/protobuf``.
        """
        service_name = environ.get("OTEL_SERVICE_NAME", "").strip() or "govmesh"
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(service_name=service_name)
        traces, traces_endpoint = _signal(environ, "traces")
        metrics_, metrics_endpoint = _signal(environ, "metrics")
        return cls(
            service_name=service_name,
            traces=traces,
            metrics=metrics_,
            traces_endpoint=traces_endpoint,
            metrics_endpoint=metrics_endpoint,
        )


def _signal(environ: Mapping[str, str], signal: Signal) -> tuple[tuple[Exporter, ...], str]:
    """The exporters of ``signal`` and, with ``otlp`` among them, its OTLP endpoint."""
    upper = signal.upper()
    endpoint = environ.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "").strip()
    if not endpoint:
        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip().rstrip("/")
        # The specification's rule: the generic endpoint gets the signal's path appended,
        # a per-signal endpoint is used as it is.
        endpoint = f"{base}/v1/{signal}" if base else ""
    variable = f"OTEL_{upper}_EXPORTER"
    chosen = environ.get(variable, "").strip().lower()
    names = [n.strip() for n in chosen.split(",") if n.strip()] if chosen else []
    if not chosen and endpoint:
        names = ["otlp"]
    for name in names:
        if name not in _EXPORTERS:
            raise ConfigError(
                f"{variable}={chosen!r}: govmesh exports with "
                f"{', '.join(sorted(_EXPORTERS))}; got {name!r}"
            )
    exporters = tuple(cast(Exporter, n) for n in dict.fromkeys(names) if n != "none")
    if "otlp" not in exporters:
        return exporters, ""
    for protocol_variable in (
        f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ):
        protocol = environ.get(protocol_variable, "").strip()
        if protocol:
            if protocol != _PROTOCOL:
                raise ConfigError(
                    f"{protocol_variable}={protocol!r}: govmesh exports OTLP over {_PROTOCOL} only"
                )
            break
    return exporters, endpoint or f"{_LOCAL_COLLECTOR}/v1/{signal}"


class Telemetry:
    """The tracer and meter providers `configure_telemetry` installed in this process.

    Spans are batched and metrics read periodically in background threads; `close` sends
    what is pending and stops both (a process that exits without closing still sends it at
    exit, through the SDK's own exit hook; one killed outright loses it).

    Args:
        settings: what was configured.
        tracer_provider: the installed tracer provider, if traces are exported.
        meter_provider: the installed meter provider, if metrics are exported.
    """

    def __init__(
        self,
        settings: TelemetrySettings,
        *,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
    ) -> None:
        self.settings = settings
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self._closed = False

    def close(self) -> None:
        """Export what is pending and stop exporting. Blocks until it is sent or the
        exporters' timeouts pass; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


_lock = threading.Lock()
_configured: list[Telemetry | None] = []
"""What this process configured: empty until `configure_telemetry` first succeeds."""


def configure_telemetry(*, member: str = "") -> Telemetry | None:
    """Install this process's tracer and meter providers as its environment asks (see the
    module docs); None when it asks for nothing, and then nothing is installed.

    Once per process: later calls return what the first one installed. A signal whose
    provider the application installed already (a test's in-memory exporter) is left to it.

    Args:
        member: the bus member or actor this process hosts, exported as the resource
            attribute ``govmesh.member`` so each actor's telemetry is told apart.

    Raises:
        ConfigError: the environment names an exporter or protocol govmesh does not have
            (see `TelemetrySettings.from_env`); nothing is installed, and a later call
            reads the environment again.
    """
    with _lock:
        if _configured:
            return _configured[0]
        settings = TelemetrySettings.from_env(os.environ)
        installed = _install(settings, member) if settings.enabled else None
        _configured.append(installed)
        return installed


def _install(settings: TelemetrySettings, member: str) -> Telemetry:
    attributes: dict[str, str | int] = {
        "service.name": settings.service_name,
        "process.pid": os.getpid(),
    }
    if member:
        attributes["govmesh.member"] = member
    # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES; the attributes given here win.
    resource = Resource.create(attributes)
    tracer_provider: TracerProvider | None = None
    if settings.traces and _unset(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        tracer_provider = TracerProvider(resource=resource)
        for exporter in settings.traces:
            tracer_provider.add_span_processor(
                BatchSpanProcessor(_span_exporter(exporter, settings.traces_endpoint))
            )
        trace.set_tracer_provider(tracer_provider)
    meter_provider: MeterProvider | None = None
    if settings.metrics and _unset(metrics.get_meter_provider(), _ProxyMeterProvider):
        readers = [
            PeriodicExportingMetricReader(_metric_exporter(e, settings.metrics_endpoint))
            for e in settings.metrics
        ]
        meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        metrics.set_meter_provider(meter_provider)
    log.info(
        "telemetry of %s: traces to %s, metrics to %s",
        member or settings.service_name,
        _where(settings.traces, settings.traces_endpoint) if tracer_provider else "nowhere",
        _where(settings.metrics, settings.metrics_endpoint) if meter_provider else "nowhere",
    )
    return Telemetry(settings, tracer_provider=tracer_provider, meter_provider=meter_provider)


def _unset(provider: object, proxy: type) -> bool:
    """Whether ``provider`` is the API's placeholder, i.e. nobody installed one yet."""
    if isinstance(provider, proxy):
        return True
    log.info("a %s is installed already; govmesh leaves it in place", type(provider).__name__)
    return False


def _where(exporters: tuple[Exporter, ...], endpoint: str) -> str:
    return ", ".join(endpoint if e == "otlp" else "stderr" for e in exporters)


def _span_exporter(exporter: Exporter, endpoint: str) -> SpanExporter:
    if exporter == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    # Deferred: the OTLP exporter pulls in requests and protobuf, which a process that
    # exports nothing never needs.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint)


def _metric_exporter(exporter: Exporter, endpoint: str) -> MetricExporter:
    if exporter == "console":
        return ConsoleMetricExporter(out=sys.stderr)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(endpoint=endpoint)
