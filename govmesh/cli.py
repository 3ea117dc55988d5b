"""The ``govmesh`` command."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click
from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from govmesh.errors import GovmeshError

if TYPE_CHECKING:
    from govmesh.observability._watch import BoardSnapshot, WatchedEvent

__all__ = ["main"]

T = TypeVar("T")
console = Console(stderr=True)
out = Console()


json_option = click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report as JSON here.",
)


def _progress(*extra: ProgressColumn, auto_refresh: bool = True) -> Progress:
    """The progress bar every long command shows, on stderr; a benchmark's is drawn by its
    `_phase_ticker`, not by a thread of its own (``auto_refresh=False``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        console=console,
        auto_refresh=auto_refresh,
    )


def _write_json(json_path: Path | None, data: Any, *, what: str = "report") -> None:
    """Write ``data`` (plain values or msgspec structs) as JSON to ``json_path``, if given."""
    if json_path is None:
        return
    import msgspec

    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(data), indent=2) + b"\n")
    console.print(f"{what} written to {json_path}")


_BENCH_REDRAW_S: Final = 0.25


def _phase_ticker(progress: Progress, task: Any) -> Any:
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


def _claim_sigterm() -> None:
    """Make SIGTERM cancel the running main task, so every context manager cleans up.

    Called again once Ray is up: ``ray.init`` installs its own SIGTERM handler, which dumps
    a stack trace and exits without stopping what govmesh started in order.
    """
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; Ctrl-C and SIGTERM cancel it so every context manager cleans up."""

    async def guarded() -> T:
        _claim_sigterm()
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


def _start_telemetry(choice: str) -> None:
    """Set up where this process's spans and metrics go, and, through the environment its
    Ray workers inherit, where its actors' go; they are sent on when the command ends."""
    if choice == "console":
        os.environ["OTEL_TRACES_EXPORTER"] = os.environ["OTEL_METRICS_EXPORTER"] = "console"
    elif choice == "none":
        os.environ["OTEL_SDK_DISABLED"] = "true"
    if not any(name.startswith("OTEL_") for name in os.environ):
        return  # nothing asked for: spare every command the import
    from govmesh.telemetry import configure_telemetry

    try:
        installed = configure_telemetry(member="cli")
    except GovmeshError as exc:
        raise click.ClickException(str(exc)) from None
    if installed is not None:
        click.get_current_context().call_on_close(installed.close)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option(
    "--telemetry",
    type=click.Choice(["env", "console", "none"]),
    default="env",
    show_default=True,
    help="Where spans and metrics go: where the OTEL_* environment says (OTLP when "
    "OTEL_EXPORTER_OTLP_ENDPOINT is set, else nowhere), to stderr, or nowhere.",
)
@click.option(
    "--low-latency",
    type=click.Choice(["on", "off"]),
    default=None,
    help="on: hold this machine's CPUs awake while services run (needs write access to "
    "/dev/cpu_dma_latency), so a message wakes its receiver without waiting for a halted "
    "CPU; idle CPUs then spin, for every program on the machine, and the embedded "
    "nats-server runs on one Go thread. Default: $GOVMESH_LOW_LATENCY, else off.",
)
def cli(verbose: int, telemetry: str, low_latency: str | None) -> None:
    """govmesh: governed multi-agent workflow automation."""
    if low_latency is not None:
        # Through the environment, so every Runtime and benchmark of this command follows.
        os.environ["GOVMESH_LOW_LATENCY"] = low_latency
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # Refused messages are counted and reported in the summary; one line each is noise.
        logging.getLogger("govmesh.bus._bus").setLevel(logging.ERROR)
    _start_telemetry(telemetry)


@cli.command()
def up() -> None:
    """Run embedded nats-server, Redis-protocol server and Ray until Ctrl-C.

    Prints the URLs, the Redis password masked, and writes them whole to a file only this
    user may read, so other processes can join with GOVMESH_NATS_URL, GOVMESH_REDIS_URL
    and RAY_ADDRESS.
    """
    from govmesh.config import public_url
    from govmesh.runtime import Runtime
    from govmesh.runtime._home import write_private

    async def serve() -> None:
        # Plain NATS: clients of another process get no certificates from this one yet.
        async with Runtime(secure=False) as rt:
            _claim_sigterm()
            joining = {"GOVMESH_NATS_URL": rt.nats_url, "GOVMESH_REDIS_URL": rt.redis_url}
            if rt.ray_address:
                joining["RAY_ADDRESS"] = rt.ray_address
            env_file = rt.workdir / "join.env"
            write_private(env_file, "".join(f"{k}={v}\n" for k, v in joining.items()).encode())
            for name, value in joining.items():
                out.print(f"{name}={public_url(value)}")
            console.print(
                f"[dim]with the Redis password: {env_file} (0600); join with "
                f"`set -a; . {env_file}; set +a`[/]"
            )
            console.print(f"[dim]low latency ({rt.low_latency.mode}): {rt.low_latency.detail}[/]")
            console.print("[green]govmesh services are up[/]; Ctrl-C stops them")
            await asyncio.Event().wait()

    _run(serve())


