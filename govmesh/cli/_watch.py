"""``govmesh watch``: follow a running deployment's event stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Group
from rich.table import Table

from govmesh.cli._common import (
    age,
    arguments,
    console,
    glance,
    out,
    run_async,
    tenant_option,
    wait_option,
    write_json,
)
from govmesh.cli._root import cli

if TYPE_CHECKING:
    from govmesh.observability._watch import BoardSnapshot, WatchedEvent

_WATCH_STYLES: dict[str, str] = {
    "SecurityEvent": "bold red",
    "ApprovalRequest": "yellow",
    "ApprovalAnswer": "yellow",
    "Decision": "cyan",
    "Usage": "dim",
    "ToolResult": "green",
}
_OUTCOME_STYLES: dict[str, str] = {"allow": "green", "deny": "red", "escalate": "yellow"}


def _event_line(event: WatchedEvent) -> str:
    """One watched event as a line of rich markup; text from the stream is escaped."""
    import datetime as dt

    from rich.markup import escape

    when = dt.datetime.fromtimestamp(event.ts).strftime("%H:%M:%S.%f")[:-3]
    if event.refused:
        s = event.summary
        claimed = " ".join(
            f"{name}={value}"
            for name, value in (
                ("kind", s.get("claimed_kind")),
                ("sender", s.get("claimed_sender")),
                ("workflow", event.workflow),
            )
            if value
        )
        return (
            f"{when} [bold red]refused[/] [red]{escape(str(s.get('reason')))}[/] on "
            f"{escape(event.subject)} (stream #{s.get('stream_seq')}), claimed "
            f"{escape(claimed or 'nothing readable')}: {escape(str(s.get('detail')))}"
        )
    summary = glance(event.summary)
    style = _WATCH_STYLES.get(event.kind, "") or "default"
    return (
        f"{when} [bold]{escape(event.workflow or '-')}[/] [{style}]{escape(event.kind)}[/] "
        f"{escape(event.sender)}: {escape(summary)}"
    )


def _board_view(board: BoardSnapshot, title: str) -> Group:
    """The live dashboard of a `BoardSnapshot`: decisions, workflows, security events,
    approvals, burn, and the latest events."""
    from rich.markup import escape
    from rich.panel import Panel

    def grid(*columns: Any, ratios: tuple[int, ...]) -> Table:
        row = Table.grid(expand=True, padding=(0, 1))
        for ratio in ratios:
            row.add_column(ratio=ratio)
        row.add_row(*columns)
        return row

    def counts(figures: dict[str, int], names: tuple[str, ...]) -> str:
        shown = [*names, *sorted(set(figures) - set(names))]
        return ", ".join(
            f"[{_OUTCOME_STYLES.get(n, 'default')}]{escape(n)} {figures.get(n, 0)}[/]"
            for n in shown
        )

    decisions = Table.grid(padding=(0, 1))
    decisions.add_row("decided", counts(board.decisions, ("allow", "deny", "escalate")))
    if board.settled:
        decisions.add_row("after escalation", counts(board.settled, ("allow", "deny")))
    for policy, n in board.policy_hashes.items():
        decisions.add_row("policy", f"{policy[:12]}… ({n})")

    workflows = Table.grid(padding=(0, 1))
    workflows.add_row("started", str(board.started))
    workflows.add_row("in flight", str(board.in_flight))
    workflows.add_row(
        "finished",
        ", ".join(
            f"[{'red' if result == 'halted' else 'default'}]{escape(result)} {n}[/]"
            for result, n in sorted(board.finished.items())
        )
        or "0",
    )

    security: Any = "none"
    if board.security:
        security = Table(box=None, padding=(0, 1), style="red", header_style="bold red")
        for column in ("reason", "sender", "count"):
            security.add_column(column, justify="right" if column == "count" else "left")
        for s in board.security:
            security.add_row(escape(s.reason), escape(s.sender), str(s.count), style="red")

    pending = Table(
        title=f"pending approvals: {len(board.pending)}",
        title_justify="left",
        box=None,
        padding=(0, 1),
    )
    for column in ("workflow", "tool", "asks", "age"):
        pending.add_column(column, justify="right" if column == "age" else "left")
    for a in board.pending:
        pending.add_row(
            escape(a.workflow),
            escape(a.tool),
            escape(arguments(a.shown)),
            age(board.at - a.requested_at),
        )
    answers = [
        f"[{'green' if a.approved else 'red'}]{'approved' if a.approved else 'denied'}[/] by "
        f"{escape(a.by)}: {escape(' '.join(filter(None, (a.workflow, a.tool))))} "
        f"({age(board.at - a.ts)} ago)"
        for a in board.answers
    ]

    spent = (
        f"total [bold]${board.cost_usd:,.4f}[/], {board.tokens:,} tokens in {board.calls:,} "
        f"calls; {board.tokens_last_min:,} tokens in the last minute"
    )
    burn = Table(box=None, padding=(0, 1))
    for column in ("costliest in flight", "calls", "tokens", "last min", "cost"):
        burn.add_column(column, justify="left" if column == "costliest in flight" else "right")
    for w in board.spend:
        burn.add_row(
            escape(w.workflow),
            str(w.calls),
            f"{w.tokens:,}",
            f"{w.tokens_last_min:,}",
            f"${w.cost_usd:,.4f}",
        )

    tail = Table.grid()
    tail.add_column(no_wrap=True, overflow="ellipsis")
    for event in board.tail:
        tail.add_row(_event_line(event))

    return Group(
        f"[bold]{escape(title)}[/]: {board.events:,} events",
        grid(
            Panel(decisions, title="decisions"),
            Panel(workflows, title="workflows"),
            Panel(
                security,
                title="security events"
                + (f" ({board.refused} refused on the stream)" if board.refused else ""),
                border_style="red" if board.security else "",
            ),
            ratios=(3, 2, 3),
        ),
        grid(
            Panel(Group(pending, *answers), title="approvals"),
            Panel(Group(spent, burn), title="burn"),
            ratios=(1, 1),
        ),
        Panel(tail, title="latest events"),
    )


@cli.command()
@tenant_option
@click.option("--workflow", "-w", default="", help="Only this workflow's events.")
@click.option("--kind", "-k", "kinds", multiple=True, help="Only events of this kind (repeatable).")
@click.option("--replay", is_flag=True, help="Start from the stream's first event, not from now.")
@click.option("--count", "-n", type=click.IntRange(1), help="Stop after this many events.")
@click.option(
    "--live/--lines",
    "live",
    default=None,
    help="A live dashboard (the default when stdout is a terminal), or one line per event "
    "(the default otherwise).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the events seen and the final board as JSON here.",
)
@wait_option
def watch(
    tenant: str | None,
    workflow: str,
    kinds: tuple[str, ...],
    replay: bool,
    count: int | None,
    live: bool | None,
    json_path: Path | None,
    wait_s: float,
) -> None:
    """Follow a running deployment's events live: decisions, escalations, model use, tool
    results, security events, and messages on the stream that fail verification (shown as
    refused security events, never as what they claim). Joins the deployment `govmesh run`
    advertises; stops when it stops, after --count events, or on Ctrl-C.

    On a terminal (or with --live) it shows a dashboard: decisions by outcome and policy,
    pending approvals (with the arguments each tool declares to show) and their answers,
    model spend per workflow, security events, workflows started and finished by result,
    and the latest events. --replay first folds in what happened before it joined.
    """

    from rich.live import Live

    from govmesh.observability import EventStream, RefusedMessage
    from govmesh.observability._watch import WatchBoard, WatchedEvent
    from govmesh.runtime import join_when_up

    board = WatchBoard()
    seen: list[WatchedEvent] = []
    title = "govmesh watch"

    async def follow(show: Callable[[WatchedEvent], None]) -> bool:
        """Fold in and show events until --count; False then, True if the deployment
        stopped first."""
        nonlocal title
        joined = await join_when_up(tenant, wait_s=wait_s)
        title = f"govmesh watch: {joined.deployment.tenant}" + (
            f" ({joined.what})" if joined.what else ""
        )
        n = 0

        def take(event: WatchedEvent) -> bool:
            """Fold in and show ``event``; True once --count events were taken."""
            nonlocal n
            board.add(event)
            if json_path is not None:
                seen.append(event)
            show(event)
            n += 1
            return count is not None and n >= count

        def refused(message: RefusedMessage) -> None:
            # Shown as a security event, filtered by the workflow it claims.
            event = WatchedEvent.of(message)
            if (workflow and event.workflow != workflow) or (kinds and event.kind not in kinds):
                return
            if take(event):
                stream.stop()

        stream = EventStream(
            deployment=joined,
            start="first" if replay else "new",
            workflows=(workflow,) if workflow else (),
            kinds=kinds,
            on_refused=refused,
        )
        async with stream:
            async for event in stream:
                if take(WatchedEvent.of(event)):
                    return False
        return not (count is not None and n >= count)

    async def dashboard(view: Live) -> bool:
        async def refresh() -> None:
            while True:
                view.update(_board_view(board.snapshot(time.time()), title), refresh=True)
                await asyncio.sleep(0.5)

        refresher = asyncio.create_task(refresh())
        try:
            return await follow(lambda _: None)
        finally:
            refresher.cancel()
            view.update(_board_view(board.snapshot(time.time()), title), refresh=True)

    try:
        if out.is_terminal if live is None else live:
            with Live(console=out, auto_refresh=False, transient=False) as view:
                stopped = run_async(dashboard(view))
        else:
            stopped = run_async(
                follow(lambda e: out.print(_event_line(e), highlight=False, soft_wrap=True))
            )
        if stopped:
            console.print("the deployment stopped; nothing more to watch")
    finally:
        write_json(json_path, {"events": seen, "board": board.snapshot(time.time())}, what="events")
