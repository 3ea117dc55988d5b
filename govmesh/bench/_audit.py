"""``govmesh bench audit``: how fast the audit index takes events and returns a workflow.

On an embedded Redis-protocol server, in one run:

- ``ingest_events_per_s``: N sealed messages (signed by real identities, the bytes a
  JetStream consumer reads from the event stream) go through `AuditIndex.ingest` in batches,
  each verified as a receiver would (token, signature, sender, subject, replay),
  interleaved across W workflows as concurrent workflows interleave on the bus: intent,
  decision, tool result, usage, each answering the one before. Only the ``ingest`` calls are
  timed; sealing the messages is not;
- ``show_ms``: `AuditIndex.show` of one random workflow: its records decoded in order and
  its causal tree; beside the baseline ``lrange_ms``, a raw ``LRANGE`` of the same list;
- ``verify_ms``: `AuditIndex.verify` of one random workflow, with a signed checkpoint of
  every head in place (so each call also checks the checkpoint's signature);
- ``checkpoint_ms`` and ``verify_all_s``: one checkpoint of all heads, one check of every
  chain.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis

from govmesh.bus import Codec, Subjects
from govmesh.forecasting.messages import Usage
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.identity import Issuer, SigningKey
from govmesh.observability import AuditIndex, StoredMessage, StreamVerifier, summarize
from govmesh.tools.messages import ToolResult

__all__ = ["run_audit_bench"]

_TARGETS: Final = {"show_p99_ms": 50.0, "ingest_events_per_s": 10_000.0}
_PREFIX: Final = "gm:bench"
_POLICY_HASH: Final = "5" * 64
_DAY_S: Final = 24 * 3600.0

Progress = Callable[[str, int], None]


class _Events:
    """Seals the bench's events: step ``s`` of workflow ``w`` is the ``s % 4``-th of intent,
    decision, tool result, usage, each caused by the one its real counterpart answers."""

    def __init__(self, workflows: int) -> None:
        issuer = Issuer(name="bench", audience="govmesh:bench")
        self.subjects = Subjects("bench")
        self.codec = Codec()
        self.verifier = StreamVerifier(issuers=[issuer.public_key], audience=issuer.audience)
        # Tokens that outlast the bench: each message is judged at the time it was sealed.
        self.buyer = issuer.identity("buyer-1", "agent", ttl_s=_DAY_S)
        self.governance = issuer.identity("governance-1", "governance", ttl_s=_DAY_S)
        self.gateway = issuer.identity("gateway-1", "gateway", ttl_s=_DAY_S)
        self.sealed = 0
        self.intent = [""] * workflows
        self.decision = [""] * workflows

    def seal(self, workflow: int, step: int) -> StoredMessage:
        wf = f"wf-{workflow:06d}"
        match step % 4:
            case 0:
                subject = self.subjects.intent("buyer-1")
                env, data = self.codec.seal(
                    self.buyer,
                    subject=subject,
                    body=ToolIntent(tool="erp.order", args={"usd": 120 + step}, step=step),
                    workflow=wf,
                )
                self.intent[workflow] = env.id
            case 1:
                subject = self.subjects.decision("buyer-1", wf)
                env, data = self.codec.seal(
                    self.governance,
                    subject=subject,
                    body=Decision(
                        intent_id=self.intent[workflow],
                        intent_hash="0" * 64,
                        workflow=wf,
                        agent="buyer-1",
                        outcome="allow",
                        policy_hash=_POLICY_HASH,
                        expires_at=time.time() + 300,
                    ),
                    workflow=wf,
                    causation=self.intent[workflow],
                )
                self.decision[workflow] = env.id
            case 2:
                subject = self.subjects.tool("erp.order")
                _, data = self.codec.seal(
                    self.gateway,
                    subject=subject,
                    body=ToolResult(ok=True, result={"order": step}),
                    workflow=wf,
                    causation=self.decision[workflow],
                )
            case _:
                subject = self.subjects.usage("buyer-1")
                _, data = self.codec.seal(
                    self.buyer,
                    subject=subject,
                    body=Usage(model="sim-small", input_tokens=900, output_tokens=150),
                    workflow=wf,
                    causation=self.intent[workflow],
                )
        self.sealed += 1
        return StoredMessage(subject=subject, data=data, seq=self.sealed, stored_at=time.time())


async def run_audit_bench(
    *,
    events: int = 1_000_000,
    workflows: int = 10_000,
    batch: int = 2000,
    samples: int = 1000,
    seed: int = 1,
    tick: Progress | None = None,
) -> dict[str, Any]:
    """Fill an audit index and measure ingest, show and verify beside raw Redis.

    Args:
        events: events ingested.
        workflows: workflows they are spread over (round robin).
        batch: events per `AuditIndex.ingest` call.
        samples: timed show, verify and LRANGE calls, each of a random workflow.
        seed: seed of the workflow sampling.
        tick: progress callback ``(phase name or "", completed units)``.
    """
    from govmesh.runtime import RedisServer

    progress = tick or (lambda _s, _n: None)
    rng = random.Random(seed)
    source = _Events(workflows)
    with (
        tempfile.TemporaryDirectory(prefix="govmesh-bench-") as tmp,
        RedisServer(workdir=Path(tmp) / "redis") as server,
    ):
        redis = aioredis.Redis.from_url(server.url)
        try:
            index = AuditIndex(redis, prefix=_PREFIX)
            progress("ingest", 0)
            ingest_s = seal_s = 0.0
            stored = 0
            for start in range(0, events, batch):
                started = time.perf_counter()
                chunk = [
                    source.seal(i % workflows, i // workflows)
                    for i in range(start, min(start + batch, events))
                ]
                sealed = time.perf_counter()
                report = await index.ingest(chunk, verifier=source.verifier)
                ingest_s += time.perf_counter() - sealed
                seal_s += sealed - started
                stored += report.stored
                progress("", len(chunk))
            if stored != events:
                raise RuntimeError(f"the bench stored {stored} of {events} events")

            progress("checkpoint", 0)
            key = SigningKey()
            started = time.perf_counter()
            await index.checkpoint(key, signer="bench")
            checkpoint_ms = (time.perf_counter() - started) * 1000

            progress("show, verify, LRANGE", 0)
            names = [f"wf-{rng.randrange(workflows):06d}" for _ in range(samples)]
            shows, verifies, lranges = [], [], []
            for n, wf in enumerate(names):
                # Alternate which read comes first: the first read of a list pays for
                # bringing it into the caches.
                for show_first in (n % 2 == 0, n % 2 == 1):
                    started = time.perf_counter()
                    if show_first:
                        trace = await index.show(wf)
                        shows.append((time.perf_counter() - started) * 1000)
                    else:
                        await redis.lrange(index.chain_key(wf), 0, -1)
                        lranges.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                checked = await index.verify(wf, trusted=[key.public])
                verifies.append((time.perf_counter() - started) * 1000)
                if not trace.records or not checked.ok:
                    raise RuntimeError(f"workflow {wf} is empty or broken: {checked}")
                progress("", 1)

            progress("verify every chain", 0)
            started = time.perf_counter()
            everything = await index.verify(trusted=[key.public])
            verify_all_s = time.perf_counter() - started
            if not everything.ok or everything.records != events:
                raise RuntimeError(f"the full verify found {everything.problems[:5]}")
            progress("", 1)
            # INFO is for the administrator: the platform user may not run it.
            admin = aioredis.Redis.from_url(server.admin_url)
            try:
                memory = await admin.info("memory")
            finally:
                await admin.aclose()
        finally:
            await redis.aclose()
    report_: dict[str, Any] = {
        "events": events,
        "workflows": workflows,
        "events_per_workflow": events / workflows,
        "batch": batch,
        "samples": samples,
        "ingest_s": ingest_s,
        "seal_s": seal_s,
        "ingest_events_per_s": events / ingest_s,
        "show_ms": summarize(shows),
        "lrange_ms": summarize(lranges),
        "verify_ms": summarize(verifies),
        "checkpoint_ms": checkpoint_ms,
        "verify_all_s": verify_all_s,
        "redis_used_memory_mb": int(memory.get("used_memory", 0)) / 2**20,
        "targets": _TARGETS,
    }
    report_["met"] = {
        "show_p99_ms": report_["show_ms"]["p99"] <= _TARGETS["show_p99_ms"],
        "ingest_events_per_s": report_["ingest_events_per_s"] >= _TARGETS["ingest_events_per_s"],
    }
    report_["show_vs_lrange"] = report_["show_ms"]["p50"] / report_["lrange_ms"]["p50"]
    return report_
