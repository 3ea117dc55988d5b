"""``govmesh run`` and ``govmesh chaos``: an app's workflows (from a scenario file or
``--app package.module:app``), without and with faults."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.progress import (
    Progress,
    TextColumn,
)
from rich.table import Table

from govmesh.cli._common import (
    console,
    json_option,
    out,
    progress_bar,
    run_async,
    write_json,
)
from govmesh.cli._root import cli
from govmesh.errors import GovmeshError


def _app_options(command: Any) -> Any:
    command = click.option(
        "--app-dir",
        default=".",
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Where --app's module is found (and its actors find it).",
    )(command)
    return click.option(
        "--app",
        "app",
        metavar="PACKAGE.MODULE:APP",
        help="Run this govmesh.App instead of a SCENARIO file.",
    )(command)


def _source(scenario: Path | None, app: str | None) -> None:
    if scenario is not None and app is not None:
        raise click.UsageError("give a SCENARIO file or --app, not both")


@cli.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path), required=False)
@_app_options
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
@click.option(
    "--insecure-bus",
    is_flag=True,
    help="Run on an external NATS (GOVMESH_NATS_URL) without mutual TLS: anyone who "
    "reaches it reads every message. Refused without this flag; the report says so.",
)
@click.option(
    "--prometheus-port",
    type=click.IntRange(0, 65535),
    help="Serve the deployment's metrics (decisions, tokens, cost, security rejections) for "
    "Prometheus on this port while it runs (0: a free one). Default: the scenario's or "
    "app's prometheus_port, else not served.",
)
@click.option(
    "--prometheus-host",
    default="127.0.0.1",
    show_default=True,
    help="The address --prometheus-port binds; 0.0.0.0 for a Prometheus on another machine.",
)
@click.option(
    "--prometheus-linger",
    "prometheus_linger_s",
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="Once the workflows end, count all their events into the metrics and serve them "
    "until scraped once, at most SECONDS: a run shorter than Prometheus' scrape interval "
    "still has its final figures scraped. Default: the scenario's or app's "
    "prometheus_linger_s, else stop serving with the run.",
)
@json_option
def run(
    scenario: Path | None,
    app: str | None,
    app_dir: Path,
    workflows: int,
    seed: int,
    concurrency: int,
    manual_approvals: bool,
    resume: str | None,
    insecure_bus: bool,
    prometheus_port: int | None,
    prometheus_host: str,
    prometheus_linger_s: float | None,
    json_path: Path | None,
) -> None:
    """Run SCENARIO (or --app) with a swarm of agent actors and print a summary.

    While it runs, `govmesh approvals list|approve|deny` works against it from another
    terminal (the deployment is advertised under $GOVMESH_HOME, default ~/.govmesh).
    A run that is stopped before its workflows finish keeps its data under
    $GOVMESH_HOME/runs/RUN_ID; `govmesh run --resume RUN_ID` finishes it.
    """
    from govmesh.scenarios import run_scenario
    from govmesh.scenarios._records import load_resumable
    from govmesh.scenarios._runner import run_dir
    from govmesh.scenarios._runs import new_run_id

    _source(scenario, app)
    if scenario is None and app is None and resume is None:
        raise click.UsageError("give a SCENARIO file or --app, or --resume RUN_ID")
    if (scenario is not None or app is not None) and resume is not None:
        raise click.UsageError(
            "--resume takes the scenario or app of the run; give no SCENARIO or --app"
        )
    run_id = resume or new_run_id()
    if resume is not None:
        try:
            manifest = load_resumable(run_dir(resume))
        except GovmeshError as exc:
            raise click.ClickException(str(exc)) from None
        workflows, manual_approvals = manifest.workflows, manifest.manual_approvals
        console.print(f"resuming run [bold]{run_id}[/] of {manifest.scenario or manifest.app}")
    if prometheus_port:
        console.print(
            f"metrics for Prometheus: [bold]http://{prometheus_host}:{prometheus_port}/metrics[/]"
        )
    if manual_approvals:
        console.print(
            "escalations wait for an operator: [bold]govmesh approvals list[/], then "
            "[bold]govmesh approvals approve ID --by NAME[/] (or deny)"
        )

    from rich.live import Live

    progress = progress_bar(TextColumn("{task.fields[tally]}"))
    view = _BurnView(progress)
    with Live(view, console=console, refresh_per_second=4, transient=False):
        task = progress.add_task("starting", total=workflows, tally="")
        tally: dict[str, int] = {}
        phases: list[str] = []

        def on_done(_: str, outcome: Any) -> None:
            tally[outcome.result] = tally.get(outcome.result, 0) + 1
            text = " ".join(f"{k}={v}" for k, v in sorted(tally.items()))
            progress.update(task, advance=1, tally=text, description="workflows")

        def on_phase(text: str) -> None:
            if not phases and resume is None:
                # Said once the input is checked and the run's directory exists: a run
                # refused before it started has nothing to resume.
                console.print(
                    f"run [bold]{run_id}[/]; if it is stopped, "
                    f"[bold]govmesh run --resume {run_id}[/] finishes it"
                )
            phases.append(text)
            progress.update(task, description=text)
            if text == "stopping":
                view.burns = []

        report = run_async(
            run_scenario(
                scenario,
                app=app,
                app_dir=app_dir,
                workflows=workflows,
                seed=seed,
                concurrency=concurrency,
                simulated_approver=not manual_approvals,
                on_done=on_done,
                on_phase=on_phase,
                run_id=run_id,
                resume=resume is not None,
                on_burn=view.update,
                insecure_bus=insecure_bus,
                prometheus_port=prometheus_port,
                prometheus_host=prometheus_host,
                prometheus_linger_s=prometheus_linger_s,
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
    write_json(json_path, report)
    if report["workflows"]["finished"] != report["workflows"]["total"]:
        sys.exit(1)


@cli.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path), required=False)
@_app_options
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
    scenario: Path | None,
    app: str | None,
    app_dir: Path,
    workflows: int,
    kills: int,
    seed: int,
    concurrency: int,
    json_path: Path | None,
) -> None:
    """Run SCENARIO (or --app) while killing its actors and restarting its servers; check
    that every workflow finished, no effect happened twice and no approval was lost.

    Effects are counted from each tool's own record of them (the tools that declare an
    effects lister). The strikes SIGKILL every agent's actor process, the state actor, a
    governance actor and the gateway, and restart the Redis-protocol server and
    nats-server, spread over the run. Exits 1 if a workflow did not finish or an effect or
    approval went wrong.
    """
    from govmesh.scenarios._chaos import run_chaos

    _source(scenario, app)
    if scenario is None and app is None:
        raise click.UsageError("give a SCENARIO file or --app")
    with progress_bar(TextColumn("{task.fields[tally]}")) as progress:
        task = progress.add_task("starting", total=workflows, tally="")

        def on_done(_: str, outcome: Any) -> None:
            progress.update(task, advance=1, description="workflows")

        def on_phase(text: str) -> None:
            progress.update(task, description=text)

        report = run_async(
            run_chaos(
                scenario,
                app=app,
                app_dir=app_dir,
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
    effects = report["effects"]
    table.add_row(
        "effects (tools' own records)",
        ", ".join(f"{tool} {n}" for tool, n in sorted(effects.items())) or "no tool lists any",
    )
    table.add_row("duplicate effects", str(report["duplicate_effects"]))
    table.add_row("lost approvals", str(report["lost_approvals"]))
    landed, asked = report["kills"], report["kills_asked"]
    table.add_row(
        "strikes",
        str(landed) if landed == asked else f"{landed} of {asked} (the workflows finished first)",
    )
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
    table.add_row("outcomes", _results(report["run"]["workflows"]["results"]))
    t = report["run"]["timings_s"]
    table.add_row("time (workflows / total)", f"{t['workflows_s']:.1f} / {t['total_s']:.1f} s")
    out.print(table)
    write_json(json_path, report)
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
    runtime = report.get("runtime", {})
    if runtime.get("insecure_bus"):
        table.add_row("[red]bus[/]", "[red]INSECURE (--insecure-bus): NATS without mutual TLS[/]")
    if callout := runtime.get("auth_callout"):
        refused = sum(callout["refused"].values())
        table.add_row(
            "NATS auth callout",
            f"{sum(callout['admitted'].values())} connections admitted"
            + (f", [red]{refused} refused[/]" if refused else ", none refused"),
        )
    table.add_row("outcomes", _results(w["results"]))
    for result, reasons in report.get("why", {}).items():
        table.add_row(f"why {result}", "; ".join(f"{why} ({n})" for why, n in reasons.items()))
    for tool, call in report["calls"].items():
        table.add_row(f"first call: {tool}", _shown(call))
    models = {
        (a["model"]["name"], a["model"]["simulated"], a["model"].get("provider", ""))
        for a in report["agents"].values()
    }
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
        "tokens ("
        + ", ".join(
            f"simulated model {name}"
            if simulated
            else f"model {name}" + (f" ({provider})" if provider else "")
            for name, simulated, provider in sorted(models)
        )
        + ")",
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
    timers = report["timers"]
    if timers["fired"] or timers["missed"]:
        clock = "simulated clock" if report["clock"]["simulated"] else "real clock"
        table.add_row(
            f"durable timers ({clock})",
            f"fired {timers['fired']}, missed {timers['missed']}",
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
    if prometheus := report.get("prometheus"):
        table.add_row("metrics for Prometheus (while it ran)", prometheus["url"])
        if "scraped" in prometheus:
            final = "scraped" if prometheus["scraped"] else "not scraped before the linger ended"
            if not prometheus["caught_up"]:
                final += f"; counted only to event {prometheus['counted_seq']}"
            table.add_row("final metrics", final)
    t = report["timings_s"]
    table.add_row(
        "time (start / workflows / after / total)",
        f"{t['start_s']:.1f} / {t['workflows_s']:.1f} / {t['after_s']:.1f} / {t['total_s']:.1f} s",
    )
    return table


def _results(results: dict[str, int]) -> str:
    """Workflow results as the agents named them, most frequent first."""
    return ", ".join(f"{name} {n}" for name, n in results.items()) or "none"


def _shown(call: dict[str, Any]) -> str:
    """A tool's first calls: how many, how they ended, and the arguments it shows."""
    parts = [f"{call['workflows']} workflows ({_results(call['results'])})"]
    for name, field in call["shown"].items():
        if "values" in field:
            values = ", ".join(f"{v or '(empty)'} {n}" for v, n in field["values"].items())
            parts.append(f"{name}: {values}")
        else:
            parts.append(
                f"{name}: {field['min']:g} to {field['max']:g}, total {field['total']:,.2f}"
            )
    return "; ".join(parts)
