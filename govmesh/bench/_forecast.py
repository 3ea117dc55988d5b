"""``govmesh bench forecast``: how well cost forecasts calibrated on some runs predict
others.

Swarm runs of a scenario, each with its own seed, on one embedded deployment (Ray actors,
mutual-TLS nats-server, Valkey). The first ``calibration`` runs record their usage; each
of the ``held_out`` runs that follow is forecast from those records alone, before it starts,
exactly as `govmesh run` forecasts a run, and compared with what it cost after:

- ``within_8pct_share``: share of held-out runs whose total-cost forecast is within 8% of
  the actual total;
- ``p90_coverage``: share of all held-out workflows that cost no more than the per-workflow
  P90 bound;
- ``median_abs_error``: median of the held-out runs' absolute relative total error.

The forecaster sees recorded usage only, never the simulated model's settings. The
scenario's durable waits run as it says, on its own clock: they cost nothing.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from govmesh.forecasting import UsageHistory
from govmesh.llm import SimulatedModelSettings
from govmesh.scenarios import new_issuer, run_workflows, scenario_app

__all__ = ["run_forecast_bench"]

WITHIN_8PCT_TARGET: Final = 0.95
P90_COVERAGE_TARGET: Final = (0.85, 0.95)

Progress = Callable[[str, int], None]


async def run_forecast_bench(
    scenario_path: str | Path,
    *,
    calibration: int = 10,
    held_out: int = 20,
    workflows: int = 100,
    tick: Progress | None = None,
) -> dict[str, Any]:
    """Calibrate on ``calibration`` runs, forecast ``held_out`` more, report the accuracy.

    Args:
        scenario_path: the scenario file.
        calibration: runs whose usage is recorded (seeds 1 to ``calibration``).
        held_out: runs forecast from those records (the seeds after).
        workflows: workflows per run.
        tick: progress callback ``(phase, runs done)``.
    """
    from govmesh.runtime import Runtime

    progress = tick or (lambda _s, _n: None)
    scenario = scenario_app(scenario_path)
    rows: list[dict[str, Any]] = []
    coverage: list[float] = []
    with tempfile.TemporaryDirectory(prefix="govmesh-bench-forecast-") as tmp:
        recorded = UsageHistory(Path(tmp) / "calibration")
        async with Runtime() as runtime:
            issuer = new_issuer(scenario.tenant)
            deployment = issuer.deployment(
                tenant=scenario.tenant,
                nats_url=runtime.nats_url,
                redis_url=runtime.redis_url,
                tls=runtime.transport is not None,
            )
            for seed in range(1, calibration + held_out + 1):
                calibrating = seed <= calibration
                progress("calibration runs" if calibrating else "held-out runs", seed - 1)
                history = recorded
                if not calibrating:
                    # Forecast from the calibration records; this run's own usage goes to a
                    # copy that is thrown away, so no held-out run calibrates another.
                    copy = Path(tmp) / f"held-out-{seed}"
                    shutil.copytree(Path(tmp) / "calibration", copy)
                    history = UsageHistory(copy)
                report = await run_workflows(
                    scenario,
                    deployment,
                    issuer,
                    workflows=workflows,
                    seed=seed,
                    transport=runtime.transport,
                    history=history,
                )
                if report["workflows"]["finished"] != workflows:
                    raise RuntimeError(
                        f"run of seed {seed} finished {report['workflows']['finished']} of "
                        f"{workflows} workflows; nothing to compare"
                    )
                if calibrating:
                    continue
                f = report["forecast"]
                actual = f["actual"]
                rows.append(
                    {
                        "seed": seed,
                        "forecast_usd": f["expected_cost_usd"],
                        "p5_usd": f["p5_cost_usd"],
                        "p95_usd": f["p95_cost_usd"],
                        "actual_usd": actual["actual_usd"],
                        "error": actual["total_error"],
                        "p90_coverage": actual["p90_coverage"],
                    }
                )
                coverage.append(actual["p90_coverage"])
            progress("done", calibration + held_out)
    errors = [abs(r["error"]) for r in rows]
    within = sum(1 for e in errors if e <= 0.08) / len(rows)
    p90 = statistics.fmean(coverage)
    low, high = P90_COVERAGE_TARGET
    return {
        "scenario": scenario.name,
        "model": {
            "name": scenario.entry.model_name(),
            "provider": scenario.entry.model_provider(),
            "simulated": isinstance(scenario.entry.model, SimulatedModelSettings),
        },
        "workflows_per_run": workflows,
        "calibration_runs": calibration,
        "calibration_workflows": calibration * workflows,
        "runs": len(rows),
        "within_8pct_share": within,
        "p90_coverage": p90,
        "median_abs_error": statistics.median(errors),
        "max_abs_error": max(errors),
        "within_p5_p95_share": sum(
            1 for r in rows if r["p5_usd"] <= r["actual_usd"] <= r["p95_usd"]
        )
        / len(rows),
        "targets": {"within_8pct_share": WITHIN_8PCT_TARGET, "p90_coverage": [low, high]},
        "met": {
            "within_8pct_share": within >= WITHIN_8PCT_TARGET,
            "p90_coverage": low <= p90 <= high,
        },
        "held_out": rows,
    }
