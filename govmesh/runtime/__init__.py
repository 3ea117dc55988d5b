"""Embedded nats-server, Redis-protocol server and Ray, or connections to external ones."""

from govmesh.runtime._nats import NatsServer
from govmesh.runtime._redis import RedisServer
from govmesh.runtime._runtime import ENV_NATS_URL, ENV_RAY_ADDRESS, ENV_REDIS_URL, Runtime

__all__ = [
    "ENV_NATS_URL",
    "ENV_RAY_ADDRESS",
    "ENV_REDIS_URL",
    "NatsServer",
    "RedisServer",
    "Runtime",
]
