"""Embedded nats-server, Redis-protocol server and Ray, or connections to external ones."""

from govmesh.runtime._admission import ENV_NATS_ADMISSION, AdmissionServer, admitted_transport
from govmesh.runtime._home import (
    ENV_HOME,
    OPERATOR_MEMBER,
    WATCH_MEMBER,
    JoinedDeployment,
    NotRunning,
    advertise,
    join,
    join_when_up,
)
from govmesh.runtime._latency import ENV_LOW_LATENCY, CpuLatencyHold, LowLatency
from govmesh.runtime._llama import (
    ENV_LOCAL_MODEL_KEY,
    ENV_LOCAL_MODEL_URL,
    SMOLLM2,
    LocalModelServer,
    smollm2_gguf,
)
from govmesh.runtime._nats import NatsServer, ServerTLS
from govmesh.runtime._nats_cluster import NatsCluster
from govmesh.runtime._placement import AGENT_RESOURCE, PLATFORM_RESOURCE, ActorKind, placement
from govmesh.runtime._redis import RedisServer
from govmesh.runtime._runtime import (
    ENV_NATS_REPLICAS,
    ENV_NATS_URL,
    ENV_RAY_ADDRESS,
    ENV_REDIS_URL,
    Runtime,
)
from govmesh.runtime._transport import (
    ENV_NATS_CA,
    ENV_NATS_CA_KEY,
    ENV_NATS_CERT,
    ENV_NATS_KEY,
    Member,
    Transport,
)

__all__ = [
    "AGENT_RESOURCE",
    "ENV_HOME",
    "ENV_LOCAL_MODEL_KEY",
    "ENV_LOCAL_MODEL_URL",
    "ENV_LOW_LATENCY",
    "ENV_NATS_ADMISSION",
    "ENV_NATS_CA",
    "ENV_NATS_CA_KEY",
    "ENV_NATS_CERT",
    "ENV_NATS_KEY",
    "ENV_NATS_REPLICAS",
    "ENV_NATS_URL",
    "ENV_RAY_ADDRESS",
    "ENV_REDIS_URL",
    "OPERATOR_MEMBER",
    "PLATFORM_RESOURCE",
    "SMOLLM2",
    "WATCH_MEMBER",
    "ActorKind",
    "AdmissionServer",
    "CpuLatencyHold",
    "JoinedDeployment",
    "LocalModelServer",
    "LowLatency",
    "Member",
    "NatsCluster",
    "NatsServer",
    "NotRunning",
    "RedisServer",
    "Runtime",
    "ServerTLS",
    "Transport",
    "admitted_transport",
    "advertise",
    "join",
    "join_when_up",
    "placement",
    "smollm2_gguf",
]
