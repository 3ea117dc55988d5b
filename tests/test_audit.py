"""The audit index against a real Redis-protocol server and a real nats-server: appends are
idempotent, show returns the causal tree, and verify names every edit of a chain."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from govmesh.bus import Bus, Codec, Subjects
from govmesh.cli import cli
from govmesh.config import key_prefix
from govmesh.forecasting.messages import Usage
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.identity import Identity, Issuer, SigningKey
from govmesh.observability import (
    AuditConsumer,
    AuditIndex,
    AuditRecord,
    RefusedMessage,
    StoredMessage,
    StreamVerifier,
    summarize_body,
)
from govmesh.runtime import NatsServer, RedisServer
from govmesh.state.messages import Snapshot
from govmesh.tools.messages import ToolResult

from _deploy import deployment


class Note(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    n: int


class Sender:
    """Seals messages of one tenant as a given agent, the way the bus does, and numbers them
    as the event stream stores them."""

    def __init__(self, tenant: str) -> None:
        self.issuer = Issuer(name=f"test:{tenant}", audience=f"govmesh:{tenant}")
        self.verifier = StreamVerifier(
            issuers=[self.issuer.public_key], audience=f"govmesh:{tenant}"
        )
        self.subjects = Subjects(tenant)
        self.codec = Codec()
        self.agents = {}
        self.seq = 0

    def stored(self, subject: str, data: bytes) -> StoredMessage:
        self.seq += 1
        return StoredMessage(subject=subject, data=data, seq=self.seq, stored_at=time.time())

    def seal(
        self, agent: str, body: msgspec.Struct, *, workflow: str, causation: str = ""
    ) -> tuple[str, StoredMessage]:
        if agent not in self.agents:
            self.agents[agent] = self.issuer.identity(agent, "agent")
        subject = self.subjects.msg(agent)
        envelope, data = self.codec.seal(
            self.agents[agent], subject=subject, body=body, workflow=workflow, causation=causation
        )
        return envelope.id, self.stored(subject, data)


def _notes(sender: Sender, workflow: str, n: int) -> list[StoredMessage]:
    return [sender.seal("alice", Note(n=i), workflow=workflow)[1] for i in range(n)]


async def _index(redis_server: RedisServer, tenant: str) -> tuple[AuditIndex, aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_server.url)
    return AuditIndex(r, prefix=key_prefix(tenant)), r


@contextlib.asynccontextmanager
async def _stream_and_index(
    nats_server: NatsServer, redis_server: RedisServer, tenant: str
) -> AsyncIterator[tuple[nats.NATS, AuditIndex]]:
    """A plain NATS connection for a consumer and the tenant's index, closed afterwards."""
    nc = await nats.connect(nats_server.url)
    index, r = await _index(redis_server, tenant)
    try:
        yield nc, index
    finally:
        await nc.close()
        await r.aclose()


async def _alice(
    nats_server: NatsServer, redis_server: RedisServer, tenant: str
) -> tuple[Bus, StreamVerifier]:
    """An agent's bus, to publish the events a consumer stores, and the verifier of its
    deployment."""
    dep, issuer = deployment(nats_server.url, redis_server.url, tenant)
    bus = await Bus.connect(dep, issuer.identity("alice", "agent"), rotate=False)
    return bus, StreamVerifier.of(dep)


async def _until_stored(index: AuditIndex, workflow: str, count: int) -> None:
    """Wait (up to 10 s) until the index holds ``count`` records of ``workflow``."""
    deadline = time.monotonic() + 10
    while len(await index.records(workflow)) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


@pytest.fixture
async def audited(
    redis_server: RedisServer, prefix: str
) -> AsyncIterator[tuple[Sender, AuditIndex, aioredis.Redis]]:
    """A sender of the test's tenant, its audit index and the Redis connection under it."""
    index, r = await _index(redis_server, prefix)
    try:
        yield Sender(prefix), index, r
    finally:
        await r.aclose()


