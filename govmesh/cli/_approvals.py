"""``govmesh approvals``: list and answer escalated tool calls."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from govmesh.cli._common import (
    age,
    arguments,
    console,
    json_option,
    out,
    run_async,
    tenant_option,
    write_json,
)
from govmesh.cli._root import cli

if TYPE_CHECKING:
    from govmesh.governance.messages import ApprovalRequest


@cli.group()
def approvals() -> None:
    """List and answer escalated tool calls of a running deployment."""


@approvals.command("list")
@tenant_option
@json_option
def approvals_list(tenant: str | None, json_path: Path | None) -> None:
    """List the pending approvals, oldest first: who asks for which tool, with the arguments
    the tool declares to show, why it was escalated, how long it has waited and when it
    lapses. --json writes each request whole (``shown`` and every argument in ``args``)."""

    from govmesh.governance._operator import OperatorDesk
    from govmesh.runtime import join

    async def pending() -> list[ApprovalRequest]:
        async with OperatorDesk(join(tenant)) as desk:
            return await desk.pending()

    requests = run_async(pending())
    out.print(pending_table(requests, now=time.time()))
    write_json(json_path, requests, what="list")


def pending_table(requests: Sequence[ApprovalRequest], *, now: float) -> Table:
    """The pending approvals as `approvals list` prints them: who asks for which tool with
    the arguments the tool declares to show (every argument for a request from before tools
    declared them), why, how long it has waited and when it lapses."""
    from rich.markup import escape

    table = Table(title=f"pending approvals: {len(requests)}")
    for column in ("id", "workflow", "asks", "why", "waiting", "lapses"):
        table.add_column(column, no_wrap=column == "id")
    for r in requests:
        shown = arguments(r.shown or r.args)
        table.add_row(
            r.approval_id[:12],
            escape(r.workflow),
            escape(f"{r.agent}: {r.tool}" + (f" {shown}" if shown else "")),
            escape("; ".join(r.reasons)),
            age(now - r.requested_at),
            f"in {age(r.expires_at - now)}, then {r.on_expiry}" if r.expires_at else "never",
        )
    return table


def _answer(
    approval_id: str,
    *,
    approved: bool,
    by: str,
    reason: str,
    tenant: str | None,
    json_path: Path | None,
) -> None:

    from rich.markup import escape

    from govmesh.governance._operator import ApprovalNotPending, OperatorDesk
    from govmesh.runtime import join

    async def answer() -> Any:
        async with OperatorDesk(join(tenant)) as desk:
            try:
                return await desk.answer(approval_id, approved=approved, by=by, reason=reason)
            except ApprovalNotPending as exc:
                return exc

    got = run_async(answer())
    if isinstance(got, ApprovalNotPending):
        console.print(f"[yellow]{got}[/]")
        sys.exit(1)
    request, result = got
    colour = "green" if result.outcome == "allow" else "red"
    asked = " ".join(filter(None, (request.tool, arguments(request.shown or request.args))))
    out.print(
        f"approval {request.approval_id} ({escape(request.workflow)}, {escape(asked)}): "
        f"[{colour}]{result.outcome}[/]; " + escape("; ".join(result.reasons))
    )
    write_json(json_path, result, what="result")


def _answer_command(approved: bool) -> Any:
    verb = "approve" if approved else "deny"
    recheck = (
        "Governance decides the intent again on the current figures, so an approval still "
        "ends in deny if the limits have been used up meanwhile. "
    )
    doc = (
        f"{verb.capitalize()} the pending approval APPROVAL_ID (or a unique prefix of it) and "
        f"print what governance decided. {recheck if approved else ''}Exits 1 if it is not "
        "pending."
    )

    @approvals.command(verb, help=doc)
    @click.argument("approval_id")
    @click.option("--by", required=True, help="Who answers (recorded and shown to the workflow).")
    @click.option("--reason", default="", help="Why; recorded with the answer.")
    @tenant_option
    @json_option
    def command(
        approval_id: str, by: str, reason: str, tenant: str | None, json_path: Path | None
    ) -> None:
        _answer(
            approval_id,
            approved=approved,
            by=by,
            reason=reason,
            tenant=tenant,
            json_path=json_path,
        )

    return command


_answer_command(True)
_answer_command(False)
