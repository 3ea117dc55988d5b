"""Shared fixtures: real nats-server, Redis-protocol server and Ray, one per test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from govmesh.runtime import NatsServer, RedisServer, Transport


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free port, shared by the session."""
    with NatsServer(workdir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis-protocol server on a free port, shared by the session."""
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance for the session (2 CPUs), shut down at the end."""
    import ray  # deferred: only sessions that use Ray pay for importing it

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


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
