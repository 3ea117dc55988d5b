"""``govmesh bench`` commands run end to end on real servers and write their reports.

Only the shape and sanity of the report are checked: speed is measured by the benchmark,
never asserted by a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from govmesh.runtime._latency import low_latency_mode

ROOT = Path(__file__).parent.parent


def _bench(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run ``govmesh bench ARGS --json OUT`` as a user would; returns the run and report."""
    proc = subprocess.run(
        [sys.executable, "-m", "govmesh.cli", "bench", *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_bench_auth_measures_three_setups_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "auth.json"
    proc, report = _bench(out, "auth", "--agents", "2", "--messages", "30", "--warmup", "5")
    for setup in ("plain", "mtls", "mtls_a"):
        r = report[setup]
        assert r["exchanges"] == 2 * 60
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert 0 < r["loaded_p50_ms"] <= r["loaded_p99_ms"]
        assert r["msgs_per_s"] > 0
    assert report["overhead_ms"]["p50"] == report["mtls_a"]["p50_ms"] - report["plain"]["p50_ms"]
    assert "mtls_a - plain" in proc.stdout


def test_bench_governance_decides_in_process_against_cedar_and_the_toolkit_and_over_the_bus(
    tmp_path: Path,
) -> None:
    out = tmp_path / "governance.json"
    proc, report = _bench(out, "governance", "--decisions", "500", "--intents", "40")
    assert report["decisions"] == 500
    for key in (
        "in_process_us",
        "in_process_100_rules_us",
        "cedar_in_process_us",
        "agt_in_process_us",
        "in_process_general_us",
        "agt_general_us",
        "bus_ms",
        "floor_ms",
    ):
        assert 0 < report[key]["p50"] <= report[key]["p99"], key
    assert report["floor_intents"] == 40
    for q in ("p50", "p99"):
        assert report["bus_over_floor_ms"][q] == report["bus_ms"][q] - report["floor_ms"][q]
    assert "bus floor (no govmesh work)" in proc.stdout
    wake = report["wake_ms"]
    if "skipped" not in wake:  # a machine with two cores and core affinity
        for key in ("same_core", "cross_core"):
            assert 0 < wake[key]["p50"] <= wake[key]["p99"], key
        assert "wake-up round trip, two cores" in proc.stdout
    assert 0 < report["bus_loaded_ms"]["p50"] <= report["bus_loaded_ms"]["p99"]
    assert set(report["in_process_outcomes"]["seed"]) == {"allow", "deny", "escalate"}
    assert set(report["in_process_outcomes"]["100_rules"]) == {"allow", "deny", "escalate"}
    assert set(report["in_process_outcomes"]["general"]) == {"allow", "deny", "escalate"}
    assert report["cedar_compared"] > 0
    assert report["cedar_disagreements"] == 0
    assert report["cedar_preparsed"] is True
    expected = report["cedar_in_process_us"]["p50"] / report["in_process_us"]["p50"]
    assert report["speedup_vs_cedar"] == expected
    # The Agent Governance Toolkit decides rules equivalent to the seed and to general rules.
    assert report["agt_compared"] == report["cedar_compared"]
    assert report["agt_general_compared"] > 0
    assert (report["agt_disagreements"], report["agt_general_disagreements"]) == (0, 0)
    assert report["speedup_vs_agt"] == (
        report["agt_in_process_us"]["p50"] / report["in_process_us"]["p50"]
    )
    assert report["speedup_vs_agt_general"] == (
        report["agt_general_us"]["p50"] / report["in_process_general_us"]["p50"]
    )
    assert "speedup vs AGT, general rules" in proc.stdout
    # Both layouts: governance actors in processes of their own, and on the agent's loop.
    assert report["bus_intents"] == 4 * 40
    assert sum(report["bus_outcomes"].values()) == 4 * 40 + report["bus_warmup"]
    assert report["bus_outcomes"].get("deny", 0) == 0
    one = report["one_process"]
    assert 0 < one["bus_ms"]["p50"] <= one["bus_ms"]["p99"]
    for layout in (report, one):
        assert layout["decisions_per_s"] > 0
        shares = layout["decisions_per_actor"]
        assert len(shares) == report["governance_actors"] == 2
        assert sum(shares) == 2 * 40 + report["bus_warmup"] // 2
    assert set(report["met"]) == set(report["targets"])
    assert "speedup vs cedarpy" in proc.stdout
    # Measured in low-latency mode when asked for, and then again without.
    held = report["low_latency"]
    assert held["mode"] == low_latency_mode()  # $GOVMESH_LOW_LATENCY, else off
    assert f"low latency ({held['mode']}): {held['detail']}" in " ".join(proc.stderr.split())
    if held["held"]:
        assert held["cpu_latency_us_in_force"] == 0
        halting = report["without_low_latency"]
        for key in ("bus_ms", "bus_loaded_ms", "floor_ms", "one_process_bus_ms"):
            assert 0 < halting[key]["p50"] <= halting[key]["p99"], key
        assert halting["decisions_per_s"] > 0
        assert "idle CPUs halting: bus, ms" in proc.stdout
    else:
        assert "without_low_latency" not in report


def test_bench_state_writes_and_rehydrates_over_the_bus_beside_raw_redis(tmp_path: Path) -> None:
    out = tmp_path / "state.json"
    proc, report = _bench(out, "state", "--snapshots", "20")
    assert report["snapshots"] == 20
    for key in ("snapshot_ms", "rehydrate_ms", "redis_set_ms", "redis_get_ms", "seal_ms"):
        assert 0 < report[key]["p50"] <= report[key]["p99"], key
    sizes = report["sizes_bytes"]
    assert 9 * 1024 < sizes["goal"] <= 10 * 1024
    assert sizes["tool"] == 50 * 1024 and sizes["reflections"] >= 195 * 1024
    assert sizes["reflections_compressed"] < sizes["reflections"]
    assert report["met"]["rehydrate_p99_ms"] == (report["rehydrate_ms"]["p99"] <= 10.0)
    assert "rehydrate over the bus" in proc.stdout


def test_bench_scale_reports_the_time_after_the_last_workflow_against_the_runs(
    tmp_path: Path,
) -> None:
    proc, report = _bench(tmp_path / "scale.json", "scale", "--workflows", "12")
    [run] = report["runs"]
    assert (run["workflows"], run["finished"]) == (12, 12)
    assert run["audit_intact"] and run["replay_differences"] == 0
    assert run["start_s"] + run["workflows_s"] + run["after_s"] <= run["total_s"] + 1e-6
    assert run["after_share"] == run["after_s"] / run["total_s"]
    # The table names the run and its verdicts (its headers wrap in a narrow terminal).
    assert "govmesh bench scale" in proc.stdout and "intact" in proc.stdout
