"""``govmesh forecast``: the ATFM cost forecast of a workflow or a scenario."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from govmesh.cli._common import console, json_option, out, write_json
from govmesh.cli._root import cli
from govmesh.errors import GovmeshError


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
        write_json(
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
    write_json(json_path, {**msgspec.to_builtins(result), "method": fc.FORECAST_METHOD})