async def test_appending_the_same_event_twice_stores_it_once(
    redis_server: RedisServer, prefix: str
) -> None:
    sender = Sender(prefix)
    index, r = await _index(redis_server, prefix)
    try:
        first = _notes(sender, "wf-1", 3)
        report = await index.ingest(first, verifier=sender.verifier)
        assert (report.stored, report.duplicates) == (3, 0)
        extra = _notes(sender, "wf-1", 1)
        garbage = sender.stored(sender.subjects.msg("alice"), b"garbage")
        report = await index.ingest([*first, *extra, extra[0], garbage], verifier=sender.verifier)
        assert (report.stored, report.duplicates, report.refused) == (1, 4, 1)
        records = await index.records("wf-1")
        assert [rec.seq for rec in records] == [1, 2, 3, 4]
        assert [rec.prev for rec in records[1:]] == [rec.hash for rec in records[:-1]]
        assert (await index.verify("wf-1")).ok
    finally:
        await r.aclose()


async def test_show_returns_the_causal_tree_with_summaries(
    redis_server: RedisServer, prefix: str
) -> None:
    sender = Sender(prefix)
    index, r = await _index(redis_server, prefix)
    wf = "wf-tree"
    intent_id, intent = sender.seal(
        "buyer", ToolIntent(tool="erp.order", args={"usd": 10}, step=1, reflections=2), workflow=wf
    )
    decision_id, decision = sender.seal(
        "governance",
        Decision(
            intent_id=intent_id,
            intent_hash="ih",
            workflow=wf,
            agent="buyer",
            outcome="allow",
            policy_hash="p" * 64,
            expires_at=time.time() + 60,
        ),
        workflow=wf,
        causation=intent_id,
    )
    result_id, result = sender.seal(
        "gateway", ToolResult(ok=True), workflow=wf, causation=decision_id
    )
    usage_id, usage = sender.seal(
        "buyer",
        Usage(model="sim", input_tokens=100, output_tokens=20),
        workflow=wf,
        causation=intent_id,
    )
    _, snap = sender.seal(
        "buyer",
        Snapshot(workflow=wf, version=1, goal={}, reflections=("the vendor was too dear",)),
        workflow=wf,
    )
    try:
        await index.ingest([intent, decision, result, usage, snap], verifier=sender.verifier)
        trace = await index.show(wf)
        assert [rec.kind for rec in trace.records] == [
            "ToolIntent",
            "Decision",
            "ToolResult",
            "Usage",
            "Snapshot",
        ]
        assert trace.roots == [intent_id, trace.records[-1].id]
        assert trace.children == {intent_id: [decision_id, usage_id], decision_id: [result_id]}
        summaries = {rec.kind: rec.summary for rec in trace.records}
        assert summaries["Decision"]["outcome"] == "allow"
        assert summaries["Decision"]["policy_hash"] == "p" * 64
        assert summaries["ToolResult"]["ok"] is True
        assert summaries["Usage"]["input_tokens"] == 100
        assert len(str(summaries["Snapshot"]["thought_sha256"])) == 64
        assert "thought_sha256" not in summaries["ToolIntent"]  # a count of reflections
        assert "too dear" not in str(summaries["Snapshot"])
        assert [rec.id for rec in await index.by_agent("buyer")] == [
            intent_id,
            usage_id,
            trace.records[-1].id,
        ]
        assert [rec.id for rec in await index.by_kind("Decision")] == [decision_id]
    finally:
        await r.aclose()


