"""Tracing: OpenTelemetry spans for handlers, model calls, tool calls, decisions and state
transitions, with the W3C trace context carried in every envelope, so one workflow is one
trace across every actor and process.

govmesh only calls the OpenTelemetry API. Nothing is recorded or sent anywhere unless the
process installs a tracer provider (an application, or a test with an in-memory exporter);
without one every span is a no-op.

Names follow the OpenTelemetry GenAI conventions where they apply (``gen_ai.*``: model calls
``chat {model}``, tool calls ``execute_tool {tool}``, agents ``invoke_agent {agent}``);
what is govmesh's own is under ``govmesh.*``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["current_traceparent", "span", "tracer"]

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_NAME: Final = "govmesh"


def tracer() -> trace.Tracer:
    """govmesh's tracer, from whatever tracer provider the process installed."""
    return trace.get_tracer(_NAME)


def _recording() -> bool:
    """Whether the process installed a tracer provider; until then there is nothing to
    record, and the bus's hot path skips parsing and making trace contexts."""
    # `get_tracer_provider` looks up an environment variable on every call while no provider
    # is set, a few microseconds on each message; the API's own global answers first.
    if getattr(trace, "_TRACER_PROVIDER", _UNSET) is None and not _PROVIDER_FROM_ENV:
        return False
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


_UNSET: Final = object()
_PROVIDER_FROM_ENV: Final = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the span now active, or "" outside any span (and always
    "" while nothing records spans)."""
    if not _recording():
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


@contextmanager
def span(
    name: str,
    *,
    traceparent: str = "",
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span named ``name``, child of the span now active or, when ``traceparent`` is
    given (a message's trace context), of that; attributes with None values are left out.
    While nothing records spans it yields a span that records nothing, at no cost."""
    if not _recording():
        yield trace.INVALID_SPAN
        return
    parent = (
        _PROPAGATOR.extract({"traceparent": traceparent})
        if traceparent
        else otel_context.get_current()
    )
    clean = {k: v for k, v in (attributes or {}).items() if v is not None}
    with tracer().start_as_current_span(name, context=parent, kind=kind, attributes=clean) as s:
        yield s
