"""The base of every actor's logic, and the thin Ray wrapper that hosts it.

Actor logic is plain async Python (a `Service`) so it can be tested without Ray;
`ServiceActor` is the only ``@ray.remote`` class and merely hosts one service.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray
import redis.asyncio as aioredis

from govmesh._tasks import being_cancelled, raise_if_cancelled
from govmesh.bus import Bus
from govmesh.config import Deployment
from govmesh.identity import EnrolRequest, Grant, Identity, MemberKeys
from govmesh.telemetry._telemetry import configure_telemetry

__all__ = ["Service", "ServiceActor", "being_cancelled", "raise_if_cancelled"]

log = logging.getLogger(__name__)


class Service:
    """A bus member with a Redis connection; subclasses subscribe in `on_start`.

    Args:
        deployment: where the services are and whom to trust.
        identity: this member's identity.
    """

    def __init__(self, deployment: Deployment, identity: Identity) -> None:
        self.deployment = deployment
        self.identity = identity
        self._bus: Bus | None = None
        self._redis: aioredis.Redis | None = None

    @property
    def bus(self) -> Bus:
        """The bus connection; available after `start`."""
        if self._bus is None:
            raise RuntimeError(f"{self.identity.agent_id} is not started")
        return self._bus

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis connection; available after `start`."""
        if self._redis is None:
            raise RuntimeError(f"{self.identity.agent_id} is not started")
        return self._redis

    @property
    def subjects(self) -> Any:
        """The tenant's subject builder."""
        return self.bus.subjects

    def key(self, *parts: str) -> str:
        """A Redis key under this tenant's prefix."""
        return ":".join((self.deployment.key_prefix, *parts))

    async def start(self) -> None:
        """Connect to NATS and Redis, then subscribe (`on_start`)."""
        # A blocking pool makes bursts wait for a connection instead of failing with
        # "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            self.deployment.redis_url, max_connections=32, timeout=30
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._bus = await Bus.connect(self.deployment, self.identity)
        await self.on_start()
        await self._bus.flush()

    async def on_start(self) -> None:
        """Subscribe to what this service handles."""

    def stats(self) -> dict[str, Any]:
        """Counters for tests and reports."""
        rejected = dict(self._bus.rejected) if self._bus else {}
        return {"agent": self.identity.agent_id, "rejected": rejected}

    async def close(self) -> None:
        """Close the bus (cancelling running handlers) and Redis. Safe to call twice."""
        if self._bus is not None:
            await self._bus.close()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


@ray.remote(num_cpus=0, max_restarts=-1)
class ServiceActor:
    """Hosts one `Service` in a Ray actor process; talks to the others only over the bus.

    The member's private keys are made here, in the actor's process, and never leave it:
    the driver gets their public halves (`enrolment_request`) and hands back a token and a
    certificate for them (`start`). Nothing secret travels in the actor's arguments.

    Ray restarts an actor whose process dies, by constructing it again: the new process
    makes new keys, and the restarted actor rejoins the bus once the swarm's supervisor has
    enrolled them (`ensure_started`). What it must remember comes back from Redis and the
    state actor, never from the dead process.

    Args:
        service_type: the service to host.
        kwargs: its options, except its identity.
        member_id: the member it is.
        role: the member's role.
    """

    def __init__(
        self, service_type: type[Service], kwargs: dict[str, Any], *, member_id: str, role: str
    ) -> None:
        self._keys = MemberKeys(member_id, role)
        self._service = service_type(identity=self._keys.identity, **kwargs)
        self._started: asyncio.Task[None] | None = None
        # The actor is a process of its own: its telemetry goes where the environment Ray
        # handed on from the driver says, tagged with the member it hosts.
        self._telemetry = configure_telemetry(member=member_id)

    async def enrolment_request(self) -> EnrolRequest:
        """The public halves of this process's keys, for the driver to certify."""
        return self._keys.request()

    async def start(self, granted: Grant) -> str:
        """Start the hosted service with `granted`; returns its agent id once subscribed."""
        await self.ensure_started(granted)
        return self._service.identity.agent_id

    async def is_started(self) -> bool:
        """Whether the hosted service was started in this process (False after a restart)."""
        return self._started is not None

    async def ensure_started(self, granted: Grant) -> bool:
        """Start the hosted service unless it is started; returns whether this call did.

        Args:
            granted: the token and certificate for this process's keys; ignored once
                started.

        Concurrent calls share one start.

        Raises:
            SecurityError: `granted` is not for this process's keys (say, it was made for
                the process Ray replaced meanwhile); nothing is started.
        """
        if self._started is None:
            self._keys.accept(granted, self._service.deployment)
            self._started = asyncio.ensure_future(self._service.start())
            await self._started
            return True
        await self._started
        return False

    async def pid(self) -> int:
        """The actor's process id (tests kill it to check recovery)."""
        return os.getpid()

    async def node_id(self) -> str:
        """The Ray node the actor runs on (hex)."""
        return ray.get_runtime_context().get_node_id()

    async def stats(self) -> dict[str, Any]:
        """The hosted service's counters."""
        return self._service.stats()

    async def close(self) -> None:
        """Stop the hosted service, then send the telemetry still pending."""
        await self._service.close()
        if self._telemetry is not None:
            await asyncio.to_thread(self._telemetry.close)