def test_verify_names_an_edited_a_removed_and_two_reordered_records(
    redis_server: RedisServer, prefix: str
) -> None:
    sender = Sender(prefix)
    wf = "wf-tampered"

    async def fill_and_tamper() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        index, r = await _index(redis_server, prefix)
        try:
            await index.ingest(_notes(sender, wf, 8), verifier=sender.verifier)
            await index.ingest(_notes(sender, "wf-untouched", 3), verifier=sender.verifier)
            assert (await index.verify()).ok
            key = index.chain_key(wf)
            raw = await r.lrange(key, 0, -1)
            edited = msgspec.structs.replace(
                msgspec.msgpack.decode(raw[1], type=AuditRecord), sender="mallory"
            )
            await r.lset(key, 1, msgspec.msgpack.encode(edited))
            await r.lrem(key, 1, raw[3])
            # seq 6 and 7 now sit at list positions 4 and 5
            await r.lset(key, 4, raw[6])
            await r.lset(key, 5, raw[5])
            one = await index.verify(wf)
            every = await index.verify()
            # Both chains at once, as a run checks its own: the same findings, and the
            # untouched chain's records counted too.
            both = await index.verify([wf, "wf-untouched"])
            assert (both.workflows, both.records) == (2, one.records + 3)
            assert sorted((p.workflow, p.seq, p.what) for p in both.problems) == sorted(
                (wf, p.seq, p.what) for p in one.problems
            )
            return (
                [(p.seq, p.what) for p in one.problems],
                [(p.seq, p.what) for p in every.problems],
            )
        finally:
            await r.aclose()

    one, every = asyncio.run(fill_and_tamper())
    expected = [(2, "changed"), (4, "removed"), (6, "reordered"), (7, "reordered")]
    assert sorted(one) == expected
    assert sorted(every) == expected
    runner = CliRunner()
    args = ["audit", "verify", wf, "--tenant", prefix, "--redis-url", redis_server.url]
    result = runner.invoke(cli, args)
    assert result.exit_code == 1, result.output
    for seq, what in expected:
        assert f"{wf}" in result.output
        assert what in result.output and str(seq) in result.output
    intact = runner.invoke(
        cli,
        ["audit", "verify", "wf-untouched", "--tenant", prefix, "--redis-url", redis_server.url],
    )
    assert intact.exit_code == 0, intact.output
    shown = runner.invoke(
        cli, ["audit", "show", "wf-untouched", "--tenant", prefix, "--redis-url", redis_server.url]
    )
    assert shown.exit_code == 0, shown.output
    assert "Note" in shown.output and "alice" in shown.output


async def test_a_signed_checkpoint_catches_a_truncated_tail(
    redis_server: RedisServer, prefix: str
) -> None:
    sender = Sender(prefix)
    index, r = await _index(redis_server, prefix)
    key = SigningKey()
    wf = "wf-cut"
    try:
        await index.ingest(_notes(sender, wf, 6), verifier=sender.verifier)
        checkpoint = await index.checkpoint(key, signer="auditor")
        assert checkpoint.heads[wf][0] == 6
        await index.ingest(_notes(sender, wf, 2), verifier=sender.verifier)
        assert (await index.verify(wf, trusted=[key.public])).ok
        # Cut the tail and move the head back, so the chain alone looks whole.
        await r.ltrim(index.chain_key(wf), 0, 3)
        fourth = msgspec.msgpack.decode(await r.lindex(index.chain_key(wf), 3), type=AuditRecord)
        await r.hset(f"{key_prefix(prefix)}:audit:heads", wf, f"4:{fourth.hash}")
        report = await index.verify(wf, trusted=[key.public])
        assert [(p.seq, p.what) for p in report.problems] == [(5, "truncated")]
        assert "checkpoint saw seq 6" in report.problems[0].detail
        untrusted = await index.verify(wf, trusted=[SigningKey().public])
        assert [p.what for p in untrusted.problems] == ["bad_checkpoint"]
    finally:
        await r.aclose()


async def test_each_message_is_judged_at_the_time_the_stream_stored_it(
    audited: tuple[Sender, AuditIndex, aioredis.Redis],
) -> None:
    sender, index, _ = audited
    then = time.time() - 3 * 3600
    key = SigningKey()
    # A token that expired hours ago, but was valid when its messages were stored.
    token = sender.issuer.issue(sub="alice", role="agent", key=key.public, ttl_s=300, now=then)
    alice = Identity(agent_id="alice", role="agent", key=key, token=token)
    subject = sender.subjects.msg("bob")

    def stored(seq: int, at: float) -> StoredMessage:
        _, data = sender.codec.seal(
            alice, subject=subject, body=Note(n=seq), workflow="wf-old", now=at
        )
        return StoredMessage(subject=subject, data=data, seq=seq, stored_at=at + 0.01)

    in_time = [stored(1, then + 10), stored(2, then + 20)]
    late = stored(3, then + 400)  # sent and stored after its token expired
    report = await index.ingest([*in_time, late], verifier=sender.verifier)
    assert (report.stored, report.refused) == (2, 1)
    [refused] = await index.refused()
    assert (refused.seq, refused.reason, refused.claimed_sender) == (
        3,
        "token_expired",
        "alice",
    )
    assert refused.workflow == "wf-old" and refused.stored_at == late.stored_at
    # Stored 70 s after it was signed: a receiver would have refused it as stale.
    held = msgspec.structs.replace(stored(4, then + 30), stored_at=then + 100)
    report = await index.ingest([held], verifier=sender.verifier)
    assert report.refused == 1
    assert [m.reason for m in await index.refused("wf-old")] == ["token_expired", "stale"]
    assert len(await index.records("wf-old")) == 2


