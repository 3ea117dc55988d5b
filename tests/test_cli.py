"""The ``govmesh`` command as a user runs it: embedded services, a report, and nothing
left running afterwards, even after Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from _procs import processes_using, processes_with_marker, wait_until_gone

ROOT = Path(__file__).parent.parent
GOVMESH = [sys.executable, "-m", "govmesh.cli"]


def _env(mark: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GOVMESH_", "RAY_")) and k != "PYTEST_CURRENT_TEST"
    }
    env["GOVMESH_TEST_MARK"] = mark
    return env


def _ray_session(mark: str, proc: subprocess.Popen[str], timeout: float = 120.0) -> Path:
    """The Ray session directory of the run marked ``mark``, read off its raylet's command line.

    Ray's worker processes overwrite their environment with their title, so the marker alone
    cannot find them; everything that uses the session directory can.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for pid in processes_with_marker(mark):
            found = re.search(r"(/tmp/ray/session_[^/ ]+)", _cmdline(pid))
            if found:
                return Path(found.group(1))
        time.sleep(0.1)
    raise AssertionError(f"no Ray session appeared for the run (exit code {proc.poll()})")


def _start(args: list[str], mark: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*GOVMESH, *args],
        cwd=ROOT,
        env=_env(mark),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_run_reports_all_outcomes_and_leaves_nothing_running(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    out = tmp_path / "out.json"
    args = ["run", "scenarios/procurement.yaml", "--workflows", "50", "--seed", "1"]
    proc = _start([*args, "--json", str(out)], mark)
    try:
        session = _ray_session(mark, proc)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["workflows"]["finished"] == report["workflows"]["total"] == 50
    for outcome in ("allow", "deny", "escalate"):
        assert report["decisions"][outcome] > 0, report["decisions"]
    assert report["decisions"]["replayed"] == 50
    assert report["decisions"]["replay_differences"] == 0
    assert report["governance_latency_ms"]["p99"] >= report["governance_latency_ms"]["p50"] > 0
    assert report["tokens"] > 0 and report["cost_usd"] > 0
    assert report["model"]["simulated"] is True
    assert report["runtime"]["embedded"] == {"nats": True, "redis": True, "ray": True}
    assert "workflows finished" in stdout
    assert wait_until_gone(mark, directory=session, timeout=60) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_interrupt_mid_run_stops_every_service_it_started(signum: int) -> None:
    mark = uuid.uuid4().hex
    proc = _start(
        ["run", "scenarios/procurement.yaml", "--workflows", "20000", "--seed", "2"], mark
    )
    try:
        session = _ray_session(mark, proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any("ServiceActor" in _cmdline(pid) for pid in processes_using(session)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(2)  # let workflows flow, so the interrupt lands mid-run
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    assert wait_until_gone(mark, directory=session, timeout=60) == []


def test_bad_scenario_gives_a_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "scenarios" / "procurement.yaml")
        .read_text()
        .replace("error_probability: 0.12", "error_probability: lots")
    )
    proc = subprocess.run(
        [*GOVMESH, "run", str(bad)],
        cwd=ROOT,
        env=_env(uuid.uuid4().hex),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error_probability" in proc.stderr


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""
