"""The ``govmesh`` command as a user runs it: embedded services, a report, and nothing
left running afterwards, even after Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from govmesh.runtime._latency import low_latency_mode

from _procs import processes_using, processes_with_marker, wait_until_gone
from _userapp import write_notes

ROOT = Path(__file__).parent.parent
GOVMESH = [sys.executable, "-m", "govmesh.cli"]


def _env(mark: str, home: Path | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GOVMESH_", "RAY_")) and k != "PYTEST_CURRENT_TEST"
    }
    env["GOVMESH_TEST_MARK"] = mark
    # Runs advertise themselves here; a user's own deployment must never see a test's.
    env["GOVMESH_HOME"] = str(home or tempfile.mkdtemp(prefix="govmesh-home-"))
    return env


def _embedded_redis_url(mark: str) -> str | None:
    """The platform URL of the embedded Valkey of the run marked ``mark``, as its owner reads
    it from the server's configuration (0600); None before the server is up."""
    for pid in processes_with_marker(mark):
        argv = _cmdline(pid).split()
        if argv and argv[0].endswith(("valkey-server", "redis-server")):
            config = Path(argv[1]).read_text().splitlines()
            where = next(
                json.loads(line.split(" ", 1)[1])
                for line in config
                if line.startswith("unixsocket ")
            )
            password = next(
                word[1:]
                for line in config
                if line.startswith("user govmesh ")
                for word in line.split()
                if word.startswith(">")
            )
            return f"unix://govmesh:{password}@{where}?db=0"
    return None


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