async def test_after_a_restart_with_a_new_issuer_the_old_one_counts_only_for_what_came_before(
    audited: tuple[Sender, AuditIndex, aioredis.Redis],
) -> None:
    before, index, _ = audited
    after = Sender(before.subjects.tenant)
    old_key, new_key = before.issuer.public_key, after.issuer.public_key
    assert await index.trust([old_key], now=100.0) == {old_key: 100.0}
    resumed = time.time() + 5  # the messages below are stored around it
    trusted = await index.trust([new_key], now=resumed)
    assert trusted == {old_key: 100.0, new_key: resumed}
    assert await index.trust([new_key], now=resumed + 50) == trusted, "recorded once"
    verifier = StreamVerifier(
        issuers=[new_key], audience=after.issuer.audience, retired=[old_key], since=resumed
    )
    _, left = before.seal("alice", Note(n=1), workflow="wf-resumed")
    left = msgspec.structs.replace(left, stored_at=resumed - 1)  # stored before the resume
    _, late = before.seal("alice", Note(n=2), workflow="wf-resumed")
    late = msgspec.structs.replace(late, seq=50, stored_at=resumed + 1)  # the old one, after
    _, fresh = after.seal("alice", Note(n=3), workflow="wf-resumed")
    fresh = msgspec.structs.replace(fresh, seq=51, stored_at=resumed + 1)
    report = await index.ingest([left, late, fresh], verifier=verifier)
    assert (report.stored, report.refused) == (2, 1)
    [refused] = await index.refused()
    assert (refused.seq, refused.reason) == (50, "token_unknown_issuer")


async def test_a_signed_checkpoint_catches_a_refused_message_deleted_from_the_index(
    audited: tuple[Sender, AuditIndex, aioredis.Redis],
) -> None:
    sender, index, r = audited
    key = SigningKey()
    garbage = [sender.stored(sender.subjects.security, b"\xc1") for _ in range(3)]
    assert (await index.ingest(garbage, verifier=sender.verifier)).refused == 3
    await index.checkpoint(key, signer="auditor")
    await index.forget_refused((await index.refused())[:1])  # retention: not a problem
    assert (await index.verify(trusted=[key.public])).ok
    await r.hdel(f"{index.prefix}:audit:refused", str(garbage[2].seq))
    report = await index.verify(trusted=[key.public])
    assert [(p.what, p.detail) for p in report.problems] == [
        ("removed", "the last checkpoint saw 3 refused messages; 2 are left or were pruned")
    ]
    assert report.refused == 1


async def test_an_event_seen_again_at_another_stream_sequence_is_a_replay_after_a_restart(
    audited: tuple[Sender, AuditIndex, aioredis.Redis],
) -> None:
    sender, index, _ = audited
    [first] = _notes(sender, "wf-r", 1)
    assert (await index.ingest([first], verifier=sender.verifier)).stored == 1

    # A restarted consumer remembers no nonce: the index tells a redelivery (the same
    # stream sequence) from a replay (another one).
    def restarted() -> StreamVerifier:
        return StreamVerifier(issuers=[sender.issuer.public_key], audience=sender.issuer.audience)

    again = msgspec.structs.replace(first, seq=first.seq + 100)
    report = await index.ingest([again], verifier=restarted())
    assert (report.stored, report.duplicates, report.refused) == (0, 0, 1)
    report = await index.ingest([first], verifier=restarted())
    assert (report.stored, report.duplicates, report.refused) == (0, 1, 0)
    [replay] = await index.refused("wf-r")
    assert (replay.seq, replay.reason, replay.claimed_sender) == (again.seq, "replay", "alice")
    assert f"stream sequence {first.seq}" in replay.detail
    assert len(await index.records("wf-r")) == 1 and (await index.verify("wf-r")).ok


