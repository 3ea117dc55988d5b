"""A NATS cluster on this machine: several nats-server nodes joined by routes over mutual
TLS, JetStream clustered, every node requiring mutual TLS from its clients.

It is the supported NATS cluster layout (``docs/deployment.md``) on loopback: three nodes,
route TLS, the deployment's streams with three replicas, so any one node can fail while a
run goes on. A deployment connects to all of its nodes (`NatsCluster.url`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

from govmesh.errors import ConfigError, RuntimeStartError
from govmesh.runtime._callout import AuthCallout
from govmesh.runtime._nats import ClusterRoutes, NatsServer, ServerTLS
from govmesh.runtime._process import free_port, read_log

__all__ = ["NatsCluster"]

_LEADER_LINES: Final = ("new metadata leader", "Self is new JetStream cluster metadata leader")
_POLL_S: Final = 0.05


class NatsCluster:
    """`size` nats-server nodes on free 127.0.0.1 ports, each in ``workdir/<name>``.

    Every node serves the same `ServerTLS` files (a certificate valid for routes too, see
    `DeploymentCA.server_cert`) and admits members through `callout`, as nodes on other
    machines do: no node's configuration names a member. `start` starts every node, waits
    until JetStream has elected its metadata leader and starts the callout service; `close`
    stops them all and is safe to call twice.

    Args:
        workdir: the nodes' directories go here.
        tls: the nodes' TLS files.
        callout: the auth callout service that admits the members.
        size: how many nodes (3 for JetStream replicas 3).
        name: the cluster's name.

    Attributes:
        nodes: the nodes, in order; a node can be stopped and started again on its ports.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        tls: ServerTLS,
        callout: AuthCallout,
        size: int = 3,
        name: str = "govmesh",
    ) -> None:
        if size < 1:
            raise ConfigError(f"a NATS cluster needs at least one node, got size={size!r}")
        self.name = name
        self.callout = callout
        ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(
                workdir=Path(workdir) / f"n{i + 1}",
                tls=tls,
                callout=callout.config,
                cluster=ClusterRoutes(
                    cluster=name,
                    server_name=f"n{i + 1}",
                    port=port,
                    routes=tuple(f"nats-route://127.0.0.1:{p}" for p in ports if p != port),
                ),
            )
            for i, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: what ``GOVMESH_NATS_URL`` names."""
        return ",".join(node.url for node in self.nodes)

    def start(self, *, timeout: float = 30.0) -> None:
        """Start every node, wait until JetStream has a metadata leader, and start the
        callout service.

        Raises:
            RuntimeStartError: a node or the callout service did not start, or no leader
                was elected within `timeout` seconds; every node is stopped then.
        """
        try:
            for node in self.nodes:
                node.start()
            self._wait_for_leader(timeout)
            self.callout.start(self.url)
        except BaseException:
            self.close()
            raise

    def _wait_for_leader(self, timeout: float) -> None:
        # Streams can be created only once the nodes agree on who manages them.
        deadline = time.monotonic() + timeout
        while True:
            logs = [read_log(node.log_path) for node in self.nodes]
            if all(any(line in text for line in _LEADER_LINES) for text in logs):
                return
            if time.monotonic() > deadline:
                raise RuntimeStartError(
                    f"NATS cluster {self.name!r} elected no JetStream leader within "
                    f"{timeout:g} s; see {[str(node.log_path) for node in self.nodes]}"
                )
            time.sleep(_POLL_S)

    def close(self) -> None:
        """Stop the callout service and every node. Safe to call twice."""
        self.callout.close()
        for node in self.nodes:
            node.close()

    def __repr__(self) -> str:
        return f"NatsCluster({self.name!r}, nodes={self.nodes!r})"
