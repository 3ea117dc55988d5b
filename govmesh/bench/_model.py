"""``govmesh bench model``: a real model on this machine, per reflection-loop iteration, and
what govmesh's OpenAI-compatible provider costs over a bare HTTP call to the same server.

One local server (llama-cpp-python, SmolLM2-135M-Instruct on CPU, started here unless a
``base_url`` is given) answers three phases in one run:

- ``bare`` and ``provider``: the same chat request, sent alternately as a bare HTTP POST
  (one kept-alive ``httpx`` client, the JSON parsed, nothing else) and through
  `govmesh.llm.OpenAIModel` (the official ``openai`` client, usage and stop reason read,
  the answer checked). The prompt makes the model write on until ``max_tokens``, so both
  calls of a pair generate the same number of tokens and differ only in the client; pairs
  where either stopped early are left out. The overhead is each pair's provider time over
  its bare time, reported at p50 and p99.
- ``governed``: the same request again, alternately through the provider alone and as an
  agent makes it (`govmesh.agents.AgentService.call_model`): the spend reserved in Redis
  against the workflow's cap first, the usage published signed over mutual-TLS NATS to
  the budget actor, the reservation settled, the call traced. The overhead is each
  pair's governed time over its provider time.
- ``plan``: the procurement buyer's planning call as a reflection loop makes it, governed
  as above, with structured output (a JSON Schema the server's grammar enforces):
  milliseconds per iteration, tokens per second, and the share of answers that parse and
  follow the schema (the others would be reflected on).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx

from govmesh.forecasting import Price
from govmesh.llm import ModelRequest, OpenAIModel, OpenAISettings, schema_problem
from govmesh.observability._stats import summarize
from govmesh.reservations import BudgetCaps

if TYPE_CHECKING:
    from govmesh.agents import AgentService

__all__ = ["PLAN_SCHEMA", "run_model_bench"]

Progress = Callable[[str, int], None]

_RAMBLE: Final = "Write a long, detailed story about a purchasing department. Do not stop."

_PRICE: Final = Price(input_per_1k=0.0001, output_per_1k=0.0002)
"""A price for the local model, which costs nothing but electricity: the caps need one."""

PLAN_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "maxLength": 160},
        "risk": {"type": "string", "enum": ["low", "medium", "high"]},
    },
    "required": ["summary", "risk"],
}
"""The plan the bench asks for: the shape of the procurement example's `Plan`."""

_PLAN_PROMPT: Final = (
    "Plan a purchase of 12 laptops from Vendor_A for $4,800.00. Answer in JSON with a "
    "one-sentence summary and the risk (low, medium or high)."
)


async def run_model_bench(
    *,
    iterations: int = 30,
    warmup: int = 3,
    max_tokens: int = 32,
    base_url: str | None = None,
    model: str = "",
    tick: Progress | None = None,
) -> dict[str, Any]:
    """Measure the three phases and report them.

    Args:
        iterations: timed pairs (bare and provider), and timed plan iterations.
        warmup: untimed pairs first (the server's caches, the clients' connections).
        max_tokens: the completion cap of the paired calls (each generates exactly this).
        base_url: an OpenAI-compatible server to measure (it must take no key); None
            starts the local model here and stops it after.
        model: the model's name at ``base_url``; SmolLM2-135M-Instruct when empty.
        tick: progress callback ``(phase, units done)``.
    """
    from govmesh.runtime import SMOLLM2, LocalModelServer

    progress = tick or (lambda _p, _n: None)
    name = model or SMOLLM2
    workdir: Path | None = None
    server: LocalModelServer | None = None
    if base_url is None:
        progress("starting the local model", 0)
        workdir = Path(tempfile.mkdtemp(prefix="govmesh-bench-model-"))
        server = LocalModelServer(workdir=workdir, name=name)
        server.start()
        base_url = server.base_url
    settings = OpenAISettings(
        model=name, base_url=base_url, api_key_env="", response_format="json_object"
    )
    provider = OpenAIModel(settings)
    try:
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=settings.timeout_s) as bare,
            _governed_agent(provider) as agent,
        ):
            pairs = await _pairs(bare, provider, name, iterations, warmup, max_tokens, progress)
            governed = await _governed_pairs(agent, provider, iterations, max_tokens, progress)
            plan = await _plans(agent, iterations, progress)
    finally:
        await provider.close()
        if server is not None:
            server.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "model": name,
        "provider": OpenAIModel.provider,
        "base_url": "local (started by the bench)" if server is not None else base_url,
        "cpus": os.cpu_count(),
        "iterations": iterations,
        "max_tokens": max_tokens,
        **pairs,
        "governed": governed,
        "plan": plan,
    }


