"""Scale-out on this machine: a Ray cluster of two nodes (separate ``ray start`` processes,
Ray's token authentication on) and a NATS cluster of three nodes (mutual TLS, route TLS,
JetStream replicas 3, members admitted by auth callout). The procurement scenario and the
expenses example each run with platform actors on the head and agents on the worker, while
the worker node and the NATS node that leads the event stream are killed mid-run; the run
must lose nothing."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from govmesh.bus import Bus
from govmesh.roles import AUDITOR_ROLE
from govmesh.runtime import AGENT_RESOURCE, PLATFORM_RESOURCE, NatsCluster, Transport
from govmesh.scenarios._app import scenario_app
from govmesh.scenarios._chaos import effects_and_approvals
from govmesh.scenarios._runner import new_issuer, run_workflows
from govmesh.scenarios._runs import RunRecords
from govmesh.scenarios._swarm import Swarm
from govmesh.subjects import Subjects

from _ray_cluster import RayCluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).parent.parent


def nodes_with(resource: str) -> set[str]:
    """The live Ray nodes that offer `resource`."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource)}


WORKFLOWS = 6
"""Enough that workflows are in flight on either side of the strike, few for two cores."""


@pytest.fixture(scope="module")
def nats_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Transport, NatsCluster]]:
    """Three mutual-TLS nats-server nodes with route TLS and clustered JetStream."""
    transport, cluster = Transport.embedded_cluster(tmp_path_factory.mktemp("natsc"))
    cluster.start()
    try:
        yield transport, cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A head and a worker node, and this process as a driver of theirs. A Ray this
    process ran before (the session's) is shut down first and started again after."""
    import ray

    had_local = ray.is_initialized()
    ray.shutdown()
    try:
        with RayCluster() as cluster:
            ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
            try:
                yield cluster
            finally:
                ray.shutdown()
    finally:
        if had_local:  # as the session's fixture started it
            ray.init(
                num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
            )


class NodeFailures:
    """Once a third of the workflows finished: SIGKILL the Ray worker node and the NATS
    node that leads the tenant's event stream, then start a new worker node (what the
    autoscaler does for ``min_workers``) and the NATS node again."""

    def __init__(self, ray_cluster: RayCluster, nats: NatsCluster, tenant: str) -> None:
        self.ray_cluster = ray_cluster
        self.nats = nats
        self.tenant = tenant
        self.placed: dict[str, str] = {}
        self.head: set[str] = set()
        self.worker: set[str] = set()
        self.killed_nats = ""

    async def __call__(self, swarm: Swarm, finished: Callable[[], int]) -> None:
        while finished() < WORKFLOWS // 3:
            await asyncio.sleep(0.1)
        self.placed = await swarm.nodes()
        self.head, self.worker = nodes_with(PLATFORM_RESOURCE), nodes_with(AGENT_RESOURCE)
        leader = await self._stream_leader(swarm)
        node = next(n for n in self.nats.nodes if n.cluster and n.cluster.server_name == leader)
        worker = self.ray_cluster.worker
        assert node.pid is not None and worker is not None
        os.kill(node.pid, signal.SIGKILL)
        self.killed_nats = leader
        self.ray_cluster.kill(worker)
        await self.ray_cluster.add_worker()
        node.start()  # it catches up with the stream from the other two

    async def _stream_leader(self, swarm: Swarm) -> str:
        identity = swarm.issuer.identity("auditor-test", AUDITOR_ROLE)
        assert swarm.transport is not None
        swarm.transport.enrol([identity], tenant=self.tenant)
        bus = await Bus.connect(swarm.deployment, identity, rotate=False)
        try:
            info = await bus.nc.jetstream().stream_info(Subjects(self.tenant).event_stream)
        finally:
            await bus.close()
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader


@pytest.mark.parametrize("scenario", ["procurement.yaml", "expenses.yaml"])
async def test_a_run_loses_nothing_when_a_ray_node_and_a_nats_node_die(
    scenario: str,
    ray_cluster: RayCluster,
    nats_cluster: tuple[Transport, NatsCluster],
    redis_server: Any,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(tmp_path / "home"))
    transport, nats = nats_cluster
    app = scenario_app(ROOT / "scenarios" / scenario)
    app.tenant = prefix
    issuer = new_issuer(prefix)
    deployment = issuer.deployment(
        tenant=prefix, nats_url=nats.url, redis_url=redis_server.url, tls=True, replicas=3
    )
    failures = NodeFailures(ray_cluster, nats, prefix)
    try:
        report = await run_workflows(
            app,
            deployment,
            issuer,
            workflows=WORKFLOWS,
            seed=3,
            concurrency=3,
            transport=transport,
            resend_s=5.0,
            during=failures,
        )
    finally:
        nats.start()  # a node the strike left down, for the next test
    records = RunRecords(redis_server.url, deployment.key_prefix, report["run_id"])
    try:
        outcomes = await records.finished()
    finally:
        await records.close()
    counted = await effects_and_approvals(
        redis_server.url, deployment.key_prefix, outcomes, app.tools
    )

    assert report["workflows"]["finished"] == WORKFLOWS, report["failures"]
    assert counted["duplicate_effects"] == 0, counted["duplicates"]
    assert counted["lost_approvals"] == 0, counted["lost"]
    assert "failed" not in report["workflows"]["results"], report["failures"]
    # Before the strike, platform actors on the head and agents on the worker: two nodes.
    agents = set(app.agent_ids)
    assert {n for a, n in failures.placed.items() if a in agents} == failures.worker
    assert {n for a, n in failures.placed.items() if a not in agents} == failures.head
    assert len(failures.head | failures.worker) == 2
    # The agents came back (on the new worker node: the only one offering them room) and
    # rejoined the bus.
    assert agents <= set(report["actor_restarts"])
    assert nodes_with(AGENT_RESOURCE).isdisjoint(failures.worker)
    # No node's configuration names a member: each agent was admitted by the callout when
    # it started and again when it restarted.
    assert transport.callout is not None
    assert all(transport.callout.admitted[m.role] >= 2 for m in app.agents)
    assert failures.killed_nats
