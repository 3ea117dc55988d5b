"""A model's API key is read from the agent's environment and goes nowhere else: a canary
key is found in no stored byte of a run (the event stream, Redis, snapshots, the audit
index, logs, spans)."""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from govmesh.scenarios import run_workflows, scenario_app
from govmesh.state import Keyring
from govmesh.state._tiers import decode_sealed, unseal

from _deploy import deployment
from _model_servers import ScriptedApi, completion
from _userapp import write_notes

CANARY_ENV = "GOVMESH_TEST_CANARY_KEY"

SCENARIO = """
name: canary
tenant: canary
policies: [policy.yaml]
path: [code]
model:
  provider: openai
  base_url: {url}/v1
  model: local-model
  api_key_env: {env}
prices:
  local-model: {{input_per_1k: 0.001, output_per_1k: 0.002}}
budget: {{workflow_usd: 1.0}}
keep_thoughts: true
agents:
  - id: scribe-1
    class: notes:Scribe
    entry: true
tools: [notes:write_note]
workload:
  generator: notes:Notes
  options: {{pages: 1}}
"""


@pytest.fixture
def spans(tracer_provider: TracerProvider) -> Iterator[InMemorySpanExporter]:
    """Every span this process records while the test runs."""
    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


async def _redis_bytes(url: str) -> dict[bytes, list[bytes]]:
    """Every key in the Redis-protocol server, with its values as bytes."""
    client = aioredis.Redis.from_url(url)
    found: dict[bytes, list[bytes]] = {}
    try:
        async for key in client.scan_iter(count=1000):
            values = found.setdefault(key, [])
            kind = (await client.type(key)).decode()
            if kind == "string":
                values.append(await client.get(key) or b"")
            elif kind == "hash":
                for field, value in (await client.hgetall(key)).items():
                    values += [field, value]
            elif kind == "list":
                values += await client.lrange(key, 0, -1)
            elif kind == "set":
                values += list(await client.smembers(key))
            elif kind == "zset":
                values += [m for m, _ in await client.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                for _, entry in await client.xrange(key):
                    for field, value in entry.items():
                        values += [field, value]
    finally:
        await client.aclose()
    return found


def _unsealed(values: list[bytes], keyring: Keyring) -> list[bytes]:
    """The plaintext of every value that is a sealed snapshot: its tool tier is encrypted
    and its reflections compressed, so only their plaintext can show a key."""
    plain: list[bytes] = []
    for value in values:
        try:
            sealed = decode_sealed(value)
        except Exception:  # not a snapshot
            continue
        plain.append(repr(unseal(sealed, keyring)).encode())
    return plain


async def test_a_canary_api_key_appears_in_no_stored_byte(
    secure_nats,
    redis_server,
    prefix,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    spans: InMemorySpanExporter,
) -> None:
    canary = f"sk-canary-{uuid.uuid4().hex}"
    monkeypatch.setenv(CANARY_ENV, canary)
    code = write_notes(tmp_path)
    monkeypatch.delitem(sys.modules, "notes", raising=False)
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    keyring = Keyring.generate("canary")
    caplog.set_level(logging.DEBUG)  # the clients' own debug logs too
    try:
        async with ScriptedApi() as api:
            api.reply(completion("A short, clear note."))
            path = tmp_path / "scenario.yaml"
            path.write_text(SCENARIO.format(url=api.url, env=CANARY_ENV))
            report = await run_workflows(
                scenario_app(path),
                dep,
                issuer,
                workflows=2,
                seed=1,
                timeout_s=120,
                in_process=True,
                transport=transport,
                keyring=keyring,
            )
    finally:
        sys.modules.pop("notes", None)
        while str(code) in sys.path:
            sys.path.remove(str(code))

    assert report["workflows"]["finished"] == 2, report["workflows"]
    assert report["agents"]["scribe-1"]["model"] == {
        "name": "local-model",
        "provider": "openai",
        "simulated": False,
    }
    # The key did reach the model server, from the environment.
    assert api.requests and all(
        r.headers["authorization"] == f"Bearer {canary}" for r in api.requests
    )
    needle = canary.encode()
    stored = await _redis_bytes(redis_server.url)
    assert stored and not [
        k for k, vs in stored.items() if needle in k or any(needle in v for v in vs)
    ]
    # This run's snapshots (other tests' are sealed with keys of their own).
    ours = [v for k, vs in stored.items() if k.startswith(dep.key_prefix.encode()) for v in vs]
    unsealed = _unsealed(ours, keyring)
    assert unsealed and not [v for v in unsealed if needle in v]
    # The event stream (JetStream's store) and the servers' own files and logs; the
    # answer's text (kept thoughts) is there in the clear, so a key would be too.
    files = [p for root in (server.workdir, redis_server.workdir) for p in root.rglob("*")]
    contents = [p.read_bytes() for p in files if p.is_file()]
    assert [c for c in contents if b"A short, clear note." in c]
    assert not [c for c in contents if needle in c]
    assert canary not in caplog.text
    finished = spans.get_finished_spans()
    assert finished and not [s for s in finished if canary in s.to_json()]