@cli.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--workflows", "-n", default=20, show_default=True, type=click.IntRange(1))
@click.option("--seed", "-s", default=1, show_default=True, type=int)
@click.option(
    "--concurrency",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="Workflows in flight at once.",
)
@click.option(
    "--manual-approvals",
    is_flag=True,
    help="No simulated approver: escalations wait for `govmesh approvals` from another "
    "terminal, or for their policy's expiry.",
)
@click.option(
    "--resume",
    "resume",
    metavar="RUN_ID",
    help="Finish a run that was stopped: its scenario, seed and counts are its own, its "
    "embedded servers start again on its data, and its unfinished workflows go on.",
)
@json_option
def run(
    scenario: Path | None,
    workflows: int,
    seed: int,
    concurrency: int,
    manual_approvals: bool,
    resume: str | None,
    json_path: Path | None,
) -> None:
    """Run SCENARIO with a swarm of agent actors and print a summary.

    While it runs, `govmesh approvals list|approve|deny` works against it from another
    terminal (the deployment is advertised under $GOVMESH_HOME, default ~/.govmesh).
    A run that is stopped before its workflows finish keeps its data under
    $GOVMESH_HOME/runs/RUN_ID; `govmesh run --resume RUN_ID` finishes it.
    """
    from govmesh.scenarios import run_scenario
    from govmesh.scenarios._records import load_resumable
    from govmesh.scenarios._runner import run_dir
    from govmesh.scenarios._runs import new_run_id

    if scenario is None and resume is None:
        raise click.UsageError("give a SCENARIO file, or --resume RUN_ID")
    if scenario is not None and resume is not None:
        raise click.UsageError("--resume takes the scenario of the run; give no SCENARIO")
    run_id = resume or new_run_id()
    if resume is not None:
        try:
            manifest = load_resumable(run_dir(resume))
        except GovmeshError as exc:
            raise click.ClickException(str(exc)) from None
        workflows, manual_approvals = manifest.workflows, manifest.manual_approvals
        console.print(f"resuming run [bold]{run_id}[/] of {manifest.scenario}")
    else:
        console.print(
            f"run [bold]{run_id}[/]; if it is stopped, [bold]govmesh run --resume {run_id}[/] "
            "finishes it"
        )
    if manual_approvals:
        console.print(
            "escalations wait for an operator: [bold]govmesh approvals list[/], then "
            "[bold]govmesh approvals approve ID --by NAME[/] (or deny)"
        )

    from rich.live import Live

    progress = _progress(TextColumn("{task.fields[tally]}"))
    view = _BurnView(progress)
    with Live(view, console=console, refresh_per_second=4, transient=False):
        task = progress.add_task("starting", total=workflows, tally="")
        tally: dict[str, int] = {}

        def on_done(_: str, outcome: Any) -> None:
            tally[outcome.result] = tally.get(outcome.result, 0) + 1
            text = " ".join(f"{k}={v}" for k, v in sorted(tally.items()))
            progress.update(task, advance=1, tally=text, description="workflows")

        def on_phase(text: str) -> None:
            _claim_sigterm()  # phases after the first run with Ray up
            progress.update(task, description=text)
            if text == "stopping":
                view.burns = []

        report = _run(
            run_scenario(
                scenario,
                workflows=workflows,
                seed=seed,
                concurrency=concurrency,
                simulated_approver=not manual_approvals,
                on_done=on_done,
                on_phase=on_phase,
                run_id=run_id,
                resume=resume is not None,
                on_burn=view.update,
            )
        )
    out.print(_summary(report))
    if "resume" in report:
        console.print(f"unfinished workflows remain: [bold]{report['resume']}[/]")
    if "record" in report:
        console.print(
            f"run [bold]{report['run_id']}[/] kept its record in {report['record']['dir']}; "
            f"audit it with [bold]{report['record']['show']}[/] (or verify, export)"
        )
    _write_json(json_path, report)
    if report["workflows"]["finished"] != report["workflows"]["total"]:
        sys.exit(1)


