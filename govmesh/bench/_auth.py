"""``govmesh bench auth``: what mutual TLS and full mTLS-A add to an inter-agent call.

Request/reply between agent pairs over three setups, measured in the same run:

- ``plain``: plain NATS, raw bytes;
- ``mtls``: NATS with mutual TLS and certificate-mapped users, raw bytes;
- ``mtls_a``: mutual TLS plus the signed envelope, Agent-ID token, freshness and replay
  checks on both the request and the reply (the path every govmesh message takes).

Each setup gets a fresh nats-server; payload sizes are the same in all three. Latency
(``p50_ms``, ``p99_ms``) is measured with one exchange in flight; throughput
(``msgs_per_s``, with ``loaded_p50_ms``/``loaded_p99_ms``) with every pair calling at once.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from govmesh.bus import Bus, Delivery, Subjects
from govmesh.config import Deployment
from govmesh.identity import Identity, Issuer
from govmesh.observability import summarize

__all__ = ["SETUPS", "run_auth_bench"]

SETUPS = ("plain", "mtls", "mtls_a")
_PAYLOAD = b"x" * 256


class BenchPing(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The request and reply body of the mTLS-A setup."""

    n: int
    payload: bytes


Progress = Callable[[str, int], None]
Call = Callable[[int], Awaitable[None]]


async def _pair_loop(call: Call, messages: int, latencies: list[float], tick: Progress) -> None:
    for n in range(messages):
        started = time.perf_counter()
        await call(n)
        latencies.append((time.perf_counter() - started) * 1000)
        tick("", 1)


async def _measure(
    calls: list[Call], *, messages: int, warmup: int, tick: Progress
) -> dict[str, float]:
    """Two phases: latency with one exchange in flight (pairs take turns), so the figure is
    the cost of one call and not queueing behind the others; then throughput with every
    pair calling at once."""
    for call in calls:
        for n in range(warmup):
            await call(-1 - n)
    quiet: list[float] = []
    for n in range(messages):
        for call in calls:
            started = time.perf_counter()
            await call(n)
            quiet.append((time.perf_counter() - started) * 1000)
        tick("", len(calls))
    loaded: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(*(_pair_loop(c, messages, loaded, tick) for c in calls))
    elapsed = time.perf_counter() - started
    q, busy = summarize(quiet), summarize(loaded)
    # Each exchange is two messages (request and reply), each delivered (and in mTLS-A,
    # verified) once.
    return {
        "p50_ms": q["p50"],
        "p99_ms": q["p99"],
        "mean_ms": q["mean"],
        "msgs_per_s": 2 * len(loaded) / elapsed,
        "loaded_p50_ms": busy["p50"],
        "loaded_p99_ms": busy["p99"],
        "exchanges": len(quiet) + len(loaded),
    }


async def _raw_pairs(
    stack: AsyncExitStack, agents: int, connect: Callable[[str], Awaitable[NATS]]
) -> list[Call]:
    subjects = Subjects("bench")
    calls: list[Call] = []
    for i in range(agents):
        responder = await connect(f"responder-{i}")
        requester = await connect(f"requester-{i}")
        stack.push_async_callback(responder.close)
        stack.push_async_callback(requester.close)

        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        subject = subjects.msg(f"responder-{i}")
        await responder.subscribe(subject, cb=echo)
        await responder.flush()

        async def call(n: int, nc: NATS = requester, subject: str = subject) -> None:
            await nc.request(subject, _PAYLOAD, timeout=10)

        calls.append(call)
    return calls


async def _signed_pairs(
    stack: AsyncExitStack, agents: int, deployment: Deployment, identities: dict[str, Identity]
) -> list[Call]:
    calls: list[Call] = []
    for i in range(agents):
        responder = await Bus.connect(deployment, identities[f"responder-{i}"], rotate=False)
        requester = await Bus.connect(deployment, identities[f"requester-{i}"], rotate=False)
        stack.push_async_callback(responder.close)
        stack.push_async_callback(requester.close)

        async def echo(d: Delivery, bus: Bus = responder) -> None:
            await bus.respond(d, d.body)

        subject = responder.subjects.msg(f"responder-{i}")
        await responder.subscribe(subject, echo, accepts=BenchPing, concurrent=False)
        await responder.flush()

        async def call(n: int, bus: Bus = requester, subject: str = subject) -> None:
            reply = await bus.request(
                subject, BenchPing(n=n, payload=_PAYLOAD), accepts=BenchPing, timeout=10
            )
            if reply.body.n != n:
                raise AssertionError(f"reply {reply.body.n} for request {n}")

        calls.append(call)
    return calls


async def _setup(name: str, stack: AsyncExitStack, workdir: Path, agents: int) -> list[Call]:
    """Start the server of setup ``name`` and connect its agent pairs."""
    from govmesh.identity import ssl_context
    from govmesh.runtime import NatsServer, Transport

    subjects = Subjects("bench")
    members = [f"{side}-{i}" for i in range(agents) for side in ("requester", "responder")]
    if name == "plain":
        server = stack.enter_context(NatsServer(workdir=workdir, jetstream=False))

        async def plain(member: str) -> NATS:
            return await nats.connect(server.url, name=member)

        return await _raw_pairs(stack, agents, plain)
    transport, server = Transport.embedded(workdir, jetstream=False)
    stack.enter_context(server)
    issuer = Issuer(name="bench", audience="govmesh:bench")
    identities = {m: issuer.identity(m, "agent") for m in members}
    transport.enrol(identities.values(), tenant=subjects.tenant)
    if name == "mtls":

        async def tls(member: str) -> NATS:
            cert = identities[member].cert
            assert cert is not None
            return await nats.connect(
                server.url,
                name=member,
                tls=ssl_context(cert),
                inbox_prefix=subjects.inbox_prefix(member),
            )

        return await _raw_pairs(stack, agents, tls)
    deployment = issuer.deployment(
        tenant=subjects.tenant, nats_url=server.url, redis_url="", tls=True
    )
    return await _signed_pairs(stack, agents, deployment, identities)


async def run_auth_bench(
    *,
    agents: int = 4,
    messages: int = 2000,
    warmup: int = 100,
    tick: Progress | None = None,
) -> dict[str, Any]:
    """Run the three setups in turn and return the report.

    Args:
        agents: requester/responder pairs, all calling at once.
        messages: timed exchanges per pair.
        warmup: untimed exchanges per pair first.
        tick: progress callback ``(setup name or "", completed exchanges)``.
    """
    report: dict[str, Any] = {"agents": agents, "messages_per_agent": messages}
    progress = tick or (lambda _s, _n: None)
    with tempfile.TemporaryDirectory(prefix="govmesh-bench-") as tmp:
        for name in SETUPS:
            progress(name, 0)
            async with AsyncExitStack() as stack:
                calls = await _setup(name, stack, Path(tmp) / name, agents)
                report[name] = await _measure(
                    calls, messages=messages, warmup=warmup, tick=progress
                )
    for key, setup in (("overhead_ms", "mtls_a"), ("mtls_overhead_ms", "mtls")):
        report[key] = {
            q: report[setup][f"{q}_ms"] - report["plain"][f"{q}_ms"] for q in ("p50", "p99")
        }
    return report
