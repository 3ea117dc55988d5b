"""Monitoring a run as its users do: through the public event API (`govmesh.EventStream`),
with the example that forwards events to a JSONL file, and by scraping the Prometheus
endpoint of ``govmesh run --prometheus-port``, while the run goes, with a forged message on
the stream."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

import govmesh
from govmesh.bus import Bus, Codec
from govmesh.identity import Issuer
from govmesh.roles import OPERATOR_ROLE
from govmesh.runtime import OPERATOR_MEMBER

from _procs import port_below_ephemeral_range

ROOT = Path(__file__).parent.parent
WORKFLOWS = 6
FORGED_WORKFLOW = "forged-workflow"
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


@dataclass
class Watched:
    """What the test saw of one run while it went."""

    report: dict[str, Any]
    forwarded: Path
    forwarder_err: str = ""
    resumed: Path | None = None
    events: list[govmesh.Event] = field(default_factory=list)
    refused: list[govmesh.RefusedMessage] = field(default_factory=list)
    counted_refused: int = 0
    decisions_only: list[govmesh.Event] = field(default_factory=list)
    from_sequence: list[govmesh.Event] = field(default_factory=list)
    from_time: list[govmesh.Event] = field(default_factory=list)
    forged_id: str = ""
    asked_from: tuple[int, datetime] = (0, datetime.now(UTC))
    scrapes: list[dict[str, dict[tuple[tuple[str, str], ...], float]]] = field(default_factory=list)


def _decided(report: dict[str, Any]) -> dict[str, int]:
    """The run's decisions by policy, by outcome, as its report counts them."""
    return {o: n for o in ("allow", "deny", "escalate") if (n := report["decisions"][o])}


def _by(
    page: Samples, name: str, label: str, *, where: tuple[str, str] | None = None
) -> dict[str, float]:
    """The values of the samples called ``name`` in ``page`` (those labelled ``where``),
    summed by ``label``."""
    summed: dict[str, float] = {}
    for labels, value in page.get(name, {}).items():
        if where is None or where in labels:
            key = dict(labels)[label]
            summed[key] = summed.get(key, 0.0) + value
    return summed


