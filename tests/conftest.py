"""Shared fixtures: real nats-server, Redis-protocol server, Ray and a local model server, one
per test session, and an in-memory reader of the process's metrics."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from govmesh.runtime import LocalModelServer, NatsServer, RedisServer, Transport


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free port, shared by the session."""
    with NatsServer(workdir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis-protocol server on a private Unix socket with a password, shared by the
    session; tests connect with ``redis_server.url`` (the platform user) and, for commands
    only an administrator may run (``MONITOR``, ``CLIENT KILL``), ``redis_server.admin_url``."""
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance for the session (2 CPUs), shut down at the end."""
    import ray  # deferred: only sessions that use Ray pay for importing it

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tracer_provider() -> TracerProvider:
    """The process's tracer provider (OpenTelemetry takes one per process), set on first
    use; tests add exporters of their own to it."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    return provider


@pytest.fixture(scope="session")
def local_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalModelServer]:
    """llama-cpp-python's OpenAI-compatible server running SmolLM2-135M-Instruct on CPU on
    a free port, shared by the session; stopped at its end, and killed with this process if
    it is killed (the server's death signal)."""
    with LocalModelServer(workdir=tmp_path_factory.mktemp("llama")) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A short unique prefix for this test's subjects, streams and keys."""
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def secure_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Transport, NatsServer]]:
    """A nats-server with mutual TLS, verify_and_map and per-member permissions, shared by
    the session; tests admit their members through the transport."""
    transport, server = Transport.embedded(tmp_path_factory.mktemp("mtls"))
    with server:
        yield transport, server


class Readings:
    """Metric points recorded between two reads, by metric name."""

    def __init__(self, points: dict[str, list[tuple[dict[str, Any], Any]]]) -> None:
        self.points = points

    def _matching(self, name: str, where: Mapping[str, Any] | None) -> list[Any]:
        return [
            point
            for attributes, point in self.points.get(name, [])
            if all(attributes.get(k) == v for k, v in (where or {}).items())
        ]

    def total(self, name: str, where: Mapping[str, Any] | None = None) -> float:
        """The sum of a counter's, or of a histogram's, points whose attributes include
        ``where``."""
        return sum(getattr(p, "value", getattr(p, "sum", 0)) for p in self._matching(name, where))

    def count(self, name: str, where: Mapping[str, Any] | None = None) -> int:
        """How many values a histogram recorded with attributes that include ``where``."""
        return sum(p.count for p in self._matching(name, where))


class MetricReader:
    """Reads what the process's meter provider recorded since the previous read."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self._reader = reader

    def read(self) -> Readings:
        """The points recorded since the previous read (the first read: since the start)."""
        points: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        data = self._reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        points.setdefault(metric.name, []).append((dict(point.attributes), point))
        return Readings(points)


@pytest.fixture(scope="session")
def metric_reader() -> MetricReader:
    """The process's meter provider (one per process), read in deltas: a test reads once
    to skip what came before it, works, and reads what its work recorded."""
    delta = AggregationTemporality.DELTA
    reader = InMemoryMetricReader(preferred_temporality={Counter: delta, Histogram: delta})
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return MetricReader(reader)
