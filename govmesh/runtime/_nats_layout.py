"""The files of a NATS cluster an operator runs on machines of their own (``govmesh nats
init``): the deployment CA, each node's certificate and configuration, and what the driver
needs to admit a run's members through the nodes' auth callout.

Every node requires mutual TLS from clients and routes, runs JetStream, and asks the auth
callout about any client whose certificate maps to none of its users (`AuthCallout`): its
configuration names the callout's issuer key and the callout service's own user, and no
member, so it never changes from run to run. The keys that can mint an identity (the CA's
and the callout issuer's) go to the ``driver`` directory only, 0600, for the one process
that admits members; a node's directory holds its own key and public material only, and
is what its machine needs.

The CA lives `LAYOUT_CA_TTL` and each node's certificate `LAYOUT_NODE_TTL` unless asked
otherwise; `renew_node_certs` issues the nodes new certificates from the same CA, which a
node takes up on a configuration reload (``nats-server --signal reload``), without a
restart. A reload closes the connections of users its configuration does not list, which
are all the members the callout admitted: they reconnect at once and are admitted again,
as when a node fails over. Members' certificates are the driver's and live a day
(`DEFAULT_CLIENT_TTL`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Final

import msgspec
from cryptography import x509

from govmesh.errors import ConfigError
from govmesh.identity._ca import DeploymentCA
from govmesh.runtime._callout import CalloutConfig, callout_dn, issuer_public_key, new_issuer_seed
from govmesh.runtime._home import write_private
from govmesh.runtime._nats import (
    AUTHORIZATION_FILE,
    ClusterRoutes,
    ServerTLS,
    render_authorization,
    render_nats_config,
)
from govmesh.runtime._runtime import ENV_NATS_REPLICAS, ENV_NATS_URL
from govmesh.runtime._transport import (
    ENV_NATS_CA,
    ENV_NATS_CA_KEY,
    ENV_NATS_CALLOUT_KEY,
)

__all__ = [
    "LAYOUT_CA_TTL",
    "LAYOUT_NODE_TTL",
    "NatsLayout",
    "NatsNode",
    "parse_node",
    "renew_node_certs",
    "write_nats_layout",
]

DEFAULT_CLIENT_PORT: Final = 4222
DEFAULT_ROUTE_PORT: Final = 6222
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_DRIVER_DIR: Final = "driver"
_ENV_FILE: Final = "govmesh.env"
_RECORD_FILE: Final = "layout.json"
LAYOUT_CA_TTL: Final = dt.timedelta(days=3 * 365)
"""How long the CA of an operator's cluster lives: every node's and member's certificate
chains to it, so a new CA means a new layout."""
LAYOUT_NODE_TTL: Final = dt.timedelta(days=365)
"""How long a node's certificate lives; `renew_node_certs` issues the next ones."""


class NatsNode(msgspec.Struct, frozen=True, kw_only=True):
    """One node of the cluster.

    Attributes:
        name: its server name, unique in the cluster, and its directory's name.
        host: the name or address clients and the other nodes reach it at.
        port: its client port.
        route_port: its route port.
    """

    name: str
    host: str
    port: int = DEFAULT_CLIENT_PORT
    route_port: int = DEFAULT_ROUTE_PORT

    @property
    def url(self) -> str:
        """Its client URL, ``tls://HOST:PORT``."""
        return f"tls://{_bracketed(self.host)}:{self.port}"

    @property
    def route(self) -> str:
        """Its route URL, ``nats-route://HOST:ROUTE_PORT``."""
        return f"nats-route://{_bracketed(self.host)}:{self.route_port}"