def _samples(text: str) -> Samples:
    """A Prometheus text page as {sample name: {sorted labels: value}}."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


async def _forge(stream: govmesh.EventStream) -> str:
    """Publish, as the deployment's operator may, an "allow" decision that claims to come
    from governance but is signed with a key of an issuer the deployment does not trust;
    its id."""
    joined = stream.deployment
    operator = await joined.member(OPERATOR_MEMBER, OPERATOR_ROLE)
    outsider = Issuer(name="govmesh:acme:issuer", audience=joined.deployment.audience)
    impostor = outsider.identity("governance-1", "governance")
    forged = govmesh.Decision(
        intent_id="0" * 32,
        intent_hash="0" * 64,
        workflow=FORGED_WORKFLOW,
        agent="buyer-1",
        outcome="allow",
        policy_hash="f" * 64,
        expires_at=time.time() + 300,
    )
    async with await Bus.connect(joined.deployment, operator, rotate=False) as bus:
        subject = bus.subjects.approval(FORGED_WORKFLOW)
        envelope, data = Codec().seal(
            impostor, subject=subject, body=forged, workflow=FORGED_WORKFLOW
        )
        await bus.nc.publish(subject, data)
        await bus.flush()
    return envelope.id


async def _watch(
    proc: subprocess.Popen[str],
    port: int,
    out: Path,
    watched: Watched,
    resume: Callable[[], None],
) -> None:
    """Follow the run through the public API and scrape its metrics until it ends;
    ``resume`` is called midway."""
    everything = govmesh.EventStream(start="first", wait_s=120, on_refused=watched.refused.append)

    async def scrape() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while proc.poll() is None:
                try:
                    page = await client.get(f"http://127.0.0.1:{port}/metrics")
                except (httpx.TransportError, AttributeError):
                    # Not serving yet, or no more; an endpoint that closes mid-request can
                    # also fail inside httpx (an AttributeError on its closed socket).
                    pass
                else:
                    if page.status_code == 200 and page.text:
                        watched.scrapes.append(_samples(page.text))
                await asyncio.sleep(0.1)

    async def follow(stream: govmesh.EventStream, into: list[govmesh.Event]) -> None:
        async with stream:
            async for event in stream:
                into.append(event)

    scraping = asyncio.create_task(scrape())
    async with everything:
        async for event in everything:
            watched.events.append(event)
            if not watched.forged_id:
                # Once the stream holds an event, it keeps what is published next.
                watched.forged_id = await _forge(everything)
            if len(watched.events) == 20:
                # Two more subscribers while the run goes: one filtered, one from a point.
                seq, at = event.seq, datetime.fromtimestamp(event.stored_at, UTC)
                watched.asked_from = (seq, at)
                others = [
                    follow(
                        govmesh.EventStream(
                            kinds={"Decision"}, senders={"governance-1"}, start="first"
                        ),
                        watched.decisions_only,
                    ),
                    follow(govmesh.EventStream(start=seq), watched.from_sequence),
                    follow(govmesh.EventStream(start=at), watched.from_time),
                ]
                followers = asyncio.gather(*others)
                resume()
    watched.counted_refused = everything.refused
    await followers
    await scraping
    proc.wait(timeout=120)
    watched.report = json.loads(out.read_text())


@pytest.fixture(scope="module")
def monitored_run() -> Iterator[Watched]:
    """A `govmesh run` of the procurement scenario with its metrics on a port, followed
    from this process as a user's monitoring code follows it."""
    with tempfile.TemporaryDirectory(prefix="govmesh-monitoring-") as where:
        home, out = Path(where) / "home", Path(where) / "out.json"
        port = port_below_ephemeral_range()
        watched = Watched(report={}, forwarded=Path(where) / "events.jsonl")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GOVMESH_", "RAY_"))}
        env["GOVMESH_HOME"] = str(home)

        def start(*args: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )

        # Started first, the example waits for the deployment.
        example = ROOT / "examples" / "monitoring" / "forward_jsonl.py"
        forwarder = start(str(example), str(watched.forwarded), "--wait", "300")
        run = ["run", "scenarios/procurement.yaml", "-n", str(WORKFLOWS), "--json", str(out)]
        # The run serves its final figures until scraped once: the scrapes below end with
        # every decision counted, however far the endpoint's pulls lagged the run.
        metrics = ["--prometheus-port", str(port), "--prometheus-linger", "120"]
        proc = start("-m", "govmesh.cli", *run, *metrics)
        os.environ["GOVMESH_HOME"] = str(home)
        resumed: list[subprocess.Popen[str]] = []

        def resume() -> None:
            """Midway, the example again on a copy of the first two lines it wrote."""
            watched.resumed = Path(where) / "resumed.jsonl"
            written = watched.forwarded.read_text().splitlines(keepends=True)
            watched.resumed.write_text("".join(written[:2]))
            resumed.append(start(str(example), str(watched.resumed)))

        try:
            asyncio.run(_watch(proc, port, out, watched, resume))
            _, watched.forwarder_err = forwarder.communicate(timeout=60)
            for started in resumed:
                started.communicate(timeout=60)
            yield watched
        finally:
            os.environ.pop("GOVMESH_HOME", None)
            for started in (proc, forwarder, *resumed):
                if started.poll() is None:
                    started.kill()
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr[-3000:]


