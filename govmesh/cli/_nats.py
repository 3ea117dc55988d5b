"""``govmesh nats``: the files of a NATS cluster that an operator runs."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import click
from rich.markup import escape

from govmesh.cli._common import console, out, write_json
from govmesh.cli._root import cli
from govmesh.errors import GovmeshError

_NODE_DAYS = click.option(
    "--node-days",
    type=click.IntRange(min=1),
    default=365,
    show_default=True,
    help="How long each node's certificate lives, at most what the CA has left "
    "(`govmesh nats renew` makes the next).",
)


@cli.group()
def nats() -> None:
    """A NATS cluster on machines of your own, for govmesh runs across machines."""


@nats.command("init")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--node",
    "nodes",
    multiple=True,
    required=True,
    metavar="NAME=HOST[:PORT[:ROUTE_PORT]]",
    help="A node: its name, and the host clients and other nodes reach it at (ports "
    "4222 and 6222 unless given). Give it once per node: one, or three for JetStream "
    "replicas 3.",
)
@click.option(
    "--node-dir",
    metavar="PATH",
    help="Where a node's files will be on its machine ({node} is its name), e.g. "
    "/etc/nats; default: its directory under DIRECTORY, to run it from here.",
)
@click.option(
    "--store-dir",
    metavar="PATH",
    help="Each node's JetStream directory ({node} is its name); default: jetstream in "
    "its node directory.",
)
@click.option(
    "--listen",
    default="0.0.0.0",
    show_default=True,
    help="The address nodes listen on, for clients and for routes.",
)
@_NODE_DAYS
@click.option(
    "--ca-days",
    type=click.IntRange(min=1),
    default=3 * 365,
    show_default=True,
    help="How long the CA lives; a new CA needs a new layout.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write what was made (files, variables, issuer key, expiry dates) as JSON.",
)
def nats_init(
    directory: Path,
    nodes: tuple[str, ...],
    node_dir: str | None,
    store_dir: str | None,
    listen: str,
    node_days: int,
    ca_days: int,
    json_path: Path | None,
) -> None:
    """Make a NATS cluster's certificates and configuration in DIRECTORY (new or empty).

    Every node requires mutual TLS from clients and routes, runs JetStream, and admits a
    run's members by auth callout: it asks the process that runs govmesh (the driver),
    which answers for the members it registered with their roles' permissions. No node's
    configuration names a member, so it never changes from run to run.

    Copy DIRECTORY/NAME to each node's machine and start it with
    `nats-server -c nats-server.conf`. DIRECTORY/driver holds the keys that can mint an
    identity (the CA's, the callout issuer's), 0600: keep it on the driver's machine only,
    and start govmesh there with its variables: `set -a; . DIRECTORY/driver/govmesh.env;
    set +a`.
    """
    from govmesh.runtime._nats_layout import parse_node, write_nats_layout

    try:
        layout = write_nats_layout(
            directory,
            [parse_node(spec) for spec in nodes],
            node_dir=node_dir,
            store_dir=store_dir,
            listen=listen,
            node_ttl=dt.timedelta(days=node_days),
            ca_ttl=dt.timedelta(days=ca_days),
        )
    except GovmeshError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(2)
    for node in layout.nodes:
        config = layout.config_of(node)
        out.print(f"node {node.name}: {node.url}  {config}", highlight=False, soft_wrap=True)
    out.print(f"callout issuer {layout.issuer}", highlight=False)
    _print_expiries(layout.node_expires, layout.ca_expires)
    out.print(f"driver variables: {layout.env_file} (0600)", highlight=False, soft_wrap=True)
    console.print(
        f"[dim]keep {escape(str(layout.env_file.parent))} on the driver's machine only: its "
        "keys mint identities[/]",
        soft_wrap=True,
    )
    write_json(
        json_path,
        {
            "directory": str(layout.directory),
            "nodes": [
                {"name": n.name, "url": n.url, "config": str(layout.config_of(n))}
                for n in layout.nodes
            ],
            "issuer": layout.issuer,
            "env_file": str(layout.env_file),
            "environment": layout.environment,
            "node_certificates_expire": layout.node_expires.isoformat(),
            "ca_expires": layout.ca_expires.isoformat(),
        },
        what="layout",
    )


@nats.command("renew")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@_NODE_DAYS
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the nodes and the new expiry dates as JSON.",
)
def nats_renew(directory: Path, node_days: int, json_path: Path | None) -> None:
    """Issue every node of the layout in DIRECTORY a new certificate and key from its CA.

    Run it where DIRECTORY/driver is (it holds the CA's key), before the nodes'
    certificates expire. Then copy each DIRECTORY/NAME/server.pem and server-key.pem to
    its node and reload it (`nats-server --signal reload`): it serves the new certificate
    from then on, without a restart; the members connected to it reconnect and are
    admitted again, as when a node fails over, so reload one node at a time.
    """
    from govmesh.runtime._nats_layout import renew_node_certs

    try:
        nodes, expires, ca_expires = renew_node_certs(directory, ttl=dt.timedelta(days=node_days))
    except GovmeshError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(2)
    for node in nodes:
        out.print(f"node {node.name}: {directory / node.name / 'server.pem'}", highlight=False)
    _print_expiries(expires, ca_expires)
    console.print("[dim]copy each node's server.pem and server-key.pem, then reload it[/]")
    write_json(
        json_path,
        {
            "nodes": [node.name for node in nodes],
            "node_certificates_expire": expires.isoformat(),
            "ca_expires": ca_expires.isoformat(),
        },
        what="renewal",
    )


def _print_expiries(nodes: dt.datetime, ca: dt.datetime) -> None:
    out.print(f"node certificates expire {nodes:%Y-%m-%d %H:%M} UTC", highlight=False)
    out.print(f"CA expires {ca:%Y-%m-%d %H:%M} UTC", highlight=False)