@cli.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workflows", "-n", default=50, show_default=True, type=click.IntRange(1))
@click.option(
    "--kills",
    "-k",
    default=5,
    show_default=True,
    type=click.IntRange(0),
    help="Strikes: SIGKILLs of actor processes and restarts of the servers.",
)
@click.option("--seed", "-s", default=1, show_default=True, type=int)
@click.option(
    "--concurrency",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="Workflows in flight at once.",
)
@json_option
def chaos(
    scenario: Path,
    workflows: int,
    kills: int,
    seed: int,
    concurrency: int,
    json_path: Path | None,
) -> None:
    """Run SCENARIO while killing its actors and restarting its servers; check that
    every workflow finished, no effect happened twice and no approval was lost.

    The strikes SIGKILL agent actor processes, the state actor, a governance actor and
    the gateway, and restart the Redis-protocol server and nats-server, spread over the
    run. Exits 1 if a workflow did not finish or an effect or approval went wrong.
    """
    from govmesh.scenarios._chaos import run_chaos

    with _progress(TextColumn("{task.fields[tally]}")) as progress:
        task = progress.add_task("starting", total=workflows, tally="")

        def on_done(_: str, outcome: Any) -> None:
            progress.update(task, advance=1, description="workflows")

        def on_phase(text: str) -> None:
            _claim_sigterm()
            progress.update(task, description=text)

        report = _run(
            run_chaos(
                scenario,
                workflows=workflows,
                kills=kills,
                seed=seed,
                concurrency=concurrency,
                on_done=on_done,
                on_phase=on_phase,
            )
        )
    table = Table(title=f"govmesh chaos: {report['scenario']} (seed {seed})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("workflows finished", f"{report['finished']} / {report['total']}")
    table.add_row("duplicate effects (ERP's own orders)", str(report["duplicate_effects"]))
    table.add_row("lost approvals", str(report["lost_approvals"]))
    table.add_row("strikes", str(report["kills"]))
    for strike in report["strikes"]:
        table.add_row(
            f"  at {strike['at_s']:.1f} s",
            f"{strike['how']} {strike['target']} (pid {strike['pid']})",
        )
    restarts = report["actor_restarts"]
    table.add_row(
        "actors back on the bus",
        ", ".join(f"{k} {v}" for k, v in sorted(restarts.items())) or "none",
    )
    w = report["run"]["workflows"]
    table.add_row(
        "outcomes",
        f"executed {w['executed']}, denied {w['denied']}, rejected {w['rejected']}, "
        f"failed {w['failed']}",
    )
    t = report["run"]["timings_s"]
    table.add_row("time (workflows / total)", f"{t['workflows_s']:.1f} / {t['total_s']:.1f} s")
    out.print(table)
    _write_json(json_path, report)
    if (
        report["finished"] != report["total"]
        or report["duplicate_effects"]
        or report["lost_approvals"]
    ):
        sys.exit(1)


class _BurnView:
    """The run's live view: the progress bar and, below it, the model use so far of the
    costliest workflows in flight."""

    _ROWS = 8

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.burns: list[Any] = []
        self.in_flight = 0

    def update(self, burns: list[Any]) -> None:
        self.burns, self.in_flight = burns[: self._ROWS], len(burns)

    def __rich__(self) -> Any:
        from rich.console import Group

        if not self.burns:
            return self.progress
        table = Table(
            title=f"burn of the costliest workflows in flight ({self.in_flight} in flight)",
            title_justify="left",
            box=None,
        )
        for column in ("workflow", "calls", "reflections", "tokens", "tokens/min", "cost"):
            table.add_column(column, justify="left" if column == "workflow" else "right")
        for b in self.burns:
            table.add_row(
                b.workflow,
                str(b.calls),
                str(b.reflections),
                f"{b.tokens:,}",
                f"{b.tokens_per_min:,.0f}",
                f"${b.cost_usd:,.4f}",
            )
        return Group(self.progress, table)


def _summary(report: dict[str, Any]) -> Table:
    w, d, lat = report["workflows"], report["decisions"], report["governance_latency_ms"]
    table = Table(title=f"govmesh run: {report['scenario']} (seed {report['seed']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("workflows finished", f"{w['finished']} / {w['total']}")
    table.add_row(
        "outcomes",
        f"executed {w['executed']}, denied {w['denied']}, rejected {w['rejected']}, "
        f"failed {w['failed']}, halted {w['halted']}",
    )
    b = report["budget"]
    if b["caps"] is not None:
        i = b["interrupts"]
        caps = b["caps"]
        table.add_row(
            "model-spend caps (workflow / agent / tenant)",
            " / ".join(
                "none" if caps[k] is None else f"${caps[k]:g}"
                for k in ("workflow_usd", "agent_daily_usd", "tenant_daily_usd")
            ),
        )
        table.add_row(
            "budget interrupts",
            f"{i['asked']} asked, {i['released']} released, {i['halted']} halted",
        )
    table.add_row("decisions", f"allow {d['allow']}, deny {d['deny']}, escalate {d['escalate']}")
    table.add_row("decisions replayed", f"{d['replayed']}, {d['replay_differences']} differences")
    approver = report["approver"]
    table.add_row(
        f"approvals ({'simulated: ' if approver['simulated'] else ''}{approver['name']})",
        f"approved {report['approvals']['approved']}, rejected or expired "
        f"{report['approvals']['rejected']}",
    )
    table.add_row(
        "tokens (simulated model)",
        f"{report['tokens']:,} in {report['model_calls']['counted_by_budget']} calls",
    )
    table.add_row("cost", f"${report['cost_usd']:,.4f}")
    f = report["forecast"]
    if not f["available"]:
        table.add_row("cost forecast (ATFM)", f["why"])
    else:
        actual = f.get("actual")
        versus = (
            f"; actual ${actual['actual_usd']:,.4f}, error {actual['total_error']:+.1%}, "
            f"{actual['p90_coverage']:.0%} of workflows under their P90"
            if actual and actual["total_error"] is not None
            else ""
        )
        table.add_row(
            f"cost forecast (ATFM, from {f['recorded_workflows']} recorded workflows)",
            f"${f['expected_cost_usd']:,.4f} (P5-P95 ${f['p5_cost_usd']:,.4f}-"
            f"${f['p95_cost_usd']:,.4f}){versus}",
        )
    vendor = report["vendor_reply"]
    if vendor["wait_hours"]:
        clock = "simulated clock" if report["clock"]["simulated"] else "real clock"
        table.add_row(
            f"vendor quote wait ({clock})",
            f"{vendor['wait_hours']:g} h each; timers fired {vendor['timers']['fired']}, "
            f"missed {vendor['timers']['missed']}",
        )
    a = report["audit"]
    table.add_row(
        "audit index (hash-chained)",
        f"{a['records']:,} events of {a['workflows_verified']} workflows, "
        + ("every chain intact" if a["intact"] else f"{len(a['problems'])} problems")
        + (f"; {a['refused']} messages refused, kept apart" if a["refused"] else "")
        + ("" if a["caught_up"] else " (indexing had not caught up)"),
    )
    table.add_row("governance latency p50 / p99", f"{lat['p50']:.2f} / {lat['p99']:.2f} ms")
    rejections = report["security_rejections"]
    table.add_row(
        "security rejections",
        ", ".join(f"{k} {v}" for k, v in rejections.items()) if rejections else "none",
    )
    t = report["timings_s"]
    table.add_row(
        "time (start / workflows / total)",
        f"{t['start_s']:.1f} / {t['workflows_s']:.1f} / {t['total_s']:.1f} s",
    )
    return table


@cli.group()
def bench() -> None:
    """Benchmarks; each measures its baseline in the same run and reports p50/p99."""


@bench.command("auth")
@click.option(
    "--agents",
    default=4,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Requester/responder pairs calling at once.",
)
@click.option(
    "--messages",
    default=2000,
    show_default=True,
    type=click.IntRange(10),
    help="Timed request/reply exchanges per pair.",
)
@click.option("--warmup", default=100, show_default=True, type=click.IntRange(0))
@json_option
def bench_auth(agents: int, messages: int, warmup: int, json_path: Path | None) -> None:
    """Request/reply over plain NATS, mutual TLS, and full mTLS-A, in one run."""
    from govmesh.bench._auth import SETUPS, run_auth_bench

    with _progress() as progress:
        task = progress.add_task("auth", total=len(SETUPS) * 2 * agents * messages)

        def tick(setup: str, n: int) -> None:
            if setup:
                progress.update(task, description=f"auth: {setup}")
            progress.advance(task, n)

        report = _run(run_auth_bench(agents=agents, messages=messages, warmup=warmup, tick=tick))
    table = Table(title=f"govmesh bench auth: {agents} pairs x {messages} exchanges")
    for column in ("setup", "p50 ms", "p99 ms", "msgs/s loaded", "loaded p50 / p99 ms"):
        table.add_column(column, justify="right" if column != "setup" else "left")
    for name in SETUPS:
        r = report[name]
        table.add_row(
            name,
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['msgs_per_s']:,.0f}",
            f"{r['loaded_p50_ms']:.3f} / {r['loaded_p99_ms']:.3f}",
        )
    o = report["overhead_ms"]
    table.add_row("mtls_a - plain", f"{o['p50']:+.3f}", f"{o['p99']:+.3f}", "", "")
    out.print(table)
    _write_json(json_path, report)


@bench.command("governance")
@click.option(
    "--decisions",
    default=100_000,
    show_default=True,
    type=click.IntRange(100),
    help="Timed in-process decisions per engine (seed policy, 100 policies, cedarpy).",
)
@click.option(
    "--intents",
    default=2000,
    show_default=True,
    type=click.IntRange(1),
    help="Intents over the signed bus in each phase (latency, then throughput).",
)
@json_option
def bench_governance(decisions: int, intents: int, json_path: Path | None) -> None:
    """Decision latency in process and over the bus, throughput, and cedarpy, in one run."""
    from govmesh.bench._governance import run_governance_bench

    with _progress(auto_refresh=False) as progress:
        timed = decisions // 100 * 100
        task = progress.add_task("governance", total=3 * timed + 10 * intents)
        tick = _phase_ticker(progress, task)

        report = _run(run_governance_bench(decisions=decisions, intents=intents, tick=tick))
    table = Table(title=f"govmesh bench governance: {timed:,} decisions, {intents:,} intents")
    for column in ("measure", "p50", "p99", "target", "met"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    targets, met = report["targets"], report["met"]

    def row(measure: str, p50: str, p99: str = "", target: str = "", key: str = "") -> None:
        table.add_row(measure, p50, p99, target, ("yes" if met[key] else "no") if key else "")

    seed, rules, cedar = (
        report["in_process_us"],
        report["in_process_100_rules_us"],
        report["cedar_in_process_us"],
    )
    row(
        "seed policy, us",
        f"{seed['p50']:.2f}",
        f"{seed['p99']:.2f}",
        f"p50 <= {targets['in_process_p50_us']:g}",
        "in_process_p50_us",
    )
    row("100 policies, us", f"{rules['p50']:.2f}", f"{rules['p99']:.2f}")
    row("cedarpy (pre-parsed), us", f"{cedar['p50']:.2f}", f"{cedar['p99']:.2f}")
    row(
        "speedup vs cedarpy",
        f"{report['speedup_vs_cedar']:.1f}x",
        target=f"> {targets['speedup_vs_cedar']:g}x",
        key="speedup_vs_cedar",
    )
    row("cedarpy disagreements", f"{report['cedar_disagreements']} / {report['cedar_compared']}")
    bus, loaded = report["bus_ms"], report["bus_loaded_ms"]
    row(
        "bus intent to decision, ms",
        f"{bus['p50']:.3f}",
        f"{bus['p99']:.3f}",
        f"p99 <= {targets['bus_p99_ms']:g}",
        "bus_p99_ms",
    )
    floor, over = report["floor_ms"], report["bus_over_floor_ms"]
    row("bus floor (no govmesh work), ms", f"{floor['p50']:.3f}", f"{floor['p99']:.3f}")
    row("bus over its floor, ms", f"{over['p50']:.3f}", f"{over['p99']:.3f}")
    wake = report["wake_ms"]
    for key, where in (("same_core", "one core"), ("cross_core", "two cores")):
        if key in wake:
            times = wake[key]
            row(
                f"wake-up round trip, {where}, ms",
                f"{times['p50']:.3f}",
                f"{times['p99']:.3f}",
            )
    row(f"bus, {report['window']} in flight, ms", f"{loaded['p50']:.3f}", f"{loaded['p99']:.3f}")
    row(
        f"decisions/s, {report['governance_actors']} actors",
        f"{report['decisions_per_s']:,.0f}",
        target=f">= {targets['decisions_per_s']:,.0f}",
        key="decisions_per_s",
    )
    one = report["one_process"]
    row(
        "one process: intent to decision, ms",
        f"{one['bus_ms']['p50']:.3f}",
        f"{one['bus_ms']['p99']:.3f}",
    )
    row("one process: decisions/s", f"{one['decisions_per_s']:,.0f}")
    halting = report.get("without_low_latency")
    if halting is not None:
        for measure, key in (
            ("idle CPUs halting: bus, ms", "bus_ms"),
            ("idle CPUs halting: bus floor, ms", "floor_ms"),
        ):
            row(measure, f"{halting[key]['p50']:.3f}", f"{halting[key]['p99']:.3f}")
        row("idle CPUs halting: decisions/s", f"{halting['decisions_per_s']:,.0f}")
    out.print(table)
    held = report["low_latency"]
    console.print(f"[dim]low latency ({held['mode']}): {held['detail']}[/]")
    console.print(f"[dim]{report['process_layout']}; event loop {report['event_loop']}[/]")
    _write_json(json_path, report)


@bench.command("forecast")
@click.argument(
    "scenario",
    type=click.Path(dir_okay=False, path_type=Path),
    default="scenarios/procurement.yaml",
    required=False,
)
@click.option("--calibration-runs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--held-out-runs", default=20, show_default=True, type=click.IntRange(1))
@click.option("--workflows", default=100, show_default=True, type=click.IntRange(2))
@json_option
def bench_forecast(
    scenario: Path,
    calibration_runs: int,
    held_out_runs: int,
    workflows: int,
    json_path: Path | None,
) -> None:
    """Cost-forecast accuracy: calibrate on some seeded swarm runs of SCENARIO (default
    scenarios/procurement.yaml), forecast held-out ones before they run, compare."""
    from govmesh.bench._forecast import run_forecast_bench

    with _progress() as progress:
        task = progress.add_task("starting", total=calibration_runs + held_out_runs)

        def tick(phase: str, done: int) -> None:
            _claim_sigterm()
            progress.update(task, description=phase, completed=done)

        report = _run(
            run_forecast_bench(
                scenario,
                calibration=calibration_runs,
                held_out=held_out_runs,
                workflows=workflows,
                tick=tick,
            )
        )
    table = Table(
        title=f"govmesh bench forecast: {report['scenario']} (simulated model), "
        f"{report['calibration_workflows']} workflows recorded, {report['runs']} held-out "
        f"runs of {workflows}"
    )
    for column in ("measure", "value", "target", "met"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    low, high = report["targets"]["p90_coverage"]
    table.add_row(
        "held-out runs within 8% of the forecast",
        f"{report['within_8pct_share']:.0%}",
        f">= {report['targets']['within_8pct_share']:.0%}",
        "yes" if report["met"]["within_8pct_share"] else "no",
    )
    table.add_row(
        "workflows under their P90 bound",
        f"{report['p90_coverage']:.1%}",
        f"{low:.0%} - {high:.0%}",
        "yes" if report["met"]["p90_coverage"] else "no",
    )
    table.add_row("median absolute total error", f"{report['median_abs_error']:.2%}", "", "")
    table.add_row("largest absolute total error", f"{report['max_abs_error']:.2%}", "", "")
    table.add_row("actual total within P5-P95", f"{report['within_p5_p95_share']:.0%}", "", "")
    out.print(table)
    _write_json(json_path, report)


@bench.command("state")
@click.option(
    "--snapshots",
    default=1000,
    show_default=True,
    type=click.IntRange(10),
    help="Timed snapshot writes, then as many rehydrations.",
)
@json_option
def bench_state(snapshots: int, json_path: Path | None) -> None:
    """Snapshot write and rehydration through the state actor, beside raw Redis."""
    from govmesh.bench._state import run_state_bench

    with _progress(auto_refresh=False) as progress:
        task = progress.add_task("state", total=3 * snapshots)
        tick = _phase_ticker(progress, task)

        report = _run(run_state_bench(snapshots=snapshots, tick=tick))
    sizes = report["sizes_bytes"]
    table = Table(
        title=f"govmesh bench state: {snapshots:,} snapshots of {sizes['sealed'] / 1024:,.0f} KB "
        f"sealed (goal {sizes['goal'] / 1024:.1f} KB, tool {sizes['tool'] / 1024:.0f} KB, "
        f"log {sizes['reflections'] / 1024:.0f} KB)"
    )
    for column in ("measure", "p50 ms", "p99 ms", "target", "met"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    rows = (
        ("snapshot over the bus (acknowledged)", "snapshot_ms", ""),
        ("rehydrate over the bus", "rehydrate_ms", "rehydrate_p99_ms"),
        ("raw Redis SET of the sealed bytes", "redis_set_ms", ""),
        ("raw Redis GET of the sealed bytes", "redis_get_ms", ""),
        ("seal in process", "seal_ms", ""),
        ("unseal in process", "unseal_ms", ""),
    )
    for label, key, target in rows:
        r = report[key]
        table.add_row(
            label,
            f"{r['p50']:.3f}",
            f"{r['p99']:.3f}",
            f"p99 <= {report['targets'][target]:g}" if target else "",
            ("yes" if report["met"][target] else "no") if target else "",
        )
    out.print(table)
    _write_json(json_path, report)


@bench.command("audit")
@click.option(
    "--events",
    default=1_000_000,
    show_default=True,
    type=click.IntRange(1),
    help="Events ingested into the audit index.",
)
@click.option(
    "--workflows",
    default=10_000,
    show_default=True,
    type=click.IntRange(1),
    help="Workflows the events are spread over.",
)
@click.option("--samples", default=1000, show_default=True, type=click.IntRange(1))
@json_option
def bench_audit(events: int, workflows: int, samples: int, json_path: Path | None) -> None:
    """Audit index: ingest rate, one workflow's show and verify, beside a raw LRANGE."""
    from govmesh.bench._audit import run_audit_bench

    with _progress(auto_refresh=False) as progress:
        task = progress.add_task("audit", total=events + samples + 1)
        tick = _phase_ticker(progress, task)

        report = _run(
            run_audit_bench(events=events, workflows=workflows, samples=samples, tick=tick)
        )
    table = Table(
        title=f"govmesh bench audit: {events:,} events across {workflows:,} workflows "
        f"({report['events_per_workflow']:,.0f} each)"
    )
    for column in ("measure", "p50", "p99", "target", "met"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    targets, met = report["targets"], report["met"]
    table.add_row(
        "ingest, events/s",
        f"{report['ingest_events_per_s']:,.0f}",
        "",
        f">= {targets['ingest_events_per_s']:,.0f}",
        "yes" if met["ingest_events_per_s"] else "no",
    )
    for label, key, target in (
        ("show one workflow, ms", "show_ms", "show_p99_ms"),
        ("raw LRANGE of its records, ms", "lrange_ms", ""),
        ("verify one workflow, ms", "verify_ms", ""),
    ):
        r = report[key]
        table.add_row(
            label,
            f"{r['p50']:.3f}",
            f"{r['p99']:.3f}",
            f"p99 <= {targets[target]:g}" if target else "",
            ("yes" if met[target] else "no") if target else "",
        )
    table.add_row("checkpoint of every head, ms", f"{report['checkpoint_ms']:.1f}")
    table.add_row("verify every chain, s", f"{report['verify_all_s']:.1f}")
    out.print(table)
    console.print(
        f"[dim]show is {report['show_vs_lrange']:.1f}x a raw LRANGE at p50; Redis holds "
        f"{report['redis_used_memory_mb']:,.0f} MB[/]"
    )
    _write_json(json_path, report)


@cli.group()
def audit() -> None:
    """Check what was decided: in a running deployment (--redis-url, --tenant) or in the
    record a finished `govmesh run` kept (--run RUN_ID; default the latest)."""


def audit_source(f: Any) -> Any:
    """The options that say whose records an audit command reads (see `audit_target`)."""
    # Decorators apply bottom-up; reversed, --help lists them in this order.
    for option in reversed(
        (
            click.option(
                "--run",
                "run_id",
                metavar="RUN_ID",
                help="A finished run's kept record (default: the latest, unless --redis-url).",
            ),
            click.option(
                "--redis-url",
                envvar="GOVMESH_REDIS_URL",
                help="A deployment's Redis (default: $GOVMESH_REDIS_URL); needs --tenant.",
            ),
            click.option("--tenant", help="The tenant (default with --run: the run's)."),
        )
    ):
        f = option(f)
    return f


def _audit_call(run_id: str | None, redis_url: str | None, tenant: str | None, call: Any) -> Any:
    """Run ``call(index, target)`` on the audit index the options name (`AuditTarget`);
    returns its result and the target. A kept run's server runs only while ``call`` does."""
    import redis.asyncio as aioredis

    from govmesh.observability import AuditIndex
    from govmesh.scenarios._records import audit_target

    async def go(target: Any) -> Any:
        r = aioredis.Redis.from_url(target.redis_url)
        try:
            return await call(AuditIndex(r, prefix=target.prefix), target)
        finally:
            await r.aclose()

    try:
        with audit_target(run_id=run_id, redis_url=redis_url, tenant=tenant) as target:
            if target.run is not None:
                how = "the latest finished run kept" if target.latest else "kept run"
                console.print(f"{how} [bold]{target.run.run_id}[/] ({target.tenant})")
            return _run(go(target)), target
    except GovmeshError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)


@audit.command("replay")
@audit_source
@json_option
def audit_replay(
    run_id: str | None, redis_url: str | None, tenant: str | None, json_path: Path | None
) -> None:
    """Decide every recorded policy decision again, under the policy version and inputs it
    was decided with, and report any difference. Exits 1 if there is one."""
    from govmesh.governance._replay import replay

    report, target = _audit_call(
        run_id, redis_url, tenant, lambda index, _: replay(index.redis, prefix=index.prefix)
    )
    table = Table(title=f"govmesh audit replay: {target.tenant}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("decisions replayed", f"{report.decisions:,}")
    table.add_row("same outcome and reasons", f"{report.matched:,}")
    table.add_row("of which denied under contention", f"{report.contended:,}")
    table.add_row("policy versions", str(report.policy_versions))
    table.add_row("differences", str(len(report.mismatches)))
    out.print(table)
    for m in report.mismatches:
        console.print(f"[red]difference[/] {m}")
    _write_json(json_path, report)
    if report.matched != report.decisions:
        sys.exit(1)


def _glance(summary: dict[str, Any]) -> str:
    """A record's summary on one line; hashes cut to 12 characters, amounts to 6 digits."""
    parts = []
    for name, value in summary.items():
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            text = text[:12] + "…"
        parts.append(f"{name}={text}")
    return " ".join(parts)


@audit.command("show")
@click.argument("workflow")
@audit_source
@json_option
def audit_show(
    workflow: str,
    run_id: str | None,
    redis_url: str | None,
    tenant: str | None,
    json_path: Path | None,
) -> None:
    """Print WORKFLOW's causal trace from the audit index: who asked, what was decided under
    which policy, what ran and what each model call cost."""

    from rich.markup import escape
    from rich.tree import Tree

    from govmesh.observability._export import costed_trace

    trace, _ = _audit_call(
        run_id, redis_url, tenant, lambda index, _: costed_trace(index, workflow)
    )
    if not trace.records:
        console.print(f"[yellow]no events of workflow {workflow!r} in the audit index[/]")
    by_id = {r.id: r for r in trace.records}
    cost = trace.cost
    costs = {c.id: c.cost_usd for c in cost.calls if c.cost_usd is not None}
    unpriced = f", {cost.unpriced} calls without a recorded cost" if cost.unpriced else ""
    tree = Tree(
        f"[bold]{escape(workflow)}[/]: {len(trace.records)} events; {cost.model_calls} model "
        f"calls, {cost.input_tokens + cost.output_tokens:,} tokens, "
        f"[bold]${cost.cost_usd:,.6f}[/]{unpriced}"
    )

    def add(parent: Tree, record_id: str) -> None:
        r = by_id[record_id]
        when = time.strftime("%H:%M:%S", time.localtime(r.ts))
        spent = f" [green]${costs[r.id]:,.6f}[/]" if r.id in costs else ""
        node = parent.add(
            f"[dim]#{r.seq} {when}[/] [bold]{escape(r.kind)}[/] from [cyan]"
            f"{escape(r.sender)}[/] {escape(_glance(r.summary))}{spent}"
        )
        for child in trace.children.get(record_id, ()):
            add(node, child)

    for root in trace.roots:
        add(tree, root)
    out.print(tree)
    if trace.refused:
        out.print(
            f"[bold red]{len(trace.refused)} messages that claimed {escape(workflow)} were "
            "refused[/] (security events, not part of the trace):"
        )
        for m in trace.refused:
            out.print(_refused_line(m), highlight=False, soft_wrap=True)
    _write_json(json_path, trace, what="trace")


def _refused_line(m: Any) -> str:
    """A `RefusedMessage` on one line of rich markup; what it claimed is escaped."""
    from rich.markup import escape

    when = time.strftime("%H:%M:%S", time.localtime(m.stored_at))
    claimed = " ".join(
        f"{name}={escape(value)}"
        for name, value in (("kind", m.kind), ("sender", m.claimed_sender), ("id", m.id))
        if value
    )
    return (
        f"[dim]stream #{m.seq} {when}[/] [red]{escape(m.reason)}[/] on {escape(m.subject)}"
        f" claimed {claimed or 'nothing readable'}: {escape(m.detail)}"
    )


@audit.command("verify")
@click.argument("workflow", required=False)
@audit_source
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    help="Hex Ed25519 public key checkpoints must be signed with (repeatable).",
)
@json_option
def audit_verify(
    workflow: str | None,
    run_id: str | None,
    redis_url: str | None,
    tenant: str | None,
    trusted_keys: tuple[str, ...],
    json_path: Path | None,
) -> None:
    """Check the hash chain of WORKFLOW (default: every workflow) and the last signed
    checkpoint; list each changed, removed, reordered, inserted or truncated record.
    Workflows removed by `audit prune` are counted, not reported; so are messages of the
    stream the index refused (forged, replayed, malformed: security events kept out of
    every chain; for WORKFLOW, those that claimed it). Exits 1 on a problem."""
    from govmesh.identity import VerifyKey

    try:
        trusted = [VerifyKey(bytes.fromhex(k)) for k in trusted_keys]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--trusted-key") from None
    report, target = _audit_call(
        run_id, redis_url, tenant, lambda index, _: index.verify(workflow, trusted=trusted)
    )
    table = Table(
        title=f"govmesh audit verify: {target.tenant}" + (f" {workflow}" if workflow else "")
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("workflows checked", f"{report.workflows:,}")
    table.add_row("records checked", f"{report.records:,}")
    table.add_row("workflows pruned by retention", f"{report.pruned:,}")
    table.add_row("signed checkpoint", "none" if not report.checkpoint_ts else "checked")
    table.add_row(
        "messages refused, kept apart",
        ", ".join(f"{reason} {n}" for reason, n in report.refused_reasons.items()) or "0",
    )
    table.add_row("problems", str(len(report.problems)))
    out.print(table)
    for p in report.problems:
        out.print(f"[red]{p.what}[/] workflow {p.workflow!r} seq {p.seq}: {p.detail}")
    _write_json(json_path, report)
    if report.problems:
        sys.exit(1)


@audit.command("export")
@click.argument("workflow")
@audit_source
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the bundle [default: evidence-WORKFLOW.json].",
)
def audit_export(
    workflow: str,
    run_id: str | None,
    redis_url: str | None,
    tenant: str | None,
    out_path: Path | None,
) -> None:
    """Write WORKFLOW's evidence bundle: one JSON file with every event and its chain hash,
    the decisions with their policy hashes and texts, approvals with who answered, why and
    their signature, costs, the chain's verify result and the latest signed checkpoint,
    the messages that claimed WORKFLOW but were refused (security events, apart from the
    events), and a sha256 digest of the rest. Exits 1 if the chain has a problem (the
    bundle says which) or holds no event (then no bundle is written)."""
    from govmesh.observability._export import bundle_digest, export_bundle

    bundle, _ = _audit_call(
        run_id,
        redis_url,
        tenant,
        lambda index, target: export_bundle(
            index.redis,
            tenant=target.tenant,
            prefix=index.prefix,
            workflow=workflow,
            source=target.source,
        ),
    )
    if not (bundle["events"] or bundle["pruned"]):
        console.print(f"[red]error:[/] no events of workflow {workflow!r} in the audit index")
        sys.exit(1)
    _write_json(out_path or Path(f"evidence-{workflow}.json"), bundle, what="evidence bundle")
    integrity = bundle["integrity"]["verify"]
    out.print(
        f"{len(bundle['events'])} events, {len(bundle['decisions'])} decisions, "
        f"{len(bundle['approvals'])} approvals, ${bundle['costs']['cost_usd']:,.6f}; chain "
        + ("intact" if integrity["ok"] else f"[red]{len(integrity['problems'])} problems[/]")
        + (
            f"; [red]{len(bundle['refused'])} refused messages[/] kept apart"
            if bundle["refused"]
            else ""
        )
        + f"; sha256 {bundle_digest(bundle)}"
    )
    if not integrity["ok"]:
        sys.exit(1)


@audit.command("prune")
@click.option(
    "--older-than",
    required=True,
    metavar="DURATION",
    help="Age such as 30d, 12h or 2w: remove what ended longer ago than that.",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@audit_source
@json_option
def audit_prune(
    older_than: str,
    dry_run: bool,
    run_id: str | None,
    redis_url: str | None,
    tenant: str | None,
    json_path: Path | None,
) -> None:
    """Retention. With --redis-url (or --run): remove from that audit index the workflows
    that ended and whose latest event is older than DURATION, with their decision records,
    approvals and spend; each leaves a prune mark, so `audit verify` counts it as pruned,
    not as tampering; and the refused messages older than DURATION. Without either: remove
    the kept runs that finished longer ago than DURATION, each listed in
    $GOVMESH_HOME/records/prune.log first."""

    from govmesh.observability._export import prune_index
    from govmesh.scenarios._records import parse_duration, prune_kept

    try:
        seconds = parse_duration(older_than)
    except GovmeshError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    verb = "would remove" if dry_run else "removed"
    if run_id is None and not redis_url:
        try:
            runs = prune_kept(seconds, now=time.time(), dry_run=dry_run)
        except GovmeshError as exc:
            console.print(f"[red]error:[/] {exc}")
            sys.exit(2)
        for m in runs:
            out.print(
                f"{verb} kept run {m.run_id} ({Path(m.scenario).name}, {m.workflows} workflows)"
            )
        out.print(f"{verb} {len(runs)} kept runs older than {older_than}")
        _write_json(json_path, runs)
        return
    report, _ = _audit_call(
        run_id,
        redis_url,
        tenant,
        lambda index, _: prune_index(
            index.redis, prefix=index.prefix, older_than_s=seconds, dry_run=dry_run
        ),
    )
    out.print(
        f"{verb} {len(report.workflows)} ended workflows older than {older_than}, "
        f"with {report.decisions} decision records and {report.approvals} approvals, "
        f"and {report.refused} refused messages stored before then"
    )
    _write_json(json_path, report)


@audit.command("runs")
@json_option
def audit_runs(json_path: Path | None) -> None:
    """List the finished runs whose records are kept under $GOVMESH_HOME/records, with the
    messages the audit refused in each (`audit verify --run RUN_ID` says why)."""

    from govmesh.scenarios._records import kept_runs

    runs = kept_runs()
    table = Table(title=f"kept runs: {len(runs)}")
    for column in ("run", "scenario", "tenant", "started", "finished", "workflows", "refused"):
        table.add_column(column, justify="right" if column in ("workflows", "refused") else "left")
    for m in runs:
        table.add_row(
            m.run_id,
            Path(m.scenario).name,
            m.tenant,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(m.started_at)),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(m.finished_at)),
            str(m.workflows),
            f"[red]{m.refused}[/]" if m.refused else "0",
        )
    out.print(table)
    _write_json(json_path, runs, what="list")


@cli.group()
def approvals() -> None:
    """List and answer escalated tool calls of a running deployment."""


tenant_option = click.option(
    "--tenant",
    envvar="GOVMESH_TENANT",
    help="The deployment's tenant; needed only when several run here.",
)


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


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
    summary = _glance(event.summary)
    style = _WATCH_STYLES.get(event.kind, "") or "default"
    return (
        f"{when} [bold]{escape(event.workflow or '-')}[/] [{style}]{escape(event.kind)}[/] "
        f"{escape(event.sender)}: {escape(summary)}"
    )


def _usd(amount: float | None) -> str:
    return "" if amount is None else f"${amount:,.2f}"


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
    for column in ("workflow", "tool", "amount", "age"):
        pending.add_column(column, justify="right" if column in ("amount", "age") else "left")
    for a in board.pending:
        pending.add_row(
            escape(a.workflow), escape(a.tool), _usd(a.amount_usd), _age(board.at - a.requested_at)
        )
    answers = [
        f"[{'green' if a.approved else 'red'}]{'approved' if a.approved else 'denied'}[/] by "
        f"{escape(a.by)}: {escape(' '.join(filter(None, (a.workflow, a.tool))))} "
        f"({_age(board.at - a.ts)} ago)"
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
def watch(
    tenant: str | None,
    workflow: str,
    kinds: tuple[str, ...],
    replay: bool,
    count: int | None,
    live: bool | None,
    json_path: Path | None,
) -> None:
    """Follow a running deployment's events live: decisions, escalations, model use, tool
    results, security events, and messages on the stream that fail verification (shown as
    refused security events, never as what they claim). Joins the deployment `govmesh run`
    advertises; stops when it stops, after --count events, or on Ctrl-C.

    On a terminal (or with --live) it shows a dashboard: decisions by outcome and policy,
    pending approvals and their answers, spend per workflow, security events, workflows
    started and finished, and the latest events. --replay first folds in what happened
    before it joined.
    """

    from rich.live import Live

    from govmesh.observability._watch import WatchBoard, watch_events
    from govmesh.runtime import join

    board = WatchBoard()
    seen: list[WatchedEvent] = []
    title = "govmesh watch"

    async def follow(show: Callable[[WatchedEvent], None]) -> bool:
        """Fold in and show events until --count; False then, True if the deployment
        stopped first."""
        nonlocal title
        joined = join(tenant)
        title = f"govmesh watch: {joined.deployment.tenant}" + (
            f" ({joined.what})" if joined.what else ""
        )
        n = 0
        async for event in watch_events(joined, replay=replay, workflow=workflow, kinds=kinds):
            board.add(event)
            if json_path is not None:
                seen.append(event)
            show(event)
            n += 1
            if count is not None and n >= count:
                return False
        return True

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
                stopped = _run(dashboard(view))
        else:
            stopped = _run(
                follow(lambda e: out.print(_event_line(e), highlight=False, soft_wrap=True))
            )
        if stopped:
            console.print("the deployment stopped; nothing more to watch")
    finally:
        _write_json(
            json_path, {"events": seen, "board": board.snapshot(time.time())}, what="events"
        )


@approvals.command("list")
@tenant_option
@json_option
def approvals_list(tenant: str | None, json_path: Path | None) -> None:
    """List the pending approvals, oldest first."""

    from govmesh.governance._operator import OperatorDesk
    from govmesh.runtime import join

    async def pending() -> list[Any]:
        async with OperatorDesk(join(tenant)) as desk:
            return await desk.pending()

    requests = _run(pending())
    now = time.time()
    table = Table(title=f"pending approvals: {len(requests)}")
    for column in ("id", "workflow", "asks", "why", "waiting", "lapses"):
        table.add_column(column, no_wrap=column == "id")
    for r in requests:
        amount = r.args.get("amount_usd")
        asks = " ".join(
            part
            for part in (
                f"{r.agent}: {r.tool}",
                f"${amount:,.2f}" if isinstance(amount, int | float) else "",
                str(r.args.get("vendor", "")),
            )
            if part
        )
        table.add_row(
            r.approval_id[:12],
            r.workflow,
            asks,
            "; ".join(r.reasons),
            _age(now - r.requested_at),
            f"in {_age(r.expires_at - now)}, then {r.on_expiry}" if r.expires_at else "never",
        )
    out.print(table)
    _write_json(json_path, requests, what="list")


def _answer(
    approval_id: str,
    *,
    approved: bool,
    by: str,
    reason: str,
    tenant: str | None,
    json_path: Path | None,
) -> None:

    from govmesh.governance._operator import ApprovalNotPending, OperatorDesk
    from govmesh.runtime import join

    async def answer() -> Any:
        async with OperatorDesk(join(tenant)) as desk:
            try:
                return await desk.answer(approval_id, approved=approved, by=by, reason=reason)
            except ApprovalNotPending as exc:
                return exc

    got = _run(answer())
    if isinstance(got, ApprovalNotPending):
        console.print(f"[yellow]{got}[/]")
        sys.exit(1)
    request, result = got
    colour = "green" if result.outcome == "allow" else "red"
    out.print(
        f"approval {request.approval_id} ({request.workflow}, {request.tool}): "
        f"[{colour}]{result.outcome}[/]; " + "; ".join(result.reasons)
    )
    _write_json(json_path, result, what="result")


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


@cli.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--workflows", "-n", type=int, help="With SCENARIO: workflows to forecast.")
@click.option("--seed", "-s", type=int, help="With SCENARIO: seed of the resampling [default: 0].")
@click.option("--draws", type=int, help="With SCENARIO: resampled totals [default: 2000].")
@click.option("--iterations", type=float, help="Useful model answers per workflow.")
@click.option("--tokens-per-iteration", type=float, help="Tokens of one model call.")
@click.option("--cost-per-1k", type=float, help="USD per 1,000 tokens.")
@click.option("--error-probability", type=float, help="Chance an answer is unusable, 0-1.")
@click.option(
    "--retry-multiplier", type=float, help="Iterations' worth of calls an unusable answer costs."
)
@json_option
def forecast(
    scenario: Path | None,
    workflows: int | None,
    seed: int | None,
    draws: int | None,
    iterations: float | None,
    tokens_per_iteration: float | None,
    cost_per_1k: float | None,
    error_probability: float | None,
    retry_multiplier: float | None,
    json_path: Path | None,
) -> None:
    """Forecast model cost with ATFM: per workflow from the five parameter flags, or for
    N workflows of SCENARIO, calibrated on the usage its runs recorded under
    $GOVMESH_HOME/usage.

    Cost = iterations x tokens per iteration x cost per 1K / 1000 x REF, where
    REF = 1 + error probability x retry multiplier.
    """
    from typing import NoReturn

    import msgspec
    from rich.markup import escape

    from govmesh import forecasting as fc

    flags = {
        "iterations": iterations,
        "tokens_per_iteration": tokens_per_iteration,
        "cost_per_1k": cost_per_1k,
        "error_probability": error_probability,
        "retry_multiplier": retry_multiplier,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if scenario is not None and given:
        raise click.UsageError("give a SCENARIO or the parameter flags, not both")
    if scenario is None and not given:
        raise click.UsageError("give a SCENARIO and --workflows N, or the five parameter flags")
    if scenario is None and (workflows, seed, draws) != (None, None, None):
        raise click.UsageError("--workflows, --seed and --draws go with a SCENARIO")
    if scenario is None and len(given) < len(flags):
        missing = [f"--{k.replace('_', '-')}" for k in flags if k not in given]
        raise click.UsageError(f"missing {', '.join(missing)}")

    def fail(message: object) -> NoReturn:
        console.print("[red]error:[/]", escape(str(message)), soft_wrap=True)
        sys.exit(2)

    if scenario is None:
        try:
            params = fc.AtfmParams(**given)
        except GovmeshError as exc:
            fail(exc)
        table = Table(title="govmesh forecast: ATFM, per workflow")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for name, value in given.items():
            table.add_row(name.replace("_", " "), f"{value:,.10g}")
        table.add_row("REF", f"{params.ref:g}")
        table.add_row("expected cost", f"${params.expected_cost_usd:,.4f}")
        table.add_row("P95 cost (retries vary)", f"${params.p95_cost_usd:,.4f}")
        out.print(table)
        console.print(f"[dim]P95: {fc.P95_METHOD}[/]")
        _write_json(
            json_path,
            {
                **msgspec.to_builtins(params),
                "ref": params.ref,
                "expected_cost_usd": params.expected_cost_usd,
                "p95_cost_usd": params.p95_cost_usd,
                "p95_method": fc.P95_METHOD,
            },
        )
        return

    if workflows is None:
        raise click.UsageError("give --workflows N: how many workflows to forecast")
    from govmesh.scenarios import load_scenario

    try:
        name = load_scenario(scenario).name
        history = fc.UsageHistory()
        records = history.read(name)
        if not records:
            fail(
                f"no usage of scenario {name!r} is recorded yet (nothing in "
                f"{history.path(name)}); run `govmesh run {scenario}` first"
            )
        result = fc.forecast(
            fc.calibrate(records),
            name,
            workflows,
            seed=0 if seed is None else seed,
            draws=2000 if draws is None else draws,
        )
    except GovmeshError as exc:
        fail(exc)
    roles = Table(
        title=f"ATFM per role, fitted to {result.recorded_workflows:,} recorded workflows"
    )
    roles.add_column("parameter (± standard error)")
    for r in result.roles:
        roles.add_column(r.role, justify="right")
    fitted = [msgspec.to_builtins(r.params) for r in result.roles]
    stderr = [{} if r.stderr is None else msgspec.to_builtins(r.stderr) for r in result.roles]
    for key, fmt in (
        ("iterations", ".2f"),
        ("tokens_per_iteration", ",.0f"),
        ("cost_per_1k", ".5f"),
        ("error_probability", ".3f"),
        ("retry_multiplier", ".3f"),
    ):
        roles.add_row(
            key.replace("_", " "),
            *(
                f"{f[key]:{fmt}}" + (f" ± {e[key]:{fmt}}" if e else "")
                for f, e in zip(fitted, stderr, strict=True)
            ),
        )
    roles.add_row("REF", *(f"{r.ref:.3f}" for r in result.roles))
    roles.add_row("expected per workflow", *(f"${r.expected_cost_usd:,.4f}" for r in result.roles))
    out.print(roles)
    table = Table(title=f"govmesh forecast: {result.workflows:,} workflows of {name}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("expected total", f"${result.expected_cost_usd:,.4f}")
    table.add_row(
        f"total P5 - P95 ({result.total_method})",
        f"${result.p5_cost_usd:,.4f} - ${result.p95_cost_usd:,.4f}",
    )
    table.add_row("expected per workflow", f"${result.per_workflow_expected_usd:,.4f}")
    table.add_row("P90 per workflow", f"${result.per_workflow_p90_usd:,.4f}")
    out.print(table)
    console.print(f"[dim]{fc.FORECAST_METHOD}[/]")
    _write_json(json_path, {**msgspec.to_builtins(result), "method": fc.FORECAST_METHOD})


def main() -> None:
    """Entry point of the ``govmesh`` command."""
    cli()


if __name__ == "__main__":
    main()
