"""The scale-out configuration: ``deploy/cluster.yaml`` as Ray's own cluster launcher reads
it, the KubeRay manifest beside it, and the settings that point govmesh at a NATS cluster."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from govmesh.config import Deployment, nats_servers
from govmesh.errors import ConfigError
from govmesh.runtime import AGENT_RESOURCE, PLATFORM_RESOURCE, Runtime, placement

DEPLOY = Path(__file__).parent.parent / "deploy"


def _load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_cluster_yaml_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does with the file before it talks to the cloud: fill in the
    # provider's defaults, then check the result against Ray's schema.
    config = prepare_config(copy.deepcopy(_load("cluster.yaml")))
    validate_config(config)

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert set(head["resources"]) == {PLATFORM_RESOURCE}
    assert workers and all(set(t["resources"]) == {AGENT_RESOURCE} for t in workers)
    assert any("pip install" in c and "govmesh" in c for c in config["setup_commands"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)


def test_cluster_yaml_with_a_misspelt_field_fails_rays_validation() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(_load("cluster.yaml"))
    config["available_node_types"]["govmesh.worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


def test_kuberay_manifest_sets_the_same_nodes_apart_with_token_auth() -> None:
    cluster = _load("raycluster.yaml")
    spec = cluster["spec"]

    def offered(group: dict[str, Any]) -> set[str]:
        # rayStartParams pass `--resources` a quoted JSON object, as KubeRay documents.
        return set(json.loads(json.loads(group["rayStartParams"]["resources"])))

    assert cluster["kind"] == "RayCluster" and spec["authOptions"]["mode"] == "token"
    assert offered(spec["headGroupSpec"]) == {PLATFORM_RESOURCE}
    assert all(offered(g) == {AGENT_RESOURCE} for g in spec["workerGroupSpecs"])


def test_actors_ask_for_their_nodes_resource_only_where_the_cluster_offers_it() -> None:
    offered = {"CPU": 4.0, PLATFORM_RESOURCE: 100.0, AGENT_RESOURCE: 200.0}
    assert placement("platform", offered) == {PLATFORM_RESOURCE: 1.0}
    assert placement("agent", offered) == {AGENT_RESOURCE: 1.0}
    assert placement("agent", {"CPU": 2.0}) == {}


def test_a_nats_url_names_every_server_of_a_cluster() -> None:
    url = "tls://n1:4222, tls://n2:4222,tls://n3:4222"
    assert nats_servers(url) == ["tls://n1:4222", "tls://n2:4222", "tls://n3:4222"]
    with pytest.raises(ConfigError, match="empty entry"):
        nats_servers("tls://n1:4222,,tls://n2:4222")


@pytest.mark.parametrize("replicas", [0, 6])
def test_a_deployment_refuses_replicas_jetstream_cannot_have(replicas: int) -> None:
    with pytest.raises(ConfigError, match=f"replicas must be between 1 and 5, got {replicas}"):
        Deployment(
            tenant="t",
            nats_url="nats://a",
            redis_url="",
            audience="a",
            issuers=(),
            replicas=replicas,
        )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GOVMESH_NATS_REPLICAS": "3"}, "needs GOVMESH_NATS_URL"),
        (
            {"GOVMESH_NATS_URL": "tls://a:4222,tls://b:4222", "GOVMESH_NATS_REPLICAS": "three"},
            "GOVMESH_NATS_REPLICAS='three'",
        ),
        ({"GOVMESH_NATS_URL": "tls://a:4222,redis://b:6379"}, "expected a URL starting"),
    ],
)
async def test_the_runtime_refuses_nats_cluster_settings_it_cannot_honour(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("GOVMESH_NATS_URL", "GOVMESH_NATS_REPLICAS", "GOVMESH_REDIS_URL", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        async with Runtime(start_ray=False):
            pass
