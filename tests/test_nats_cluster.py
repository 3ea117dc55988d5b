"""The NATS cluster layout on one machine: three mutual-TLS nodes joined by routes over
mutual TLS. Losing a node, in the middle of a run, is `tests/test_multinode.py`'s."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from govmesh.identity import DeploymentCA
from govmesh.runtime import NatsCluster, NatsServer, ServerTLS, Transport
from govmesh.runtime._nats import ClusterRoutes
from govmesh.runtime._process import free_port


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    _, nats = Transport.embedded_cluster(tmp_path / "cluster")
    nats.start()
    try:
        yield nats
    finally:
        nats.close()


def test_a_node_with_another_cas_certificate_cannot_join_the_cluster(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    # It trusts the deployment's CA, whose certificate is public, but cannot show one of its
    # certificates: the nodes refuse its routes, so it never sees the cluster's messages.
    cert, key = DeploymentCA.create("intruder").server_cert(routes=True)
    (tmp_path / "x.pem").write_bytes(cert)
    (tmp_path / "x-key.pem").write_bytes(key)
    first = cluster.nodes[0]
    assert first.tls is not None and first.cluster is not None
    intruder = NatsServer(
        workdir=tmp_path / "intruder",
        tls=ServerTLS(
            cert_file=tmp_path / "x.pem", key_file=tmp_path / "x-key.pem", ca_file=first.tls.ca_file
        ),
        cluster=ClusterRoutes(
            cluster=cluster.name,
            server_name="intruder",
            port=free_port(),
            routes=(f"nats-route://127.0.0.1:{first.cluster.port}",),
        ),
    )
    with intruder:
        deadline = time.monotonic() + 10
        while "Router connection closed: TLS Handshake Failure" not in first.log_path.read_text():
            assert time.monotonic() < deadline, "the node never refused the intruder's route"
            time.sleep(0.05)
    # A route that got past TLS would have told the nodes the intruder's server name.
    assert not [n for n in cluster.nodes if "intruder" in n.log_path.read_text()]