def test_the_event_api_yields_every_workflows_verified_events_and_reports_a_forged_one(
    monitored_run: Watched,
) -> None:
    watched, report = monitored_run, monitored_run.report
    assert report["workflows"]["finished"] == WORKFLOWS
    workflows = {f"{report['run_id']}-{i:05d}" for i in range(WORKFLOWS)}
    by_workflow: dict[str, Counter[str]] = {}
    for event in watched.events:
        by_workflow.setdefault(event.workflow, Counter())[event.kind] += 1
    for workflow in workflows:
        kinds = by_workflow.get(workflow, Counter())
        assert {"WorkflowStart", "Usage", "ToolIntent", "Decision", "Outcome"} <= set(kinds), (
            workflow,
            kinds,
        )
    # Typed: each decision decodes as one, for its own workflow.
    decisions = [e.decode(govmesh.Decision) for e in watched.events if e.kind == "Decision"]
    assert {d.workflow for d in decisions} == workflows
    policy = Counter(d.outcome for d in decisions if not d.approval_id or not d.final)
    assert policy == _decided(report)
    with pytest.raises(govmesh.EventError, match="not 'Usage'"):
        next(e for e in watched.events if e.kind == "Decision").decode(govmesh.Usage)

    # The forged decision was reported and never yielded.
    assert FORGED_WORKFLOW not in by_workflow
    assert all(e.id != watched.forged_id for e in watched.events)
    assert watched.counted_refused == len(watched.refused) == 1
    refused = watched.refused[0]
    assert refused.reason == "token_unknown_issuer", refused
    assert (refused.claimed_sender, refused.kind, refused.workflow, refused.id) == (
        "governance-1",
        "Decision",
        FORGED_WORKFLOW,
        watched.forged_id,
    )

    # A filtered subscriber got exactly governance's decisions; the stream's sequence
    # numbers have no gaps apart from the refused message.
    assert [e.id for e in watched.decisions_only] == [
        e.id for e in watched.events if e.kind == "Decision" and e.sender == "governance-1"
    ]
    seqs = sorted([e.seq for e in watched.events] + [refused.seq])
    assert seqs == list(range(1, len(seqs) + 1))

    # Started from a sequence number, or from a time, a subscriber gets the same events
    # from there on.
    seq, at = watched.asked_from
    later = [e.id for e in watched.events if e.seq >= seq]
    assert [e.id for e in watched.from_sequence] == later
    # From a time: the first event stored then or after (to the microsecond a float holds).
    first = watched.from_time[0]
    assert first.stored_at >= at.timestamp() - 1e-6
    assert all(e.stored_at < at.timestamp() + 1e-6 for e in watched.events if e.seq < first.seq)
    assert [e.id for e in watched.from_time] == [e.id for e in watched.events if e.seq >= first.seq]


def test_prometheus_scrapes_during_the_run_show_its_decisions_tokens_and_refusals(
    monitored_run: Watched,
) -> None:
    watched, report = monitored_run, monitored_run.report
    assert report["prometheus"]["url"].startswith("http://127.0.0.1:")
    assert watched.scrapes, "the endpoint was never scraped while the run went"
    final = report["prometheus"]
    assert final["caught_up"] and final["scraped"], final
    # The run served its final figures until this scraper read them: every decision of
    # the run was counted by then.
    last = watched.scrapes[-1]
    policy = ("govmesh_decision_source", "policy")
    decided = _by(last, "govmesh_decisions_total", "govmesh_decision_outcome", where=policy)
    assert decided == _decided(report)
    assert sum(last["gen_ai_client_token_usage_sum"].values()) == report["tokens"]
    refusals = _by(last, "govmesh_security_rejections_total", "govmesh_security_reason")
    assert refusals["token_unknown_issuer"] >= 1, refusals


def test_the_example_forwards_every_verified_event_to_jsonl_and_reports_the_forged_one(
    monitored_run: Watched,
) -> None:
    watched = monitored_run
    lines = [json.loads(line) for line in watched.forwarded.read_text().splitlines()]
    assert [(x["seq"], x["id"], x["kind"]) for x in lines] == [
        (e.seq, e.id, e.kind) for e in watched.events
    ]
    decided = next(x for x in lines if x["kind"] == "Decision")
    assert decided["summary"]["outcome"] in ("allow", "deny", "escalate")
    assert "token_unknown_issuer" in watched.forwarder_err
    assert f"{len(lines)} events written" in watched.forwarder_err
    # Run again on a file that holds the first two events, it went on after them.
    assert watched.resumed is not None
    assert watched.resumed.read_text() == watched.forwarded.read_text()


def _decision_event(seq: int, *, workflow: str, outcome: str, **more: Any) -> govmesh.Event:
    decision = govmesh.Decision(
        intent_id="i",
        intent_hash=f"intent-of-{workflow}",
        workflow=workflow,
        agent="buyer-1",
        outcome=outcome,  # type: ignore[arg-type]
        policy_hash="p" * 64,
        expires_at=0.0,
        **more,
    )
    return govmesh.Event(
        seq=seq,
        stored_at=1000.0 + seq,
        id=f"e{seq}",
        kind="Decision",
        sender="governance-1",
        subject=f"gm.acme.decision.buyer-1.{workflow}",
        ts=1000.0 + seq,
        workflow=workflow,
        body=msgspec.msgpack.encode(decision),
    )


