"""``govmesh bench`` commands run end to end on real servers and write their reports.

Only the shape and sanity of the report are checked: speed is measured by the benchmark,
never asserted by a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_auth_measures_three_setups_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "auth.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "govmesh.cli",
            "bench",
            "auth",
            "--agents",
            "2",
            "--messages",
            "30",
            "--warmup",
            "5",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for setup in ("plain", "mtls", "mtls_a"):
        r = report[setup]
        assert r["exchanges"] == 2 * 60
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert 0 < r["loaded_p50_ms"] <= r["loaded_p99_ms"]
        assert r["msgs_per_s"] > 0
    assert report["overhead_ms"]["p50"] == report["mtls_a"]["p50_ms"] - report["plain"]["p50_ms"]
    assert "mtls_a - plain" in proc.stdout
