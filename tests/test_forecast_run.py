"""Forecasts on real runs: a run is forecast from earlier runs' recorded usage before it
starts and compared with what it cost; `govmesh bench forecast` end to end."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from govmesh.forecasting import UsageHistory
from govmesh.scenarios import load_scenario, run_workflows, scenario_app

from _deploy import deployment

ROOT = Path(__file__).parent.parent


async def test_a_run_is_forecast_from_recorded_usage_and_compared_after(
    secure_nats, redis_server, prefix, ray_session, tmp_path
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    scenario = load_scenario(ROOT / "scenarios" / "procurement.yaml")
    # No wait for the vendor's quote: it costs nothing and only makes the runs longer.
    requester, buyer = scenario.agents
    buyer = msgspec.structs.replace(buyer, options={})
    app = scenario_app(msgspec.structs.replace(scenario, agents=(requester, buyer)))
    history = UsageHistory(tmp_path / "usage")

    def run(seed: int):
        return run_workflows(
            app, dep, issuer, workflows=30, seed=seed, transport=transport, history=history
        )

    first = await run(1)
    assert first["forecast"] == {
        "available": False,
        "why": "no recorded usage of this scenario yet",
    }
    recorded = history.read(scenario.name)
    # One record per workflow and role that called the model, adding up to the run's cost.
    assert {r.workflow for r in recorded} == {f"{first['run_id']}-{i:05d}" for i in range(30)}
    assert {r.role for r in recorded} == {"Requester", "Procurement-Agent-v2"}
    assert sum(r.calls for r in recorded) == first["model_calls"]["counted_by_budget"]
    assert abs(sum(r.cost_usd for r in recorded) - first["cost_usd"]) < 1e-6

    second = await run(2)
    f = second["forecast"]
    assert f["available"] and f["recorded_workflows"] == 30
    assert f["p5_cost_usd"] <= f["expected_cost_usd"] <= f["p95_cost_usd"]
    actual = f["actual"]
    assert abs(actual["actual_usd"] - second["cost_usd"]) < 1e-6
    expected_error = (f["expected_cost_usd"] - actual["actual_usd"]) / actual["actual_usd"]
    assert actual["total_error"] == pytest.approx(expected_error, abs=1e-9)
    assert 0.0 <= actual["p90_coverage"] <= 1.0
    # The second run's usage is recorded too, after it was forecast.
    assert {r.run_id for r in history.read(scenario.name)} == {first["run_id"], second["run_id"]}


async def test_the_forecast_benchmark_reports_accuracy_on_held_out_runs(
    ray_session, tmp_path, monkeypatch
) -> None:
    from govmesh.bench._forecast import run_forecast_bench

    monkeypatch.setenv("GOVMESH_HOME", str(tmp_path / "home"))
    report = await run_forecast_bench(
        ROOT / "scenarios" / "procurement.yaml", calibration=1, held_out=2, workflows=12
    )
    assert report["runs"] == 2 and report["calibration_workflows"] == 12
    assert [r["seed"] for r in report["held_out"]] == [2, 3]
    for row in report["held_out"]:
        expected_error = (row["forecast_usd"] - row["actual_usd"]) / row["actual_usd"]
        assert row["error"] == pytest.approx(expected_error, abs=1e-9)
    errors = sorted(abs(r["error"]) for r in report["held_out"])
    assert report["median_abs_error"] == (errors[0] + errors[1]) / 2
    assert report["within_8pct_share"] == sum(e <= 0.08 for e in errors) / 2
    assert report["model"]["simulated"] is True
    assert not (tmp_path / "home" / "usage").exists(), "the benchmark keeps no user history"
