"""Where a deployment's Ray actors run: platform actors and agents apart, when the cluster
says how.

A Ray cluster built from ``deploy/cluster.yaml`` (or its KubeRay manifest) gives its head
node the custom resource `PLATFORM_RESOURCE` and its worker nodes `AGENT_RESOURCE`. Each
platform actor then asks for one unit of the first and each agent actor for one unit of
the second, so agents (user code, model calls) never share a node with governance, the
gateway, the budget and state actors, and each node hosts at most as many actors as it
offers units. A cluster that offers neither resource (a laptop, a test's Ray) places
actors anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

__all__ = ["AGENT_RESOURCE", "PLATFORM_RESOURCE", "ActorKind", "placement"]

PLATFORM_RESOURCE: Final = "govmesh_platform"
"""Custom Ray resource of the nodes that host platform actors; one unit per actor."""
AGENT_RESOURCE: Final = "govmesh_agent"
"""Custom Ray resource of the nodes that host agent actors; one unit per actor."""

ActorKind = Literal["platform", "agent"]


def placement(kind: ActorKind, cluster_resources: Mapping[str, float]) -> dict[str, float]:
    """The custom resources an actor of `kind` asks Ray for: one unit of its kind's
    resource when the cluster (`ray.cluster_resources()`) offers it, none otherwise."""
    resource = AGENT_RESOURCE if kind == "agent" else PLATFORM_RESOURCE
    return {resource: 1.0} if cluster_resources.get(resource, 0) > 0 else {}
