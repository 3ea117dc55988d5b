"""``govmesh policy``: check policy files and explain their rules."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.markup import escape

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
        console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(2)
    for p in policies.policies:
        out.print(f"ok  {p.source or '-'}  agent={p.agent}")
    out.print(f"policy hash {policies.hash}")


@policy.command("explain")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def policy_explain(files: tuple[Path, ...]) -> None:
    """Say in words what the policy FILES decide, role by role.

    Each policy's rules are listed in the order they are checked; a call is decided by
    every policy of its role, deny over escalate over allow, and a role with no policy is
    denied everything. The spend is the sum of the arguments a tool declares as spend.
    """
    from govmesh.governance._policy import load_policies

    try:
        policies = load_policies(list(files))
    except GovmeshError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(2)

    def say(text: str) -> None:
        out.print(text, markup=False, highlight=False, soft_wrap=True)

    for role in sorted({p.agent for p in policies.policies}):
        mine = policies.for_agent(role)
        say(f"role {role}: {len(mine)} {'policy' if len(mine) == 1 else 'policies'}")
        for p in mine:
            say(f"  {p.source or '-'}:")
            for line in p.explain():
                say(f"    - {line}")
        say("  anything no rule denies or escalates is allowed")
    out.print(f"policy hash {policies.hash}")
