"""Telemetry export: OTLP to the collector the environment names, console to stderr, and
nothing at all, installed or sent, when the environment names nothing.

Each export runs in a process of its own, as an actor or the CLI does: a process installs
its tracer and meter providers once, and this test process has its own in-memory ones.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from govmesh.errors import ConfigError
from govmesh.telemetry import TelemetrySettings

ROOT = Path(__file__).parent.parent
GOVMESH = [sys.executable, "-m", "govmesh.cli"]

# What one process hosting a member does: configure from its environment, work, close.
PROBE = """
from govmesh.telemetry import configure_telemetry
from govmesh.telemetry._metrics import SECURITY_REJECTIONS
from govmesh.telemetry._tracing import span

telemetry = configure_telemetry(member="probe-1")
assert configure_telemetry(member="probe-2") is telemetry, "configured twice"
with span("handle ToolCall", attributes={"govmesh.workflow": "wf-probe"}):
    with span("execute_tool erp.create_po"):
        pass
SECURITY_REJECTIONS.add(1, {"govmesh.security.reason": "replay"})
if telemetry is not None:
    telemetry.close()
    telemetry.close()
"""


class Collector:
    """An OTLP/HTTP collector on a free local port that keeps every request it gets."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                received.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[tuple[dict[str, str], str]]:
        """Each span received: its resource's attributes and its name."""
        found = []
        for path, body in self.received:
            if path == "/v1/traces":
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                    found += [(resource, s.name) for ss in rs.scope_spans for s in ss.spans]
        return found

    def points(self, name: str) -> list[tuple[dict[str, str], float]]:
        """The points of the counter or histogram ``name`` as each process last exported
        them (they are cumulative): attributes, and the value or the histogram's sum."""
        latest: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for path, body in self.received:
            if not path.endswith("/metrics"):
                continue
            for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                process = next(
                    a.value.string_value
                    for a in rm.resource.attributes
                    if a.key == "service.instance.id"
                )
                for metric in (m for sm in rm.scope_metrics for m in sm.metrics):
                    if metric.name != name:
                        continue
                    values = [(p, p.as_int or p.as_double) for p in metric.sum.data_points]
                    values += [(p, p.sum) for p in metric.histogram.data_points]
                    for point, value in values:
                        attributes = {a.key: _value(a.value) for a in point.attributes}
                        latest[process, frozenset(attributes.items())] = value
        return [(dict(attributes), value) for (_, attributes), value in latest.items()]

    def total(self, name: str, where: dict[str, str] | None = None) -> float:
        """The sum of the points of ``name`` whose attributes include ``where``."""
        return sum(
            value
            for attributes, value in self.points(name)
            if all(attributes.get(k) == v for k, v in (where or {}).items())
        )


def _value(any_value) -> str:
    return any_value.string_value or str(any_value.int_value)


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    thread = threading.Thread(target=c.server.serve_forever, daemon=True)
    thread.start()
    yield c
    c.server.shutdown()
    c.server.server_close()


def _probe(then: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """Run `PROBE`, then the code ``then``, in a fresh process whose only OpenTelemetry
    variables are ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE + then],
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_spans_and_metrics_are_posted_to_the_otlp_endpoint_of_the_environment(
    collector: Collector,
) -> None:
    _probe(OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_SERVICE_NAME="govmesh-test")
    assert {path for path, _ in collector.received} == {"/v1/traces", "/v1/metrics"}
    spans = collector.spans()
    assert sorted(name for _, name in spans) == ["execute_tool erp.create_po", "handle ToolCall"]
    for resource, _ in spans:
        assert resource["service.name"] == "govmesh-test"
        assert resource["govmesh.member"] == "probe-1"
    assert collector.points("govmesh.security.rejections") == [
        ({"govmesh.security.reason": "replay"}, 1)
    ]


def test_a_run_exports_from_every_actor_and_agrees_with_its_report(
    collector: Collector, tmp_path: Path
) -> None:
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GOVMESH_", "RAY_"))}
    done = subprocess.run(
        [
            *GOVMESH,
            "run",
            "scenarios/procurement.yaml",
            "-n",
            "4",
            "-s",
            "3",
            "--json",
            str(report_path),
        ],
        cwd=ROOT,
        env={
            **env,
            "PYTHONPATH": str(ROOT),
            "GOVMESH_HOME": str(tmp_path / "home"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
        },
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    # The CLI and each actor process export their own, named by the member they host.
    members = {resource["govmesh.member"] for resource, _ in collector.spans()}
    assert {"cli", "requester-1", "procurement-1", "governance-1", "gateway-1"} <= members
    assert {"budget-1", "state-1"} <= members
    # What the agents' metrics say they spent is what the budget actor counted.
    tokens = "gen_ai.client.token.usage"
    assert collector.total(tokens, {"gen_ai.token.type": "input"}) == report["input_tokens"]
    assert collector.total(tokens, {"gen_ai.token.type": "output"}) == report["output_tokens"]
    assert collector.total("govmesh.model.cost") == pytest.approx(report["cost_usd"], abs=1e-6)
    for outcome in ("allow", "deny", "escalate"):
        where = {"govmesh.decision.outcome": outcome, "govmesh.decision.source": "policy"}
        assert collector.total("govmesh.decisions", where) == report["decisions"][outcome]


def test_each_signal_goes_only_where_its_own_variables_say(collector: Collector) -> None:
    done = _probe(
        OTEL_TRACES_EXPORTER="console",
        OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=f"{collector.url}/custom/metrics",
    )
    assert '"name": "execute_tool erp.create_po"' in done.stderr
    assert '"govmesh.member": "probe-1"' in done.stderr
    assert [path for path, _ in collector.received] == ["/custom/metrics"]


def test_with_no_telemetry_variables_nothing_is_installed() -> None:
    done = _probe(
        "from opentelemetry import metrics, trace\n"
        "assert telemetry is None\n"
        "assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "print(isinstance(metrics.get_meter_provider(), MeterProvider))\n"
    )
    assert done.stdout.strip() == "False"
    assert done.stderr == ""


def test_settings_follow_the_opentelemetry_variables() -> None:
    assert not TelemetrySettings.from_env({}).enabled
    assert not TelemetrySettings.from_env({"OTEL_SERVICE_NAME": "x"}).enabled
    both = TelemetrySettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
    assert both.traces == both.metrics == ("otlp",)
    assert both.traces_endpoint == "http://c:4318/v1/traces"
    assert both.metrics_endpoint == "http://c:4318/v1/metrics"
    own = TelemetrySettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/spans",
            "OTEL_METRICS_EXPORTER": "console,none",
        }
    )
    assert (own.traces, own.traces_endpoint) == (("otlp",), "http://t:9/spans")
    assert (own.metrics, own.metrics_endpoint) == (("console",), "")
    explicit = TelemetrySettings.from_env({"OTEL_TRACES_EXPORTER": "otlp,console"})
    assert explicit.traces == ("otlp", "console")
    assert explicit.traces_endpoint == "http://localhost:4318/v1/traces"
    assert explicit.metrics == ()
    off = TelemetrySettings.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert not off.enabled


@pytest.mark.parametrize(
    ("env", "quoted"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "'zipkin'"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "'grpc'",
        ),
    ],
    ids=["unknown-exporter", "grpc"],
)
def test_what_govmesh_cannot_export_with_is_a_config_error(env, quoted) -> None:
    with pytest.raises(ConfigError, match=quoted):
        TelemetrySettings.from_env(env)