async def _bare_call(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, int, str]:
    started = time.perf_counter()
    answer = await client.post("/chat/completions", json=body)
    answer.raise_for_status()
    reply = answer.json()
    elapsed = time.perf_counter() - started
    return elapsed, int(reply["usage"]["completion_tokens"]), reply["choices"][0]["finish_reason"]


async def _provider_call(provider: OpenAIModel, request: ModelRequest) -> tuple[float, int, str]:
    started = time.perf_counter()
    response = await provider.complete(request)
    elapsed = time.perf_counter() - started
    return elapsed, response.output_tokens, response.stop_reason


async def _governed_call(agent: AgentService, request: ModelRequest) -> tuple[float, int, str]:
    started = time.perf_counter()
    response = await agent.call_model(f"bench-{request.key}", request)
    elapsed = time.perf_counter() - started
    return elapsed, response.output_tokens, response.stop_reason


Call = Callable[[int], Awaitable[tuple[float, int, str]]]
"""One timed call of a pair, numbered: (seconds, output tokens, stop reason)."""


async def _paired(
    base: Call, measured: Call, *, iterations: int, warmup: int, max_tokens: int, tick: Progress
) -> tuple[list[float], list[float], int]:
    """``base`` and ``measured`` timed in pairs, alternately first so any drift of the
    machine falls on both; pairs where either stopped before ``max_tokens`` (not the same
    work) are left out. Returns both sides' seconds and how many pairs were left out."""
    base_s: list[float] = []
    measured_s: list[float] = []
    left_out = 0
    for i in range(warmup + iterations):
        if i % 2:
            via = await measured(i)
            raw = await base(i)
        else:
            raw = await base(i)
            via = await measured(i)
        if i < warmup:
            continue
        tick("", 1)
        if raw[1] != max_tokens or via[1] != max_tokens:
            left_out += 1
            continue
        base_s.append(raw[0])
        measured_s.append(via[0])
    return base_s, measured_s, left_out


def _compared(base_s: list[float], measured_s: list[float]) -> dict[str, Any]:
    """Each pair's measured time over its base time, and the difference, at p50 and p99."""
    return {
        "overhead_ratio": summarize([m / b for b, m in zip(base_s, measured_s, strict=True)]),
        "overhead_ms": summarize([(m - b) * 1000 for b, m in zip(base_s, measured_s, strict=True)]),
    }


async def _pairs(
    bare: httpx.AsyncClient,
    provider: OpenAIModel,
    name: str,
    iterations: int,
    warmup: int,
    max_tokens: int,
    progress: Progress,
) -> dict[str, Any]:
    body = {
        "model": name,
        "messages": [{"role": "user", "content": _RAMBLE}],
        "max_tokens": max_tokens,
    }
    request = ModelRequest(prompt=_RAMBLE, max_tokens=max_tokens, key="bench")
    progress("bare HTTP and provider, alternately", 0)
    bare_s, provider_s, left_out = await _paired(
        lambda _i: _bare_call(bare, body),
        lambda _i: _provider_call(provider, request),
        iterations=iterations,
        warmup=warmup,
        max_tokens=max_tokens,
        tick=progress,
    )
    return {
        "bare_ms": summarize([s * 1000 for s in bare_s]),
        "provider_ms": summarize([s * 1000 for s in provider_s]),
        "bare_tokens_per_s": _rate(max_tokens * len(bare_s), sum(bare_s)),
        "provider_tokens_per_s": _rate(max_tokens * len(provider_s), sum(provider_s)),
        **_compared(bare_s, provider_s),
        "pairs": len(provider_s),
        "pairs_left_out": left_out,
    }