def _bracketed(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _port(text: str, *, spec: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ConfigError(f"node {spec!r}: {text!r} is not a port (1-65535)")
    return port


def parse_node(spec: str) -> NatsNode:
    """A node from ``NAME=HOST[:PORT[:ROUTE_PORT]]`` (an IPv6 address in brackets).

    Raises:
        ConfigError: the spec does not have that form; the message quotes it.
    """
    name, sep, rest = spec.partition("=")
    if not sep or not _NAME.fullmatch(name) or not rest:
        raise ConfigError(
            f"node {spec!r}: expected NAME=HOST[:PORT[:ROUTE_PORT]], NAME of letters, "
            "digits, '-' and '_'"
        )
    if rest.startswith("["):
        host, bracket, ports = rest[1:].partition("]")
        if not bracket or (ports and not ports.startswith(":")):
            raise ConfigError(f"node {spec!r}: an IPv6 address goes in brackets: [::1]:4222")
        parts = [host, *ports[1:].split(":")] if ports else [host]
    else:
        parts = rest.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ConfigError(f"node {spec!r}: expected NAME=HOST[:PORT[:ROUTE_PORT]]")
    port = _port(parts[1], spec=spec) if len(parts) > 1 else DEFAULT_CLIENT_PORT
    route = _port(parts[2], spec=spec) if len(parts) > 2 else DEFAULT_ROUTE_PORT
    return NatsNode(name=name, host=parts[0], port=port, route_port=route)


class _Record(msgspec.Struct, frozen=True, kw_only=True):
    """What a layout's directory keeps of it (``layout.json``, public): what renewing
    needs."""

    nodes: tuple[NatsNode, ...]
    issuer: str


class NatsLayout(msgspec.Struct, frozen=True, kw_only=True):
    """What `write_nats_layout` wrote.

    Attributes:
        directory: where.
        nodes: the nodes, each with a directory of its own under `directory`.
        env_file: the driver's variables (``GOVMESH_NATS_URL`` and friends).
        environment: those variables.
        issuer: the callout issuer's public key, in every node's configuration.
        ca_expires: when the CA's certificate expires (UTC).
        node_expires: when the nodes' certificates expire (UTC).
    """

    directory: Path
    nodes: tuple[NatsNode, ...]
    env_file: Path
    environment: dict[str, str]
    issuer: str
    ca_expires: dt.datetime
    node_expires: dt.datetime

    def config_of(self, node: NatsNode) -> Path:
        """The node's nats-server configuration file."""
        return self.directory / node.name / "nats-server.conf"


def write_nats_layout(
    directory: Path,
    nodes: list[NatsNode],
    *,
    node_dir: str | None = None,
    store_dir: str | None = None,
    listen: str = "0.0.0.0",
    name: str = "govmesh",
    ca_ttl: dt.timedelta = LAYOUT_CA_TTL,
    node_ttl: dt.timedelta = LAYOUT_NODE_TTL,
) -> NatsLayout:
    """Make a new deployment CA and callout issuer, and write the cluster's files.

    Args:
        directory: a new or empty directory.
        nodes: the cluster's nodes (one, or three or more for JetStream replicas 3).
        node_dir: where a node's files will be on its machine (``{node}`` is replaced by
            its name); default: its directory here, so the cluster runs from here.
        store_dir: each node's JetStream directory (``{node}`` likewise); default
            ``jetstream`` in the node's directory.
        listen: the address nodes listen on for clients and routes.
        name: the cluster's name.
        ca_ttl: how long the CA lives.
        node_ttl: how long each node's certificate lives.

    Raises:
        ConfigError: `directory` is not empty, no nodes, two nodes share a name, or a host
            and port, or a lifetime is not positive or outlives the CA.
    """
    directory = Path(directory).absolute()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(
            f"{str(directory)!r} exists and is not an empty directory; govmesh never "
            "overwrites a deployment's keys"
        )
    if not nodes:
        raise ConfigError("a NATS cluster needs at least one node (--node NAME=HOST)")
    for what, keys in (
        ("name", [n.name for n in nodes]),
        ("client address", [(n.host, n.port) for n in nodes]),
        ("route address", [(n.host, n.route_port) for n in nodes]),
    ):
        if len(set(keys)) != len(keys):
            raise ConfigError(f"two nodes share a {what}: {sorted(map(str, keys))!r}")
    _check_ttl(node_ttl, ca_ttl)
    ca = DeploymentCA.create(f"{name}-nats", ttl=ca_ttl)
    seed = new_issuer_seed()
    callout = CalloutConfig(issuer=issuer_public_key(seed), service=callout_dn())

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.ca_pem)
    driver = directory / _DRIVER_DIR
    driver.mkdir(mode=0o700)
    write_private(driver / "ca-key.pem", ca.key_pem)
    write_private(driver / "callout.nk", seed + b"\n")
    expiries = []
    for node in nodes:
        _write_node(directory, node, nodes, ca, callout, node_dir, store_dir, listen, name)
        expiries.append(_write_node_cert(directory, node, ca, multi=len(nodes) > 1, ttl=node_ttl))
    record = _Record(nodes=tuple(nodes), issuer=callout.issuer)
    recorded = msgspec.json.format(msgspec.json.encode(record))
    (directory / _RECORD_FILE).write_bytes(recorded + b"\n")

    environment = {
        ENV_NATS_URL: ",".join(n.url for n in nodes),
        ENV_NATS_REPLICAS: "3" if len(nodes) >= 3 else "1",
        ENV_NATS_CA: str(directory / "ca.pem"),
        ENV_NATS_CA_KEY: str(driver / "ca-key.pem"),
        ENV_NATS_CALLOUT_KEY: str(driver / "callout.nk"),
    }
    env_file = driver / _ENV_FILE
    write_private(env_file, "".join(f"{k}={v}\n" for k, v in environment.items()).encode())
    return NatsLayout(
        directory=directory,
        nodes=tuple(nodes),
        env_file=env_file,
        environment=environment,
        issuer=callout.issuer,
        ca_expires=ca.expires,
        node_expires=min(expiries),
    )


def renew_node_certs(
    directory: Path, *, ttl: dt.timedelta = LAYOUT_NODE_TTL
) -> tuple[tuple[NatsNode, ...], dt.datetime, dt.datetime]:
    """Issue every node of the layout in `directory` a new certificate and key from its CA,
    in place of the old ones; a node serves them from its next configuration reload.

    Returns:
        The nodes, when their new certificates expire, and when the CA expires.

    Raises:
        ConfigError: `directory` is no layout, its CA key is not there (renew where
            ``driver`` is), or `ttl` is not positive or outlives the CA.
    """
    directory = Path(directory).absolute()
    try:
        record = msgspec.json.decode((directory / _RECORD_FILE).read_bytes(), type=_Record)
        ca_pem = (directory / "ca.pem").read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{str(directory)!r} is not a layout govmesh nats init wrote: no {exc.filename!r}"
        ) from None
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{str(directory / _RECORD_FILE)!r}: {exc}") from None
    key_file = directory / _DRIVER_DIR / "ca-key.pem"
    try:
        key_pem = key_file.read_bytes()
    except OSError:
        raise ConfigError(
            f"the CA key {str(key_file)!r} is not readable here; renew on the driver's "
            "machine, where the layout's driver directory is"
        ) from None
    ca = DeploymentCA.load(ca_pem, key_pem)
    _check_ttl(ttl, ca.expires - dt.datetime.now(dt.UTC))
    multi = len(record.nodes) > 1
    expires = min(_write_node_cert(directory, n, ca, multi=multi, ttl=ttl) for n in record.nodes)
    return record.nodes, expires, ca.expires