async def test_consumer_stores_the_tenants_stream_and_resumes_after_a_restart(
    nats_server: NatsServer, redis_server: RedisServer, prefix: str
) -> None:
    bus, verifier = await _alice(nats_server, redis_server, prefix)
    async with _stream_and_index(nats_server, redis_server, prefix) as (nc, index), bus:
        consumer = AuditConsumer(
            nc, index, tenant=prefix, verifier=verifier, batch=10, ack_wait_s=1.0
        )

        try:
            from govmesh.bus import ensure_event_stream

            await ensure_event_stream(nc, prefix)
            for i in range(5):
                await bus.publish(bus.subjects.msg("bob"), Note(n=i), workflow="wf-js")
            await bus.flush()
            await consumer.start()  # joins late: replays from the start of the stream
            await _until_stored(index, "wf-js", 5)
            await consumer.close()
            await consumer.close()
            for i in range(5, 8):
                await bus.publish(bus.subjects.msg("bob"), Note(n=i), workflow="wf-js")
            await bus.flush()
            key = SigningKey()
            consumer = AuditConsumer(
                nc,
                index,
                tenant=prefix,
                verifier=verifier,
                batch=10,
                checkpoint_key=key,
                checkpoint_every_s=0.05,
            )  # resumes the durable consumer the first one made
            await consumer.start()
            await _until_stored(index, "wf-js", 8)
            deadline = time.monotonic() + 10
            while not consumer.checkpoints and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert consumer.checkpoints >= 1
            records = await index.records("wf-js")
            assert [rec.seq for rec in records] == list(range(1, 9))
            assert {rec.sender for rec in records} == {"alice"}
            report = await index.verify("wf-js", trusted=[key.public])
            assert report.ok and report.checkpoint_ts > 0
        finally:
            await consumer.close()


async def test_consumer_keeps_storing_after_a_pull_ends_in_asyncios_timeout(
    nats_server: NatsServer, redis_server: RedisServer, prefix: str
) -> None:
    bus, verifier = await _alice(nats_server, redis_server, prefix)
    async with _stream_and_index(nats_server, redis_server, prefix) as (nc, index), bus:
        consumer = AuditConsumer(nc, index, tenant=prefix, verifier=verifier, batch=10)
        try:
            await consumer.start()
            assert consumer._sub is not None
            fetch, timeouts = consumer._sub.fetch, 0

            async def late(*args, **kwargs):
                # nats-py raises asyncio's TimeoutError, not its own, when the deadline passes
                # between its two pulls.
                nonlocal timeouts
                if timeouts < 3:
                    timeouts += 1
                    raise TimeoutError
                return await fetch(*args, **kwargs)

            consumer._sub.fetch = late  # type: ignore[method-assign]
            for i in range(4):
                await bus.publish(bus.subjects.msg("bob"), Note(n=i), workflow="wf-late")
            await bus.flush()
            await _until_stored(index, "wf-late", 4)
            assert timeouts == 3
            assert [rec.seq for rec in await index.records("wf-late")] == [1, 2, 3, 4]
        finally:
            await consumer.close()


async def test_consumer_closes_when_a_pull_swallows_its_cancellation(
    nats_server: NatsServer, redis_server: RedisServer, prefix: str
) -> None:
    async with _stream_and_index(nats_server, redis_server, prefix) as (nc, index):
        verifier = StreamVerifier(issuers=[SigningKey().public.raw], audience="govmesh:none")
        consumer = AuditConsumer(nc, index, tenant=prefix, verifier=verifier, batch=10)
        try:
            await consumer.start()
            assert consumer._sub is not None
            fetch, pulling = consumer._sub.fetch, asyncio.Event()

            async def swallowing(*args, **kwargs):
                # The first pull waits until close() cancels the loop, then ends as an empty
                # pull does: how a cancellation landing inside `asyncio.wait_for` (which nats-py
                # and redis-py use) can vanish on Python 3.11.
                if not pulling.is_set():
                    pulling.set()
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.Event().wait()
                    raise TimeoutError
                return await fetch(*args, **kwargs)

            consumer._sub.fetch = swallowing  # type: ignore[method-assign]
            await asyncio.wait_for(pulling.wait(), 30)
        finally:
            await asyncio.wait_for(consumer.close(), 30)