def test_the_endpoint_counts_a_decision_answered_again_once_and_a_settlement_apart() -> None:
    endpoint = govmesh.PrometheusEndpoint(port=0, tenant="acme")
    escalated = {"final": False, "approval_id": "a1"}
    for event in [
        _decision_event(1, workflow="w1", outcome="allow"),
        _decision_event(2, workflow="w1", outcome="allow"),  # the intent asked again
        _decision_event(3, workflow="w2", outcome="escalate", **escalated),
        _decision_event(4, workflow="w2", outcome="escalate", **escalated),
        _decision_event(5, workflow="w2", outcome="allow", approval_id="a1"),
    ]:
        endpoint.record(event)
    usage = govmesh.Usage(model="m", input_tokens=30, output_tokens=12, cost_usd=0.5)
    endpoint.record(
        msgspec.structs.replace(
            _decision_event(6, workflow="w1", outcome="allow"),
            kind="Usage",
            body=msgspec.msgpack.encode(usage),
        )
    )
    endpoint.refused(govmesh.RefusedMessage(seq=7, stored_at=1007.0, subject="s", reason="replay"))
    page = _samples(endpoint.page())
    assert _by(page, "govmesh_decisions_total", "govmesh_decision_source") == {
        "policy": 2,
        "approval": 1,
    }
    assert _by(page, "govmesh_decisions_total", "govmesh_decision_outcome") == {
        "allow": 2,
        "escalate": 1,
    }
    assert _by(page, "gen_ai_client_token_usage_sum", "gen_ai_token_type") == {
        "input": 30,
        "output": 12,
    }
    assert _by(page, "govmesh_model_cost_USD_total", "gen_ai_request_model") == {"m": 0.5}
    assert _by(page, "govmesh_security_rejections_total", "govmesh_security_reason") == {
        "replay": 1
    }


def test_a_scenario_file_asks_for_the_prometheus_port_and_gets_none_by_default(
    tmp_path: Path,
) -> None:
    from govmesh.scenarios import scenario_app

    shipped = ROOT / "scenarios" / "procurement.yaml"
    assert scenario_app(shipped).prometheus_port is None
    asking = tmp_path / "procurement.yaml"
    text = shipped.read_text().replace("../", f"{ROOT}/")
    asking.write_text(f"{text}\nprometheus_port: 9464\nprometheus_linger_s: 30\n")
    app = scenario_app(asking)
    assert (app.prometheus_port, app.prometheus_linger_s) == (9464, 30.0)
    assert scenario_app(shipped).prometheus_linger_s == 0.0
    asking.write_text(f"{text}\nprometheus_port: 9464\nprometheus_linger_s: -5\n")
    with pytest.raises(govmesh.GovmeshError, match=r"procurement.yaml: prometheus_linger_s: .*-5"):
        scenario_app(asking)


def test_a_busy_metrics_port_is_refused_before_any_service_starts(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port_below_ephemeral_range()))
        squatter.listen()
        port = squatter.getsockname()[1]
        run = ["run", "scenarios/procurement.yaml", "-n", "1", "--prometheus-port", str(port)]
        done = subprocess.run(
            [sys.executable, "-m", "govmesh.cli", *run],
            cwd=ROOT,
            env={**os.environ, "GOVMESH_HOME": str(tmp_path / "home")},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode != 0
    assert f"prometheus port: cannot serve on 127.0.0.1:{port}" in done.stderr
    assert "starting nats-server" not in done.stderr and "govmesh run --resume" not in done.stderr


def test_a_metrics_linger_that_cannot_hold_is_refused_before_anything_starts() -> None:
    from govmesh.scenarios import run_scenario

    shipped = ROOT / "scenarios" / "procurement.yaml"
    with pytest.raises(govmesh.ConfigError, match=r"prometheus linger: .* got -1\.0"):
        asyncio.run(run_scenario(shipped, prometheus_port=0, prometheus_linger_s=-1.0))
    with pytest.raises(govmesh.ConfigError, match="not served; give a prometheus port"):
        asyncio.run(run_scenario(shipped, prometheus_linger_s=5.0))