def _check_ttl(node_ttl: dt.timedelta, ca_left: dt.timedelta) -> None:
    if node_ttl <= dt.timedelta(0):
        raise ConfigError(f"a node certificate's lifetime must be positive, got {node_ttl}")
    if node_ttl > ca_left:
        raise ConfigError(
            f"a node certificate of {node_ttl.days} days would outlive its CA, which has "
            f"{ca_left.days} days left; make a new layout for a new CA"
        )


def _write_node_cert(
    directory: Path, node: NatsNode, ca: DeploymentCA, *, multi: bool, ttl: dt.timedelta
) -> dt.datetime:
    """A node's certificate (for routes too in a cluster) and a new key, each file replaced
    whole, so a reload never reads half of one; when the certificate expires."""
    here = directory / node.name
    cert_pem, key_pem = ca.server_cert([node.host], routes=multi, ttl=ttl)
    partial = here / "server-key.pem.partial"
    write_private(partial, key_pem)
    (here / "server.pem.partial").write_bytes(cert_pem)
    os.replace(partial, here / "server-key.pem")
    os.replace(here / "server.pem.partial", here / "server.pem")
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def _write_node(
    directory: Path,
    node: NatsNode,
    nodes: list[NatsNode],
    ca: DeploymentCA,
    callout: CalloutConfig,
    node_dir: str | None,
    store_dir: str | None,
    listen: str,
    name: str,
) -> None:
    here = directory / node.name
    here.mkdir()
    there = Path(node_dir.replace("{node}", node.name)) if node_dir else here
    store = Path(store_dir.replace("{node}", node.name)) if store_dir else there / "jetstream"
    (here / "ca.pem").write_bytes(ca.ca_pem)
    tls = ServerTLS(
        cert_file=there / "server.pem",
        key_file=there / "server-key.pem",
        ca_file=there / "ca.pem",
    )
    routes = None
    if len(nodes) > 1:
        routes = ClusterRoutes(
            cluster=name,
            server_name=node.name,
            port=node.route_port,
            routes=tuple(n.route for n in nodes if n is not node),
            host=listen,
        )
    config = render_nats_config(
        port=node.port,
        log_file=None,
        store_dir=store,
        tls=tls,
        cluster=routes,
        host=listen,
        debug=False,
        extra_config="" if routes else f"server_name: {json.dumps(node.name)}",
    )
    (here / "nats-server.conf").write_text(config)
    (here / AUTHORIZATION_FILE).write_text(render_authorization({}, callout=callout))
