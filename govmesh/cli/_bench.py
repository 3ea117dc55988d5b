"""``govmesh bench``: the benchmarks."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from govmesh.cli._common import (
    console,
    json_option,
    out,
    phase_ticker,
    progress_bar,
    run_async,
    write_json,
)
from govmesh.cli._root import cli


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

    with progress_bar() as progress:
        task = progress.add_task("auth", total=len(SETUPS) * 2 * agents * messages)

        def tick(setup: str, n: int) -> None:
            if setup:
                progress.update(task, description=f"auth: {setup}")
            progress.advance(task, n)

        report = run_async(
            run_auth_bench(agents=agents, messages=messages, warmup=warmup, tick=tick)
        )
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
    write_json(json_path, report)


@bench.command("governance")
@click.option(
    "--decisions",
    default=100_000,
    show_default=True,
    type=click.IntRange(100),
    help="Timed in-process decisions per engine (seed policy, 100 policies, general rules, "
    "cedarpy, the Agent Governance Toolkit on the seed and on the general rules).",
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
    """Decision latency in process and over the bus, throughput, cedarpy and the Agent
    Governance Toolkit, in one run."""
    from govmesh.bench._governance import run_governance_bench

    with progress_bar(auto_refresh=False) as progress:
        timed = decisions // 100 * 100
        task = progress.add_task("governance", total=6 * timed + 10 * intents)
        tick = phase_ticker(progress, task)

        report = run_async(run_governance_bench(decisions=decisions, intents=intents, tick=tick))
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
    agt, general, agt_general = (
        report["agt_in_process_us"],
        report["in_process_general_us"],
        report["agt_general_us"],
    )
    row("AGT PolicyEvaluator, us", f"{agt['p50']:.2f}", f"{agt['p99']:.2f}")
    row(
        "speedup vs AGT",
        f"{report['speedup_vs_agt']:.1f}x",
        target=f"> {targets['speedup_vs_agt']:g}x",
        key="speedup_vs_agt",
    )
    row("general rules, us", f"{general['p50']:.2f}", f"{general['p99']:.2f}")
    row(
        "AGT, general rules, us",
        f"{agt_general['p50']:.2f}",
        f"{agt_general['p99']:.2f}",
    )
    row("speedup vs AGT, general rules", f"{report['speedup_vs_agt_general']:.1f}x")
    row("AGT disagreements", f"{report['agt_disagreements']} / {report['agt_compared']}")
    row(
        "AGT disagreements, general rules",
        f"{report['agt_general_disagreements']} / {report['agt_general_compared']}",
    )
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
    write_json(json_path, report)


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

    with progress_bar() as progress:
        task = progress.add_task("starting", total=calibration_runs + held_out_runs)

        def tick(phase: str, done: int) -> None:
            progress.update(task, description=phase, completed=done)

        report = run_async(
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
    write_json(json_path, report)


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

    with progress_bar(auto_refresh=False) as progress:
        task = progress.add_task("state", total=3 * snapshots)
        tick = phase_ticker(progress, task)

        report = run_async(run_state_bench(snapshots=snapshots, tick=tick))
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
    write_json(json_path, report)


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

    with progress_bar(auto_refresh=False) as progress:
        task = progress.add_task("audit", total=events + samples + 1)
        tick = phase_ticker(progress, task)

        report = run_async(
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
    write_json(json_path, report)


@bench.command("model")
@click.option(
    "--iterations",
    default=30,
    show_default=True,
    type=click.IntRange(2),
    help="Timed pairs (bare HTTP and provider), then as many plan iterations.",
)
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0))
@click.option(
    "--max-tokens",
    default=32,
    show_default=True,
    type=click.IntRange(1, 512),
    help="Tokens each paired call generates.",
)
@click.option(
    "--base-url",
    help="Measure this OpenAI-compatible server (taking no key) instead of starting the "
    "local model.",
)
@click.option("--model", "model_name", default="", help="The model's name at --base-url.")
@json_option
def bench_model(
    iterations: int,
    warmup: int,
    max_tokens: int,
    base_url: str | None,
    model_name: str,
    json_path: Path | None,
) -> None:
    """A real model per reflection-loop iteration (SmolLM2-135M-Instruct on CPU unless
    --base-url), tokens per second, and the provider's overhead over a bare HTTP call to
    the same server, in one run."""
    from govmesh.bench._model import run_model_bench

    with progress_bar(auto_refresh=False) as progress:
        task = progress.add_task("model", total=3 * iterations)
        tick = phase_ticker(progress, task)
        report = run_async(
            run_model_bench(
                iterations=iterations,
                warmup=warmup,
                max_tokens=max_tokens,
                base_url=base_url,
                model=model_name,
                tick=tick,
            )
        )
    table = Table(
        title=f"govmesh bench model: {report['model']} ({report['provider']}), "
        f"{report['cpus']} CPUs, {report['pairs']} pairs of {max_tokens} tokens"
    )
    for column in ("measure", "p50", "p99", "tokens/s"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row(
        "bare HTTP call, ms",
        f"{report['bare_ms']['p50']:.1f}",
        f"{report['bare_ms']['p99']:.1f}",
        f"{report['bare_tokens_per_s']:.1f}",
    )
    table.add_row(
        "through the provider, ms",
        f"{report['provider_ms']['p50']:.1f}",
        f"{report['provider_ms']['p99']:.1f}",
        f"{report['provider_tokens_per_s']:.1f}",
    )
    ratio, extra = report["overhead_ratio"], report["overhead_ms"]
    table.add_row("provider / bare (per pair)", f"{ratio['p50']:.3f}", f"{ratio['p99']:.3f}", "")
    table.add_row("provider - bare, ms", f"{extra['p50']:+.2f}", f"{extra['p99']:+.2f}", "")
    governed = report["governed"]
    table.add_row(
        "governed call (reserve, usage, settle), ms",
        f"{governed['governed_ms']['p50']:.1f}",
        f"{governed['governed_ms']['p99']:.1f}",
        "",
    )
    ratio, extra = governed["overhead_ratio"], governed["overhead_ms"]
    table.add_row(
        "governed / provider (per pair)", f"{ratio['p50']:.3f}", f"{ratio['p99']:.3f}", ""
    )
    table.add_row("governed - provider, ms", f"{extra['p50']:+.2f}", f"{extra['p99']:+.2f}", "")
    plan = report["plan"]
    table.add_row(
        "governed plan iteration (structured output), ms",
        f"{plan['iteration_ms']['p50']:.1f}",
        f"{plan['iteration_ms']['p99']:.1f}",
        f"{plan['tokens_per_s']:.1f}",
    )
    out.print(table)
    console.print(
        f"[dim]plan answers that follow the schema: {plan['usable_share']:.0%}; "
        f"{plan['output_tokens_mean']:.1f} tokens each on average; "
        f"{report['pairs_left_out'] + governed['pairs_left_out']} pairs left out (stopped "
        f"before {max_tokens} tokens)[/]"
    )
    write_json(json_path, report)


@bench.command("scale")
@click.argument(
    "scenario",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default="scenarios/procurement.yaml",
)
@click.option(
    "--workflows",
    "counts",
    multiple=True,
    type=click.IntRange(1),
    default=(1000, 10000),
    show_default=True,
    help="A run of this many workflows, all in flight at once; give it again for more runs.",
)
@click.option("-s", "--seed", default=1, show_default=True)
@json_option
def bench_scale(scenario: Path, counts: tuple[int, ...], seed: int, json_path: Path | None) -> None:
    """Time after the last workflow ends (budget settled, decisions replayed, audit caught
    up and verified, actors stopped) against the run's time, for runs of SCENARIO (default
    scenarios/procurement.yaml) of each size."""
    from govmesh.bench._scale import run_scale_bench

    with progress_bar() as progress:
        task = progress.add_task("starting", total=len(counts))
        tick = phase_ticker(progress, task)
        report = run_scale_bench(scenario, counts, seed=seed, tick=tick)
    table = Table(title=f"govmesh bench scale: {scenario}, {report['cpus']} CPUs")
    for column in ("workflows", "start s", "workflows s", "after s", "after/total", "audit"):
        table.add_column(column, justify="right")
    table.add_column("replay diffs", justify="right")
    for run in report["runs"]:
        done, asked = run["finished"], run["workflows"]
        table.add_row(
            f"{done:,}" if done == asked else f"{done:,} of {asked:,}",
            f"{run['start_s']:.1f}",
            f"{run['workflows_s']:.1f}",
            f"{run['after_s']:.1f}",
            f"{run['after_share']:.1%}",
            "intact" if run["audit_intact"] else "PROBLEMS",
            f"{run['replay_differences']}",
        )
    out.print(table)
    write_json(json_path, report)