@asynccontextmanager
async def _governed_agent(provider: OpenAIModel) -> AsyncIterator[AgentService]:
    """An agent thinking with ``provider`` as a deployment runs one: a mutual-TLS
    nats-server, a Redis-protocol server, the budget actor, each call reserved against a
    workflow cap (one no call reaches) and settled."""
    from govmesh.agents import AgentService
    from govmesh.forecasting import BudgetService
    from govmesh.identity import Issuer
    from govmesh.runtime import RedisServer, Transport

    tenant = "bench"
    prices = {provider.model: _PRICE}
    issuer = Issuer(name="bench", audience=f"govmesh:{tenant}")
    thinker = issuer.identity("thinker-1", "agent")
    budget = issuer.identity("budget-1", "budget")
    with tempfile.TemporaryDirectory(prefix="govmesh-bench-model-") as tmp:
        async with AsyncExitStack() as stack:
            transport, nats_server = Transport.embedded(Path(tmp) / "nats")
            stack.enter_context(nats_server)
            redis_server = stack.enter_context(RedisServer(workdir=Path(tmp) / "redis"))
            transport.enrol([thinker, budget], tenant=tenant)
            deployment = issuer.deployment(
                tenant=tenant, nats_url=nats_server.url, redis_url=redis_server.url, tls=True
            )
            actor = BudgetService(deployment, budget, prices=prices)
            agent = AgentService(
                deployment,
                thinker,
                model=provider,
                prices=prices,
                budget=BudgetCaps(workflow_usd=1_000.0, soft_threshold=None),
            )
            for service in (actor, agent):
                await service.start()
                stack.push_async_callback(service.close)
            yield agent


async def _governed_pairs(
    agent: AgentService,
    provider: OpenAIModel,
    iterations: int,
    max_tokens: int,
    progress: Progress,
) -> dict[str, Any]:
    def request(i: int) -> ModelRequest:
        # A workflow of its own per call, as the reservations are kept per workflow.
        return ModelRequest(prompt=_RAMBLE, max_tokens=max_tokens, key=f"governed:{i}")

    progress("provider and governed agent, alternately", 0)
    provider_s, governed_s, left_out = await _paired(
        lambda i: _provider_call(provider, request(i)),
        lambda i: _governed_call(agent, request(i)),
        iterations=iterations,
        warmup=0,
        max_tokens=max_tokens,
        tick=progress,
    )
    return {
        "provider_ms": summarize([s * 1000 for s in provider_s]),
        "governed_ms": summarize([s * 1000 for s in governed_s]),
        **_compared(provider_s, governed_s),
        "pairs": len(governed_s),
        "pairs_left_out": left_out,
    }


async def _plans(agent: AgentService, iterations: int, progress: Progress) -> dict[str, Any]:
    progress("governed plan iterations (structured output)", 0)
    seconds: list[float] = []
    tokens = 0
    usable = 0
    last = ""
    for i in range(iterations):
        request = ModelRequest(
            prompt=_PLAN_PROMPT, max_tokens=128, key=f"plan:{i}", schema=PLAN_SCHEMA
        )
        started = time.perf_counter()
        response = await agent.call_model(f"plan-{i}", request)
        seconds.append(time.perf_counter() - started)
        tokens += response.output_tokens
        usable += not schema_problem(response.text, PLAN_SCHEMA)
        last = response.text
        progress("", 1)
    return {
        "iteration_ms": summarize([s * 1000 for s in seconds]),
        "tokens_per_s": _rate(tokens, sum(seconds)),
        "output_tokens_mean": tokens / iterations,
        "usable_share": usable / iterations,
        "last_answer": last,
    }


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0
