"""``govmesh bench state``: how fast a snapshot is written and an agent rehydrated.

One snapshot of the size the field quotes for a long-running agent: a goal state just under
the 10 KB limit, a 50 KB tool snapshot and a 200 KB reflection log. Measured in one run, on
embedded servers with mutual TLS:

- ``snapshot_ms``: an agent sends a snapshot as a request over the signed bus; the state
  actor seals it (encrypts the tool tier, compresses the log), stores it in Redis and
  acknowledges: the time until the agent holds the acknowledgement;
- ``rehydrate_ms``: the agent asks for its latest snapshot; the state actor reads it (one
  O(log N) sorted-set lookup), unseals it and answers: the time until the agent holds the
  verified, decoded snapshot;
- the baselines: a raw Redis ``SET`` and ``GET`` of the same sealed bytes (``redis_set_ms``,
  ``redis_get_ms``), and sealing and unsealing in process (``seal_ms``, ``unseal_ms``).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis

from govmesh.bus import Bus, Subjects
from govmesh.identity import Issuer
from govmesh.observability import summarize
from govmesh.state import (
    GOAL_LIMIT_BYTES,
    Keyring,
    SnapshotState,
    StateService,
    encode_sealed,
    seal,
    unseal,
)
from govmesh.state.messages import Snapshot, SnapshotQuery, SnapshotReply, SnapshotStored

__all__ = ["run_state_bench"]

TOOL_BYTES: Final = 50 * 1024
LOG_BYTES: Final = 200 * 1024
_TARGETS: Final = {"rehydrate_p99_ms": 10.0}
_WARMUP: Final = 20
_AGENT: Final = "agent-1"

Progress = Callable[[str, int], None]


def _payload() -> tuple[dict[str, Any], bytes, tuple[str, ...]]:
    """A goal just under the limit, a random tool snapshot, a reflection log of LOG_BYTES."""
    goal: dict[str, Any] = {"phase": "negotiating", "vendor": "Vendor_A", "rounds": []}
    n = 0
    while len(repr(goal)) < GOAL_LIMIT_BYTES - 400:
        goal["rounds"].append({"round": n, "offer_usd": 9000 - n, "note": "counter-offer " * 4})
        n += 1
    entry = "the vendor's quote was above the limit; reflect on a smaller order and retry. "
    log = tuple(f"{i}: {entry}" for i in range(LOG_BYTES // (len(entry) + 6)))
    return goal, os.urandom(TOOL_BYTES), log


async def run_state_bench(*, snapshots: int = 1000, tick: Progress | None = None) -> dict[str, Any]:
    """Measure snapshot write and rehydration over the bus beside their baselines.

    Args:
        snapshots: timed snapshots written, then as many rehydrations.
        tick: progress callback ``(phase name or "", completed operations)``.
    """
    from govmesh.runtime import RedisServer, Transport

    progress = tick or (lambda _s, _n: None)
    goal, tool, log = _payload()
    subjects = Subjects("bench")
    issuer = Issuer(name="bench", audience="govmesh:bench")
    keyring = Keyring.generate("bench")
    with tempfile.TemporaryDirectory(prefix="govmesh-bench-") as tmp:
        async with AsyncExitStack() as stack:
            transport, nats_server = Transport.embedded(Path(tmp) / "nats", jetstream=False)
            stack.enter_context(nats_server)
            redis_server = stack.enter_context(RedisServer(workdir=Path(tmp) / "redis"))
            state_id = issuer.identity("state-1", "state")
            agent_id = issuer.identity(_AGENT, "agent")
            transport.enrol([state_id, agent_id], tenant=subjects.tenant)
            deployment = issuer.deployment(
                tenant=subjects.tenant,
                nats_url=nats_server.url,
                redis_url=redis_server.url,
                tls=True,
            )
            state = StateService(deployment, state_id, keyring=keyring, retain=10)
            stack.push_async_callback(state.close)
            await state.start()
            agent = await Bus.connect(deployment, agent_id, rotate=False)
            stack.push_async_callback(agent.close)
            redis = aioredis.Redis.from_url(redis_server.url)
            stack.push_async_callback(redis.aclose)

            async def write(version: int) -> float:
                snap = Snapshot(
                    workflow="wf-bench",
                    version=version,
                    goal=goal,
                    tool=tool,
                    reflections=log,
                )
                started = time.perf_counter()
                reply = await agent.request(
                    subjects.state(_AGENT), snap, accepts=SnapshotStored, workflow="wf-bench"
                )
                elapsed = (time.perf_counter() - started) * 1000
                stored: SnapshotStored = reply.body
                if not stored.stored:
                    raise RuntimeError(f"the bench snapshot was refused: {stored.error}")
                return elapsed

            async def rehydrate() -> float:
                started = time.perf_counter()
                reply = await agent.request(
                    subjects.ctl("state"),
                    SnapshotQuery(workflow="wf-bench", agent=_AGENT),
                    accepts=SnapshotReply,
                )
                elapsed = (time.perf_counter() - started) * 1000
                body: SnapshotReply = reply.body
                if body.snapshot is None or body.snapshot.tool != tool:
                    raise RuntimeError(f"rehydration returned something else: {body.error}")
                return elapsed

            for n in range(_WARMUP):
                await write(n + 1)
                await rehydrate()
            progress("snapshot over the bus", 0)
            writes = []
            for n in range(snapshots):
                writes.append(await write(_WARMUP + n + 1))
                progress("", 1)
            progress("rehydrate over the bus", 0)
            reads = []
            for _ in range(snapshots):
                reads.append(await rehydrate())
                progress("", 1)

            progress("baselines: Redis SET/GET, seal/unseal", 0)
            state_in_clear = SnapshotState(
                tenant="bench",
                workflow="wf-bench",
                agent=_AGENT,
                version=1,
                goal=goal,
                tool=tool,
                reflections=log,
            )
            sealed = seal(state_in_clear, keyring)
            data = encode_sealed(sealed)
            sets, gets, seals, unseals = [], [], [], []
            for _ in range(snapshots):
                started = time.perf_counter()
                await redis.set("gm:bench:raw", data)
                sets.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await redis.get("gm:bench:raw")
                gets.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                seal(state_in_clear, keyring)
                seals.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                unseal(sealed, keyring)
                unseals.append((time.perf_counter() - started) * 1000)
                progress("", 1)
    report: dict[str, Any] = {
        "snapshots": snapshots,
        "sizes_bytes": {
            "goal": len(sealed.goal),
            "tool": TOOL_BYTES,
            "reflections": sum(len(e.encode()) for e in log),
            "reflections_compressed": len(sealed.reflections or b""),
            "sealed": len(data),
        },
        "snapshot_ms": summarize(writes),
        "rehydrate_ms": summarize(reads),
        "redis_set_ms": summarize(sets),
        "redis_get_ms": summarize(gets),
        "seal_ms": summarize(seals),
        "unseal_ms": summarize(unseals),
        "targets": _TARGETS,
    }
    report["met"] = {
        "rehydrate_p99_ms": report["rehydrate_ms"]["p99"] <= _TARGETS["rehydrate_p99_ms"]
    }
    report["rehydrate_vs_redis_get"] = report["rehydrate_ms"]["p50"] / report["redis_get_ms"]["p50"]
    return report
