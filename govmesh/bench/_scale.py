"""``govmesh bench scale``: what a run costs after its last workflow ends, against the time
its workflows took, as the run grows.

Each count is a whole ``govmesh run`` of the scenario in a process of its own (embedded
services, a `GOVMESH_HOME` of its own, so no run's records or usage history reach the
next), with as many workflows in flight as the count. Its report's timings say how long
the workflows took and how long the run went on after the last one ended (the budget's
settling, the decisions' replay, the audit's catch-up and chain verification, stopping the
actors); the bench reports that share of the run's time for each count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from govmesh.errors import GovmeshError

__all__ = ["run_scale_bench"]

Progress = Callable[[str, int], None]


def run_scale_bench(
    scenario: Path, counts: Sequence[int], *, seed: int = 1, tick: Progress | None = None
) -> dict[str, Any]:
    """Run ``scenario`` once per count and report each run's timings.

    Raises:
        GovmeshError: a run failed; its last output is quoted.
    """
    progress = tick or (lambda _p, _n: None)
    runs: list[dict[str, Any]] = []
    for count in counts:
        progress(f"{count:,} workflows", 0)
        with tempfile.TemporaryDirectory(prefix="govmesh-bench-scale-") as tmp:
            report_path = Path(tmp) / "report.json"
            command = [sys.executable, "-m", "govmesh.cli", "run", str(scenario)]
            command += ["-n", str(count), "--concurrency", str(count), "--seed", str(seed)]
            command += ["--json", str(report_path)]
            ran = subprocess.run(
                command,
                env={**os.environ, "GOVMESH_HOME": str(Path(tmp) / "home")},
                capture_output=True,
                text=True,
            )
            if ran.returncode != 0:
                raise GovmeshError(
                    f"govmesh run of {count} workflows exited {ran.returncode}: "
                    f"{ran.stderr.strip()[-2000:]}"
                )
            report = json.loads(report_path.read_text())
        timings = report["timings_s"]
        progress("", 1)
        runs.append(
            {
                "workflows": count,
                "finished": report["workflows"]["finished"],
                **timings,
                "after_share": timings["after_s"] / timings["total_s"],
                "audit_intact": report["audit"]["intact"],
                "replay_differences": report["decisions"]["replay_differences"],
            }
        )
    return {"scenario": str(scenario), "seed": seed, "cpus": os.cpu_count(), "runs": runs}