async def test_bench_audit_fills_the_index_and_reports_against_its_baseline() -> None:
    from govmesh.bench._audit import run_audit_bench

    report = await run_audit_bench(events=400, workflows=20, samples=10)
    assert report["events_per_workflow"] == 20
    assert report["ingest_events_per_s"] > 0
    for key in ("show_ms", "lrange_ms", "verify_ms"):
        assert 0 < report[key]["p50"] <= report[key]["p99"]
    assert set(report["met"]) == set(report["targets"])


@pytest.mark.parametrize("keep", [False, True])
async def test_a_model_call_is_audited_with_the_hash_of_its_answer_and_the_text_only_if_kept(
    secure_nats, redis_server, prefix, keep: bool
) -> None:
    import hashlib

    from govmesh.agents._base import AgentService
    from govmesh.bus import Delivery
    from govmesh.llm import SimulatedModel, SimulatedModelSettings

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    agent = AgentService(
        dep,
        issuer.identity("thinker-1", "agent"),
        model=SimulatedModel(SimulatedModelSettings(name="sim"), seed=3),
        keep_thoughts=keep,
    )
    listener = await Bus.connect(dep, issuer.identity("budget-1", "budget"))
    seen: asyncio.Queue[tuple[bytes, Usage]] = asyncio.Queue()

    async def on_usage(d: Delivery) -> None:
        await seen.put((d.envelope.body, d.body))

    await agent.start()
    try:
        await listener.subscribe(listener.subjects.all("usage"), on_usage, accepts=Usage)
        await listener.flush()
        answer = await agent.think("wf-think", "which vendor?", key="plan")
        body, usage = await asyncio.wait_for(seen.get(), 10)
    finally:
        await listener.close()
        await agent.close()
    digest = hashlib.sha256(answer.text.encode()).hexdigest()
    assert answer.text and usage.thought_sha256 == digest
    assert usage.thought == (answer.text if keep else "")
    summary = summarize_body("Usage", bytes(body))
    assert summary["thought_sha256"] == digest
    assert answer.text not in str(summary)


def test_a_large_batch_checked_on_threads_gets_the_verdicts_of_one_by_one_checks() -> None:
    sender = Sender("acme")
    good = _notes(sender, "wf-batch", 150)
    stranger = Issuer(name="test:other", audience="govmesh:acme").identity("mallory", "agent")
    subject = sender.subjects.msg("alice")
    _, forged = sender.codec.seal(stranger, subject=subject, body=Note(n=-1), workflow="wf-batch")
    # Replays in both halves of the batch, of messages in the other half, and garbage.
    batch = [
        *good[:75],
        sender.stored(good[100].subject, good[100].data),
        sender.stored(subject, forged),
        sender.stored(subject, b"not a sealed message"),
        *good[75:],
        sender.stored(good[3].subject, good[3].data),
    ]
    serial = Sender("acme")
    serial.issuer = sender.issuer
    serial.verifier = StreamVerifier(issuers=[sender.issuer.public_key], audience="govmesh:acme")
    one_by_one = [serial.verifier.check(m) for m in batch]
    on_threads = sender.verifier.check_many(batch)

    def outcome(verdict: object) -> str:
        return verdict.reason if isinstance(verdict, RefusedMessage) else "ok"

    assert [outcome(v) for v in on_threads] == [outcome(v) for v in one_by_one]
    refused = [outcome(v) for v in on_threads if outcome(v) != "ok"]
    assert sorted(refused) == ["malformed", "replay", "replay", "token_unknown_issuer"], refused
    assert sum(outcome(v) == "ok" for v in on_threads) == 150
