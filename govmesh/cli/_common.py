"""What every ``govmesh`` command shares: the consoles, JSON output, progress bars,
and running a coroutine so Ctrl-C and SIGTERM stop everything it started."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from govmesh.errors import GovmeshError

__all__ = [
    "age",
    "arguments",
    "console",
    "glance",
    "json_option",
    "out",
    "phase_ticker",
    "progress_bar",
    "run_async",
    "tenant_option",
    "wait_option",
    "write_json",
]

_T = TypeVar("_T")
console = Console(stderr=True)
out = Console()


json_option = click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report as JSON here.",
)


def progress_bar(*extra: ProgressColumn, auto_refresh: bool = True) -> Progress:
    """The progress bar every long command shows, on stderr; a benchmark's is drawn by its
    `phase_ticker`, not by a thread of its own (``auto_refresh=False``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        console=console,
        auto_refresh=auto_refresh,
    )


def write_json(json_path: Path | None, data: Any, *, what: str = "report") -> None:
    """Write ``data`` (plain values or msgspec structs) as JSON to ``json_path``, if given."""
    if json_path is None:
        return
    import msgspec

    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n")
    console.print(f"{what} written to {json_path}")


_BENCH_REDRAW_S: Final = 0.25


def phase_ticker(progress: Progress, task: Any) -> Any:
    """A benchmark's progress callback: ``(phase name or "", completed units)``.

    It redraws the bar itself, at each phase and at most every `_BENCH_REDRAW_S` between,
    as the benchmark calls it between timed steps: a drawing thread would take the
    interpreter in the middle of a timed step, and its pauses would be measured.
    """
    drawn = 0.0

    def tick(phase: str, n: int) -> None:
        nonlocal drawn
        if phase:
            progress.update(task, description=phase)
        progress.advance(task, n)
        now = time.monotonic()
        if phase or now - drawn >= _BENCH_REDRAW_S:
            drawn = now
            progress.refresh()

    return tick


def run_async(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro``; Ctrl-C and SIGTERM cancel it so every context manager cleans up.

    Ray, once started, leaves SIGTERM to this handler (see ``govmesh.runtime``'s start of
    Ray), so it is claimed once.
    """

    async def guarded() -> _T:
        task = asyncio.current_task()
        if task is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    try:
        import uvloop

        # About 20% less time per message on the signed bus than the default loop.
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]interrupted; every service govmesh started has been stopped[/]")
        sys.exit(130)
    except GovmeshError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)


def glance(summary: dict[str, Any]) -> str:
    """A record's summary on one line; hashes cut to 12 characters, amounts to 6 digits."""
    parts = []
    for name, value in summary.items():
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            text = text[:12] + "…"
        parts.append(f"{name}={text}")
    return " ".join(parts)


def arguments(values: dict[str, Any]) -> str:
    """Arguments a tool declares to show, on one line as ``name=value``: numbers exactly
    as given (a person approves what they read), text as it is, anything else as JSON."""
    import msgspec

    parts = []
    for name, value in values.items():
        if isinstance(value, str):
            text = value
        elif value is None or isinstance(value, bool | int | float):
            text = repr(value)
        else:
            text = msgspec.json.encode(value).decode()
        parts.append(f"{name}={text}")
    return " ".join(parts)


tenant_option = click.option(
    "--tenant",
    envvar="GOVMESH_TENANT",
    help="The deployment's tenant; needed only when several run here.",
)


wait_option = click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0),
    default=0,
    metavar="SECONDS",
    help="Wait up to SECONDS for the deployment to start (and answer), instead of exiting "
    "2 at once when none runs yet.",
)


def age(seconds: float) -> str:
    """A duration in its largest whole unit: ``45s``, ``12.5m``, ``3.0h``, ``2.1d``."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
