"""``govmesh approvals``: list and answer escalated tool calls."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich import box
from rich.table import Table

from govmesh.cli._common import (
    age,
    arguments,
    console,
    json_option,
    out,
    run_async,
    tenant_option,
    wait_option,
    write_json,
)
from govmesh.cli._root import cli

if TYPE_CHECKING:
    from govmesh.governance._operator import OperatorDesk
    from govmesh.governance.messages import ApprovalRequest

_ASK_AGAIN_S = 0.2
_ID_SHOWN = 12
"""Characters of an approval id shown; any unique prefix answers it."""


@cli.group()
def approvals() -> None:
    """List and answer escalated tool calls of a running deployment."""


async def _pending(desk: OperatorDesk, *, until: float) -> list[ApprovalRequest]:
    """The pending approvals, asked for again while no governance actor answers, until
    `until` (monotonic): a run advertises itself a moment before its governance starts."""
    from govmesh.errors import BusError

    while True:
        try:
            return await desk.pending()
        except BusError:
            if time.monotonic() >= until:
                raise
        await asyncio.sleep(_ASK_AGAIN_S)


@approvals.command("list")
@tenant_option
@wait_option
@json_option
def approvals_list(tenant: str | None, wait_s: float, json_path: Path | None) -> None:
    """List the pending approvals, oldest first: who asks for which tool, with the arguments
    the tool declares to show, why it was escalated, how long it has waited and when it
    lapses. --json writes each request whole (``shown`` and every argument in ``args``)."""

    from govmesh.governance._operator import OperatorDesk
    from govmesh.runtime import join_when_up

    async def pending() -> list[ApprovalRequest]:
        until = time.monotonic() + wait_s
        async with OperatorDesk(await join_when_up(tenant, wait_s=wait_s)) as desk:
            return await _pending(desk, until=until)

    requests = run_async(pending())
    out.print(pending_table(requests, now=time.time()))
    write_json(json_path, requests, what="list")


def pending_table(requests: Sequence[ApprovalRequest], *, now: float) -> Table:
    """The pending approvals as `approvals list` prints them: who asks for which tool with
    the arguments the tool declares to show (every argument for a request from before tools
    declared them), why, how long it has waited and when it lapses."""
    from rich.markup import escape

    table = Table(
        title=f"pending approvals: {len(requests)}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    # Ids are never cut, or the rows of one run would look alike (they differ at the end);
    # at 80 columns what is asked, and why, wrap instead, long names folded.
    widest = max((len(r.workflow) for r in requests), default=0)
    table.add_column("id", no_wrap=True, min_width=_ID_SHOWN)
    table.add_column("workflow", no_wrap=True, min_width=widest)
    table.add_column("asks, and why", overflow="fold", ratio=1)
    table.add_column("waiting", no_wrap=True)
    table.add_column("lapses", max_width=10)
    for r in requests:
        shown = arguments(r.shown or r.args)
        asks = escape(f"{r.agent}: {r.tool}" + (f" {shown}" if shown else ""))
        table.add_row(
            r.approval_id[:_ID_SHOWN],
            escape(r.workflow),
            f"{asks}\n[dim]{escape('; '.join(r.reasons))}[/]",
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
    wait_s: float,
    json_path: Path | None,
) -> None:

    from rich.markup import escape

    from govmesh.governance._operator import ApprovalNotPending, OperatorDesk
    from govmesh.runtime import join_when_up

    async def answer() -> Any:
        until = time.monotonic() + wait_s
        async with OperatorDesk(await join_when_up(tenant, wait_s=wait_s)) as desk:
            if wait_s:
                # Governance answers before the answer goes out, which goes out once.
                await _pending(desk, until=until)
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
    @wait_option
    @json_option
    def command(
        approval_id: str,
        by: str,
        reason: str,
        tenant: str | None,
        wait_s: float,
        json_path: Path | None,
    ) -> None:
        _answer(
            approval_id,
            approved=approved,
            by=by,
            reason=reason,
            tenant=tenant,
            wait_s=wait_s,
            json_path=json_path,
        )

    return command


_answer_command(True)
_answer_command(False)
