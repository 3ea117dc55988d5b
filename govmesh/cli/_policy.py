"""``govmesh policy``: check policy files."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from govmesh.cli._common import console, out
from govmesh.cli._root import cli
from govmesh.errors import GovmeshError


@cli.group()
def policy() -> None:
    """Work with policy files."""


@policy.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def policy_check(files: tuple[Path, ...]) -> None:
    """Validate policy FILES together and print the policy hash."""
    from govmesh.governance._policy import load_policies

    try:
        policies = load_policies(list(files))
    except GovmeshError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)
    for p in policies.policies:
        out.print(f"ok  {p.source or '-'}  agent={p.agent}")
    out.print(f"policy hash {policies.hash}")