def _start(args: list[str], mark: str, home: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*GOVMESH, *args],
        cwd=ROOT,
        env=_env(mark, home),
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
    assert [a["model"] for a in report["agents"].values()] == [
        {"name": "simulated-small", "provider": "simulated", "simulated": True}
    ] * 2
    assert report["runtime"]["embedded"] == {"nats": True, "redis": True, "ray": True}
    held = report["runtime"]["low_latency"]
    assert held["mode"] == low_latency_mode()
    assert held["held"] == (held["mode"] == "on")
    assert "workflows finished" in stdout
    assert wait_until_gone(mark, directory=session, timeout=60) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_interrupt_mid_run_stops_every_service_it_started(signum: int, tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    proc = _start(
        ["run", "scenarios/procurement.yaml", "--workflows", "20000", "--seed", "2"],
        mark,
        tmp_path / "home",
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
    [kept] = (tmp_path / "home" / "runs").iterdir()  # for `govmesh run --resume`
    assert (kept / "run.json").exists()


def test_a_sigterm_while_ray_starts_waits_for_it_then_stops_everything(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    proc = _start(["run", "scenarios/procurement.yaml", "--workflows", "100"], mark)
    try:
        # Ray's first server is up: `ray.init` goes on for a second or more after it.
        deadline = time.monotonic() + 120
        gcs: list[int] = []
        while not gcs and time.monotonic() < deadline and proc.poll() is None:
            gcs = [p for p in processes_with_marker(mark) if "gcs_server" in _cmdline(p)]
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        session = _ray_session(mark, proc)
        status = Path(f"/proc/{gcs[0]}/status").read_text()
        proc.send_signal(signal.SIGTERM)
        # The servers Ray starts take SIGTERM, so `ray.shutdown` stops them.
        blocked = re.search(r"SigBlk:\s*([0-9a-f]+)", status)
        assert blocked, status
        assert not int(blocked.group(1), 16) & (1 << (signal.SIGTERM - 1)), status
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Not Ray's own exit (status 15) nor its failure handler's abort (-6): govmesh's stop.
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "SIGTERM received" not in err
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
    # Nothing started, so there is nothing to resume.
    assert "resume" not in proc.stderr


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


ESCALATING = """
name: approvals
tenant: approvals-cli
policies: [{policy}]
model:
  name: simulated-small
  input_tokens: {{mean: 1000, sd: 100}}
  output_tokens: {{mean: 300, sd: 50}}
  error_probability: 0.0
  latency_ms: 1
prices:
  simulated-small: {{input_per_1k: 0.003, output_per_1k: 0.015}}
path: [{examples}]
agents:
  - {{id: requester-1, class: procurement.agents:Requester, role: Requester, entry: true,
     options: {{procurement: procurement-1}}}}
  - id: procurement-1
    class: procurement.agents:Buyer
    role: Procurement-Agent-v2
    budget_usd: 25000
tools: [procurement.tools:create_purchase_order]
workload:
  generator: procurement.workload:Purchases
  options:
    items: [laptops]
    vendors: {{Vendor_A: 1.0}}
    amount_usd: {{min: 5500, max: 9500}}
"""


def _govmesh(args: list[str], home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GOVMESH, *args],
        cwd=ROOT,
        env=_env(uuid.uuid4().hex, home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _start_on_screen(args: list[str], home: Path, screen: Path) -> subprocess.Popen[str]:
    """Start ``govmesh ARGS`` as if on a terminal 160 columns wide, its screen going to
    ``screen``."""
    env = _env(uuid.uuid4().hex, home) | {"TTY_COMPATIBLE": "1", "COLUMNS": "160", "LINES": "80"}
    with screen.open("w") as out:
        return subprocess.Popen(
            [*GOVMESH, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.PIPE, text=True
        )


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _frames(screen: Path) -> list[str]:
    """The frames a live view drew on ``screen``, without terminal control codes."""
    text = _ANSI.sub("", screen.read_text(errors="replace"))
    return ["govmesh watch:" + frame for frame in text.split("govmesh watch:")[1:]]


def _frame_showing(
    screen: Path, proc: subprocess.Popen[str], texts: list[str], timeout: float = 60
) -> str:
    """The first frame on ``screen`` that shows every one of ``texts``."""
    deadline = time.monotonic() + timeout
    while True:
        running = proc.poll() is None  # before reading: its last frame is written by then
        frames = _frames(screen)
        for frame in frames:
            if all(t in frame for t in texts):
                return frame
        assert running and time.monotonic() < deadline, (
            f"no frame showed {texts}; the last:\n{frames[-1] if frames else '(none)'}"
        )
        time.sleep(0.2)


def test_an_approval_from_the_cli_resumes_the_paused_workflow(tmp_path: Path) -> None:
    home, mark, out = tmp_path / "home", uuid.uuid4().hex, tmp_path / "out.json"
    scenario = tmp_path / "escalating.yaml"
    scenario.write_text(
        ESCALATING.format(
            policy=ROOT / "policies" / "procurement-agent-v2.yaml", examples=ROOT / "examples"
        )
    )
    # Started before the run, these wait for it instead of exiting 2.
    early_watch = _start(["watch", "--wait", "120", "-n", "1"], uuid.uuid4().hex, home)
    early_list = _start(["approvals", "list", "--wait", "120"], uuid.uuid4().hex, home)
    run = ["run", str(scenario), "-n", "2", "--manual-approvals", "--json", str(out)]
    proc = _start(run, mark, home)
    live: subprocess.Popen[str] | None = None
    try:
        said = {}
        for name, early in (("watch", early_watch), ("list", early_list)):
            said[name], early_err = early.communicate(timeout=120)
            assert early.returncode == 0, early_err[-3000:]
        assert "pending approvals" in said["list"] and said["watch"].strip()
        listed = tmp_path / "pending.json"
        deadline = time.monotonic() + 120
        pending: list[dict[str, object]] = []
        while len(pending) < 2:
            assert time.monotonic() < deadline, "the escalations never became pending"
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            if _govmesh(["approvals", "list", "--json", str(listed)], home).returncode == 0:
                pending = json.loads(listed.read_text())
            time.sleep(0.5)
        first, second = (str(p["approval_id"]) for p in pending)
        assert len({p["workflow"] for p in pending}) == 2

        # `govmesh watch`, joining late, replays the run's escalations from the stream.
        watched = tmp_path / "watched.json"
        follow = ["watch", "--replay", "-k", "ApprovalRequest", "-k", "Decision", "-n", "4"]
        shown = _govmesh([*follow, "--json", str(watched)], home)
        assert shown.returncode == 0, shown.stderr
        events = json.loads(watched.read_text())["events"]
        assert sorted(e["kind"] for e in events) == ["ApprovalRequest"] * 2 + ["Decision"] * 2
        assert {e["workflow"] for e in events} == {p["workflow"] for p in pending}
        assert {e["summary"].get("outcome") for e in events if e["kind"] == "Decision"} == {
            "escalate"
        }
        assert shown.stdout.count("ApprovalRequest") == 2 and "governance-1" in shown.stdout

        # `govmesh watch --live`, on a terminal 160 columns wide, shows the dashboard; joining
        # late, it folds in the run so far: the two escalations (each intent is asked again
        # every few seconds while it waits, and counts once) waiting for an answer.
        screen, live_json = tmp_path / "screen.txt", tmp_path / "live.json"
        live = _start_on_screen(
            ["watch", "--live", "--replay", "--json", str(live_json)], home, screen
        )
        waiting = [
            "escalate 2 ",
            "pending approvals: 2",
            *(str(p["workflow"]) for p in pending),
            # Each request's arguments as its tool declares them to show.
            *(f"amount_usd={p['shown']['amount_usd']!r}" for p in pending),
        ]
        _frame_showing(screen, live, waiting)

        approved = _govmesh(["approvals", "approve", first[:8], "--by", "alice"], home)
        assert approved.returncode == 0, approved.stderr
        assert "allow" in approved.stdout and "approved by alice" in approved.stdout
        again = _govmesh(["approvals", "deny", first, "--by", "carol"], home)
        assert again.returncode == 1 and "already settled" in again.stderr, again
        denied = _govmesh(["approvals", "deny", second, "--by", "bob", "--reason", "no"], home)
        assert denied.returncode == 0, denied.stderr
        assert "deny" in denied.stdout and "rejected by bob" in denied.stdout

        # The dashboard shows the answers as they come, and stops when the run stops.
        _frame_showing(screen, live, ["approved by alice", "denied by bob", "pending approvals: 0"])
        _, stderr = proc.communicate(timeout=120)
        _, live_err = live.communicate(timeout=60)
    finally:
        for started in (proc, live, early_watch, early_list):
            if started is not None and started.poll() is None:
                started.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert live.returncode == 0 and "the deployment stopped" in live_err, live_err[-3000:]
    report = json.loads(out.read_text())
    final = _frames(screen)[-1]
    assert "after escalation allow 1, deny 1" in final and "completed 1, rejected 1" in final
    board = json.loads(live_json.read_text())["board"]
    assert board["decisions"] == {"escalate": 2} and board["settled"] == {"allow": 1, "deny": 1}
    assert board["finished"] == {"completed": 1, "rejected": 1} and board["in_flight"] == 0
    assert board["pending"] == [] and board["security"] == []
    assert [(a["by"], a["approved"]) for a in board["answers"]] == [("bob", False), ("alice", True)]
    assert board["tokens"] == report["tokens"] > 0
    assert board["cost_usd"] == pytest.approx(report["cost_usd"])
    assert report["workflows"] == {
        "total": 2,
        "finished": 2,
        "results": {"completed": 1, "rejected": 1},
    }
    assert report["decisions"]["escalate"] == 2
    assert report["approvals"] == {"approved": 1, "rejected": 1}
    assert report["approver"]["simulated"] is False
    assert not (home / "approvals-cli").exists(), "the run stopped advertising itself"
    gone = _govmesh(["approvals", "list"], home)
    assert gone.returncode == 2 and "no govmesh deployment is running" in gone.stderr


def test_a_stopped_run_resumes_and_finishes_only_what_was_unfinished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from govmesh.errors import ConfigError
    from govmesh.runtime import join

    home, mark, out = tmp_path / "home", uuid.uuid4().hex, tmp_path / "out.json"
    monkeypatch.setenv("GOVMESH_HOME", str(home))
    args = ["run", "scenarios/procurement.yaml", "-n", "24", "--concurrency", "8", "--seed", "3"]
    proc = _start(args, mark, home)
    try:
        deadline = time.monotonic() + 120
        finished = 0
        while finished < 8:  # the first eight have finished, sixteen have not
            assert time.monotonic() < deadline, "the run never got going"
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                joined = join("acme")
            except ConfigError:
                time.sleep(0.2)
                continue
            [run_id] = [p.name for p in (home / "runs").iterdir()]
            url = _embedded_redis_url(mark)
            assert url is not None, "the run serves no Redis"
            client = redis.Redis.from_url(url)
            try:
                finished = client.hlen(f"{joined.deployment.key_prefix}:run:{run_id}:done")
            except redis.RedisError:
                pass
            finally:
                client.close()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert (home / "runs" / run_id / "run.json").exists(), "the stopped run kept its data"

    resumed = _govmesh(["run", "--resume", run_id, "--json", str(out)], home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run_id}" in resumed.stdout + resumed.stderr
    report = json.loads(out.read_text())
    assert report["run_id"] == run_id and report["seed"] == 3
    assert report["workflows"]["finished"] == report["workflows"]["total"] == 24
    # Every workflow's intent was decided once, across both processes.
    assert (report["decisions"]["replayed"], report["decisions"]["replay_differences"]) == (24, 0)
    # The events left to index when the first process stopped carry its issuer's tokens:
    # the resumed audit still accepts them, as stored before the resume.
    assert (report["audit"]["refused"], report["audit"]["intact"]) == (0, True), report["audit"]
    assert not (home / "runs" / run_id).exists(), "a finished run leaves nothing behind"


def test_resuming_an_unknown_run_says_so(tmp_path: Path) -> None:
    result = _govmesh(["run", "--resume", "deadbeef"], tmp_path / "home")
    assert result.returncode != 0
    assert "no run 'deadbeef'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    both = _govmesh(["run", "scenarios/procurement.yaml", "--resume", "deadbeef"], tmp_path)
    assert both.returncode == 2 and "give no SCENARIO" in both.stderr


def test_an_app_of_the_users_own_module_runs_and_survives_chaos(tmp_path: Path) -> None:
    # The user's module is in a folder of its own: only --app-dir puts it on the path of the
    # command and of every actor.
    code, home = write_notes(tmp_path), tmp_path / "home"
    out = tmp_path / "run.json"
    app = ["--app", "notes:app", "--app-dir", str(code)]
    ran = _govmesh(["run", *app, "-n", "4", "--json", str(out)], home, timeout=240)
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["scenario"] == "notes"
    assert report["workflows"] == {"total": 4, "finished": 4, "results": {"completed": 4}}
    assert report["decisions"]["allow"] == 4
    assert report["agents"]["scribe-1"] == {
        "class": "Scribe",
        "role": "Scribe",
        "entry": True,
        "model": {"name": "thinker", "provider": "factory", "simulated": False},
    }
    # The user's model factory was called in the scribe's actor: one model call a workflow.
    assert report["model_calls"] == {"reported_by_agents": 4, "counted_by_budget": 4}
    shown = report["calls"]["notes.write"]["shown"]
    assert shown == {"text": {"values": {f"note 1-{i}": 1 for i in range(4)}}}
    assert "first call: notes.write" in ran.stdout

    out = tmp_path / "chaos.json"
    struck = _govmesh(["chaos", *app, "-n", "6", "--kills", "1", "--json", str(out)], home, 300)
    assert struck.returncode == 0, struck.stderr[-3000:]
    chaos = json.loads(out.read_text())
    assert (chaos["finished"], chaos["duplicate_effects"], chaos["lost_approvals"]) == (6, 0, 0)
    assert chaos["kills"] == 1 and chaos["effects"] == {"notes.write": 6}


def test_a_run_names_exactly_one_of_a_scenario_and_an_app(tmp_path: Path) -> None:
    both = _govmesh(["run", "scenarios/procurement.yaml", "--app", "notes:app"], tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr
    wrong = _govmesh(["run", "--app", "govmesh:tool"], tmp_path)
    said = " ".join(wrong.stderr.split())  # as one line, however the terminal wrapped it
    assert wrong.returncode == 2 and "error: app 'govmesh:tool' is" in said
    assert "not a govmesh.App" in said and "Traceback" not in said


def test_version_names_the_installed_govmesh(tmp_path: Path) -> None:
    from importlib.metadata import version

    proc = _govmesh(["--version"], tmp_path)

    assert (proc.returncode, proc.stdout) == (0, f"govmesh {version('govmesh')}\n")


def test_approvals_list_at_80_columns_shows_each_workflow_id_whole() -> None:
    from rich.console import Console

    from govmesh.cli._approvals import pending_table
    from govmesh.governance.messages import ApprovalRequest

    now = time.time()
    requests = [
        ApprovalRequest(
            approval_id=f"{i:02d}" + "ab" * 15,
            workflow=f"7f3c9a1e-{i:05d}",
            agent="procurement-1",
            tool="erp.create_purchase_order",
            args={"vendor": "Vendor_A", "amount_usd": 7543.25},
            intent_id="intent",
            intent_hash="hash",
            reasons=("amount 7543.25 is over 5000: a person approves",),
            escalation="approval",
            policy_hash="policy",
            requested_at=now - 75,
            expires_at=now + 3600,
        )
        for i in range(3)
    ]
    console = Console(width=80, record=True)
    console.print(pending_table(requests, now=now))
    screen = console.export_text()

    assert max(len(line) for line in screen.splitlines()) <= 80
    for r in requests:
        assert r.workflow in screen and r.approval_id[:12] in screen
    assert "amount_usd=7543.25" in screen.replace("\n", "")


def test_approvals_and_watch_waiting_for_no_deployment_give_up_saying_so(tmp_path: Path) -> None:
    for command in (["approvals", "list"], ["watch", "-n", "1"]):
        proc = _govmesh([*command, "--wait", "0.5"], tmp_path)

        assert proc.returncode == 2, proc.stderr
        assert "no govmesh deployment is running here" in proc.stderr
        assert "waited 0.5 s" in proc.stderr
