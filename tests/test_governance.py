"""The governance actor on the signed bus: policy files reloaded while it runs, and every
decision records the policy hash that was in force."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from govmesh.bus import Bus, Delivery
from govmesh.governance._actor import GovernanceService
from govmesh.governance._decider import MAX_ATTEMPTS
from govmesh.governance.messages import Decision, ToolIntent

from _deploy import ERP_TERMS, Coordinator, deployment
from _governed import AUTHORITY, ROLE, SEED, Governed, two_governance_actors
from procurement.tools import create_purchase_order

ERP_CREATE_PO = create_purchase_order.name

ROOT = Path(__file__).parent.parent
ARGS = {"item": "monitors", "vendor": "Vendor_A", "amount_usd": 3000.0}


@pytest.fixture
async def running(tmp_path, secure_nats, redis_server, prefix):
    async for parts in _running(tmp_path, secure_nats, redis_server, prefix):
        yield parts[:3]


@pytest.fixture
async def running_with_redis(tmp_path, secure_nats, redis_server, prefix):
    async for parts in _running(tmp_path, secure_nats, redis_server, prefix):
        yield parts[:5]


@pytest.fixture
async def governed(tmp_path, secure_nats, redis_server, prefix):
    """As `running_with_redis`, and the queue every decision arrives on."""
    async for parts in _running(tmp_path, secure_nats, redis_server, prefix):
        yield parts


@pytest.fixture
async def untermed(tmp_path, secure_nats, redis_server, prefix):
    """As `governed`, with governance told no tool's terms."""
    async for parts in _running(tmp_path, secure_nats, redis_server, prefix, tools=()):
        yield parts


async def _running(tmp_path, secure_nats, redis_server, prefix, *, tools=(ERP_TERMS,)):
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    policy = tmp_path / "policy.yaml"
    policy.write_text(SEED)
    governance = GovernanceService(
        dep,
        issuer.identity("governance-1", "governance"),
        policy_paths=[str(policy)],
        reload_interval_s=0.05,
        tools=tools,
    )
    await governance.start()
    agent = await Bus.connect(
        dep, issuer.identity("proc-1", ROLE, capabilities=(ERP_CREATE_PO,), budget_usd=AUTHORITY)
    )
    coordinator = await Coordinator.connect(dep, issuer, ("proc-1",))
    decisions: asyncio.Queue[Decision] = asyncio.Queue()

    async def on_decision(d: Delivery) -> None:
        await decisions.put(d.body)

    await agent.subscribe(
        agent.subjects.decisions(agent.identity.agent_id), on_decision, accepts=Decision
    )
    await agent.flush()

    async def decide(workflow: str, amount: float = ARGS["amount_usd"], **args: object) -> Decision:
        await coordinator.start(workflow)
        await agent.publish(
            agent.subjects.intent("proc-1"),
            ToolIntent(tool=ERP_CREATE_PO, args={**ARGS, "amount_usd": amount, **args}, step=1),
            workflow=workflow,
        )
        return await asyncio.wait_for(decisions.get(), 10)

    yield policy, governance, decide, governance.redis, dep.key_prefix, decisions
    await coordinator.close()
    await agent.close()
    await governance.close()


async def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_an_edited_policy_file_takes_effect_without_a_restart(running) -> None:
    policy, governance, decide = running
    first = await decide("wf-1")
    assert first.outcome == "allow"
    assert first.policy_hash == governance.policies.hash

    policy.write_text(
        SEED.replace("require_approval_if_over: 5000", "require_approval_if_over: 1000")
    )
    await _wait_for(lambda: governance.reloads == 1)
    second = await decide("wf-2")

    assert second.outcome == "escalate"
    assert second.policy_hash == governance.policies.hash != first.policy_hash


GENERAL = SEED.replace(
    "  escalation: human_review\n",
    "  escalation: human_review\n"
    "  escalate_if:\n"
    "    - {arg: item, matches: '(?i)server', reason: servers need IT's approval}\n"
    "  deny_if:\n"
    "    - {arg: quantity, over: 100}\n",
)


async def test_rules_on_arguments_decide_on_the_bus_and_replay_from_the_record_alone(
    governed,
) -> None:
    from govmesh.governance._replay import DecisionRecord, decisions_key, replay

    policy, governance, decide, redis, key_prefix, _ = governed
    policy.write_text(GENERAL)
    await _wait_for(lambda: governance.reloads == 1)

    plain = await decide("wf-1")
    server = await decide("wf-2", item="Rack SERVERS")
    bulk = await decide("wf-3", quantity=500)

    assert (plain.outcome, server.outcome, bulk.outcome) == ("allow", "escalate", "deny")
    assert server.reasons == (
        "servers need IT's approval: item 'Rack SERVERS' matches '(?i)server'",
    )
    assert bulk.reasons == ("deny_if: quantity 500 is over 100",)
    # The approval shows what the tool declares to show, not every argument.
    (request,) = await governance.approvals.pending()
    assert request.shown == {"vendor": "Vendor_A", "amount_usd": 3000.0}
    assert request.args["item"] == "Rack SERVERS"
    # Each record names the spend arguments it was decided on: replay needs no tool's terms.
    rows = await redis.xrange(decisions_key(key_prefix))
    records = [msgspec.msgpack.decode(f[b"record"], type=DecisionRecord) for _, f in rows]
    assert {r.context.spend_args for r in records} == {("amount_usd",)}
    report = await replay(redis, prefix=key_prefix)
    assert (report.decisions, report.matched, report.mismatches) == (3, 3, [])


async def test_a_tool_that_declares_no_spend_spends_nothing(untermed) -> None:
    from govmesh.governance._replay import DecisionRecord, decisions_key, replay

    _, governance, decide, redis, key_prefix, _ = untermed

    # Over the seed's spending limit, were amount_usd spend: its tool does not say so.
    decision = await decide("wf-1", amount=20_000.0)

    assert decision.outcome == "allow"
    assert decision.obligations == ()
    assert await redis.hget(governance.key("spend"), "wf-1") is None
    ((_, fields),) = await redis.xrange(decisions_key(key_prefix))
    record = msgspec.msgpack.decode(fields[b"record"], type=DecisionRecord)
    assert record.context.spend_args == ()
    assert (await replay(redis, prefix=key_prefix)).matched == 1


async def test_a_broken_edit_keeps_the_policy_in_force(running) -> None:
    policy, governance, decide = running
    before = governance.policies.hash
    policy.write_text(SEED.replace("    - Vendor_A", "    \u2013 Vendor_A"))  # en dash bullet
    await _wait_for(lambda: governance.reload_errors == 1)

    decision = await decide("wf-3")
    assert governance.reloads == 0
    assert decision.outcome == "allow"
    assert decision.policy_hash == before


async def test_every_recorded_decision_replays_the_same_across_policy_versions(
    running_with_redis,
) -> None:
    from govmesh.governance._replay import replay

    policy, governance, decide, redis, key_prefix = running_with_redis
    outcomes = [(await decide(f"wf-a{i}")).outcome for i in range(3)]
    policy.write_text(
        SEED.replace("require_approval_if_over: 5000", "require_approval_if_over: 1000")
    )
    await _wait_for(lambda: governance.reloads == 1)
    outcomes += [(await decide(f"wf-b{i}")).outcome for i in range(3)]
    assert outcomes == ["allow"] * 3 + ["escalate"] * 3

    report = await replay(redis, prefix=key_prefix, batch=2)  # several batches

    assert (report.decisions, report.matched, report.policy_versions) == (6, 6, 2)
    assert report.mismatches == []


async def test_replay_reports_a_record_that_does_not_decide_the_same(running_with_redis) -> None:
    import msgspec

    from govmesh.governance._replay import DecisionRecord, decisions_key, replay

    _, _, decide, redis, key_prefix = running_with_redis
    await decide("wf-c1")
    ((_, fields),) = await redis.xrange(decisions_key(key_prefix))
    genuine = msgspec.msgpack.decode(fields[b"record"], type=DecisionRecord)
    forged = msgspec.structs.replace(genuine, intent_id="forged", outcome="escalate")
    unknown = msgspec.structs.replace(genuine, intent_id="orphan", policy_hash="0" * 64)
    for record in (forged, unknown):
        await redis.xadd(decisions_key(key_prefix), {"record": msgspec.msgpack.encode(record)})

    report = await replay(redis, prefix=key_prefix)

    assert (report.decisions, report.matched) == (3, 1)
    assert {m["intent_id"]: m["difference"].split(":")[0] for m in report.mismatches} == {
        "forged": "now allow",
        "orphan": "policy version not recorded",
    }


async def test_a_decision_given_up_under_contention_is_a_recorded_deny_that_replays(
    running_with_redis,
) -> None:
    import msgspec

    from govmesh.governance._replay import (
        CONTENDED_REASON,
        DecisionRecord,
        decisions_key,
        replay,
    )

    _, governance, decide, redis, key_prefix = running_with_redis

    decider = governance.decider
    real_send = decider._script.send

    async def spend_always_moved(*, keys, args):
        # Another decision commits to the workflow before every attempt, as under endless
        # contention, so every compare-and-commit finds its figures changed.
        await redis.hincrbyfloat(f"{key_prefix}:spend", "wf-contended", 1.0)
        return await real_send(keys=keys, args=args)

    decider._script.send = spend_always_moved
    try:
        decision = await decide("wf-contended")
    finally:
        del decider._script.send

    assert decision.outcome == "deny" and decision.reasons == (CONTENDED_REASON,)
    ((_, fields),) = await redis.xrange(decisions_key(key_prefix))
    record = msgspec.msgpack.decode(fields[b"record"], type=DecisionRecord)
    assert record.contended and record.outcome == "deny"
    assert decider.attempts == MAX_ATTEMPTS + 1
    assert float(await redis.hget(f"{key_prefix}:spend", "wf-contended")) == MAX_ATTEMPTS + 1
    allowed = msgspec.structs.replace(record, intent_id="claims-contention", outcome="allow")
    await redis.xadd(decisions_key(key_prefix), {"record": msgspec.msgpack.encode(allowed)})

    report = await replay(redis, prefix=key_prefix)

    assert (report.decisions, report.matched, report.contended) == (2, 1, 1)
    assert [m["intent_id"] for m in report.mismatches] == ["claims-contention"]


LIMITS = """\
policy:
  agent: Procurement-Agent-v2
  spending_limit_usd: 10000
  allowed_vendors: [Vendor_A, Vendor_B]
  daily_limit_usd: 5000
  rate_limit: {calls: 3, per_seconds: 60}
"""


async def test_rate_and_daily_limits_are_enforced_from_recorded_calls_and_spend(
    running,
) -> None:
    policy, governance, decide = running
    policy.write_text(LIMITS)
    await _wait_for(lambda: governance.reloads == 1)

    first = await decide("wf-d1")  # 3000 of the day's 5000
    second = await decide("wf-d2")  # another 3000: over the day, though a new workflow
    third = await decide("wf-d3")  # still over the day
    fourth = await decide("wf-d4")  # the fourth call inside the 60 s window

    assert first.outcome == "allow"
    assert second.outcome == "deny" and any("daily" in r for r in second.reasons)
    assert third.outcome == "deny"
    assert fourth.outcome == "deny" and any("rate" in r for r in fourth.reasons)


async def test_audit_replay_command_exits_1_only_when_a_decision_differs(
    running_with_redis, redis_server, prefix, tmp_path
) -> None:
    import json
    import subprocess
    import sys

    import msgspec

    from govmesh.governance._replay import DecisionRecord, decisions_key

    _, _, decide, redis, key_prefix = running_with_redis
    await decide("wf-e1")
    await decide("wf-e2")
    command = [
        sys.executable,
        "-m",
        "govmesh.cli",
        "audit",
        "replay",
        "--tenant",
        prefix,
        "--redis-url",
        redis_server.url,
        "--json",
        str(tmp_path / "replay.json"),
    ]

    clean = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stderr
    report = json.loads((tmp_path / "replay.json").read_text())
    assert (report["decisions"], report["matched"], report["mismatches"]) == (2, 2, [])

    (_, fields), *_ = await redis.xrange(decisions_key(key_prefix))
    genuine = msgspec.msgpack.decode(fields[b"record"], type=DecisionRecord)
    changed = msgspec.structs.replace(genuine, intent_id="edited", reasons=("edited",))
    await redis.xadd(decisions_key(key_prefix), {"record": msgspec.msgpack.encode(changed)})
    dirty = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dirty.returncode == 1
    assert "edited" in dirty.stderr


async def test_concurrent_split_purchases_cannot_pass_the_limit_together(
    two_actors: Governed,
) -> None:
    rounds = 5
    decisions, actors = two_actors.decisions, two_actors.actors
    for r in range(rounds):
        # Three 4,000 purchases at once in one workflow against the 10,000 limit.
        for step in (1, 2, 3):
            await _intent(two_actors, f"wf-split-{r}", 4000.0, step=step)
    got = [await asyncio.wait_for(decisions.get(), 10) for _ in range(3 * rounds)]
    allowed = sum(a.decided["allow"] for a in actors)
    by_workflow: dict[str, list[str]] = {}
    for decision in got:
        by_workflow.setdefault(decision.workflow, []).append(decision.outcome)
    assert len(by_workflow) == rounds
    for outcomes in by_workflow.values():
        assert sorted(outcomes) == ["allow", "allow", "deny"], by_workflow
    assert allowed == 2 * rounds


async def test_concurrent_purchases_across_workflows_cannot_pass_the_daily_limit(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    limits = LIMITS.replace("daily_limit_usd: 5000", "daily_limit_usd: 10000")
    async with two_governance_actors(
        tmp_path, secure_nats, redis_server, prefix, limits.replace("calls: 3", "calls: 100")
    ) as g:
        for n in range(8):  # 8 x 3,000 at once, each in its own workflow, 10,000 a day
            await _intent(g, f"wf-day-{n}", 3000.0)
        got = [await asyncio.wait_for(g.decisions.get(), 10) for _ in range(8)]
    assert sorted(d.outcome for d in got) == ["allow"] * 3 + ["deny"] * 5
    assert all(any("daily" in r for r in d.reasons) for d in got if d.outcome == "deny")


async def _intent(g: Governed, workflow: str, amount: float, *, step: int = 1) -> None:
    await g.coordinator.start(workflow)
    agent = g.agent
    await agent.publish(
        agent.subjects.intent("proc-1"),
        ToolIntent(
            tool=ERP_CREATE_PO,
            step=step,
            args={"item": "desks", "vendor": "Vendor_A", "amount_usd": amount},
        ),
        workflow=workflow,
    )


@pytest.fixture
async def two_actors(tmp_path, secure_nats, redis_server, prefix) -> AsyncIterator[Governed]:
    """`two_governance_actors` on the seed policy."""
    async with two_governance_actors(tmp_path, secure_nats, redis_server, prefix, SEED) as g:
        yield g


async def test_an_escalation_is_sent_before_its_approval_request_is_announced(
    two_actors: Governed,
) -> None:
    # The agent waits for the decision, not for the announcement: the decision goes on the
    # wire first.
    decisions, actors = two_actors.decisions, two_actors.actors
    await two_actors.coordinator.start("wf-order")  # its answer is published too
    published: list[str] = []
    for actor in actors:
        publish = actor.bus.nc.publish

        async def recorded(subject, *args, _publish=publish, **kwargs):
            published.append(subject.split(".")[2])  # gm.<tenant>.<area>...
            return await _publish(subject, *args, **kwargs)

        actor.bus.nc.publish = recorded
    await _intent(two_actors, "wf-order", 7000.0)  # over 5,000: escalates
    escalated = await asyncio.wait_for(decisions.get(), 10)
    deadline = time.monotonic() + 10
    while len(published) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert escalated.outcome == "escalate"
    assert published == ["decision", "approval"]


async def test_an_approval_cannot_spend_what_the_workflow_no_longer_has(
    two_actors: Governed,
) -> None:
    from govmesh.governance.messages import ApprovalAnswer

    decisions, operator = two_actors.decisions, two_actors.operator
    await _intent(two_actors, "wf-appr", 7000.0, step=1)  # over 5,000: escalates
    escalated = await asyncio.wait_for(decisions.get(), 10)
    await _intent(two_actors, "wf-appr", 4000.0, step=2)  # allowed: 4,000 of 10,000 spent
    allowed = await asyncio.wait_for(decisions.get(), 10)
    await operator.publish(
        operator.subjects.approval("wf-appr"),
        ApprovalAnswer(approval_id=escalated.approval_id, approved=True, by="dana"),
        workflow="wf-appr",
    )
    final = await asyncio.wait_for(decisions.get(), 10)
    assert (escalated.outcome, allowed.outcome) == ("escalate", "allow")
    assert final.approval_id == escalated.approval_id
    assert final.outcome == "deny"
    assert any("spending_limit" in r or "limit" in r for r in final.reasons), final.reasons


async def test_every_outcome_is_decided_and_recorded_in_one_round_trip(
    two_actors: Governed, redis_server, prefix
) -> None:
    import redis.asyncio as aioredis

    from govmesh.governance._replay import decisions_key

    decisions, actors = two_actors.decisions, two_actors.actors
    await _intent(two_actors, "wf-warm", 100.0)  # loads the scripts into the server
    await asyncio.wait_for(decisions.get(), 10)
    amounts = {"wf-rt-allow": 4000.0, "wf-rt-deny": 12000.0, "wf-rt-escalate": 7000.0}
    await two_actors.coordinator.start(*amounts)  # recorded before, as a run starts them
    watcher = aioredis.Redis.from_url(redis_server.admin_url, decode_responses=True)
    try:
        async with watcher.monitor() as monitor:
            for workflow, amount in amounts.items():
                await _intent(two_actors, workflow, amount)
            got = [await asyncio.wait_for(decisions.get(), 10) for _ in amounts]
            # Every command of these decisions ran before its decision was published.
            await watcher.get(f"{prefix}:sentinel")
            seen = []
            while not (seen and seen[-1]["command"] == f"GET {prefix}:sentinel"):
                seen.append(await asyncio.wait_for(monitor.next_command(), 10))
        records = await watcher.xlen(decisions_key(actors[0].deployment.key_prefix))
    finally:
        await watcher.aclose()
    assert sorted(d.outcome for d in got) == ["allow", "deny", "escalate"]
    sent = [c["command"].split() for c in seen if c["client_type"] != "lua"]
    for workflow in amounts:
        # One round trip checks the figures the decision assumed and writes it.
        assert [c[0] for c in sent if workflow in c] == ["EVALSHA"], workflow
    assert not {"MULTI", "XADD", "HSET", "SET"} & {c[0] for c in sent}, sent
    scripted = [c["command"].split() for c in seen if c["client_type"] == "lua"]
    in_scripts = [c[0] for c in scripted]
    assert in_scripts.count("XADD") == 3
    assert in_scripts.count("HINCRBYFLOAT") == 2  # the allowed amount, per workflow and day
    assert in_scripts.count("HSET") == 1  # the escalation's pending approval request
    # Each intent's nonce and its first decision; an actor that has not recorded the policy
    # version yet also stores its texts, so other SETs may come and are not counted here.
    set_keys = [c[1] for c in scripted if c[0] == "SET"]
    assert sum(":nonce:" in k for k in set_keys) == 3, set_keys
    assert sum(":intent:" in k for k in set_keys) == 3, set_keys
    assert records == 1 + 3  # the warm-up's and these three, each once


async def test_a_decision_on_changed_figures_is_recorded_once_as_decided_again(
    running_with_redis,
) -> None:
    import msgspec

    from govmesh.governance._replay import DecisionRecord, decisions_key, replay

    policy, governance, decide, redis, key_prefix = running_with_redis
    policy.write_text(LIMITS)  # also counts calls: the second read must not count its own
    await _wait_for(lambda: governance.reloads == 1)
    decider = governance.decider
    real_send = decider._script.send
    reads = 0

    async def raced(*, keys, args):
        nonlocal reads
        reads += 1
        if reads == 1:
            # Another decision commits 8,000 to the workflow after this one was decided on
            # the figures governance knew.
            await redis.hincrbyfloat(f"{key_prefix}:spend", "wf-race", 8000.0)
        return await real_send(keys=keys, args=args)

    decider._script.send = raced
    try:
        decision = await decide("wf-race")  # 3,000: allowed on the first figures, not the true
    finally:
        del decider._script.send

    rows = await redis.xrange(decisions_key(key_prefix))
    records = [msgspec.msgpack.decode(f[b"record"], type=DecisionRecord) for _, f in rows]
    assert reads == 2
    assert decision.outcome == "deny"
    assert [(r.outcome, r.context.workflow_spend_usd) for r in records] == [("deny", 8000.0)]
    assert records[0].context.recent_calls == 0
    assert records[0].intent_id == decision.intent_id
    assert float(await redis.hget(f"{key_prefix}:spend", "wf-race")) == 8000.0
    report = await replay(redis, prefix=key_prefix)
    assert (report.decisions, report.matched) == (1, 1)


async def test_a_decision_is_sealed_while_its_round_trip_is_in_the_air(
    running_with_redis,
) -> None:
    from govmesh.governance._decider import FirstDecision, Fresh
    from govmesh.governance._evaluator import Intent

    _, governance, _, _, _ = running_with_redis
    decider = governance.decider
    real_send = decider._script.send
    events: list[str] = []

    def send(*, keys, args):
        sending = real_send(keys=keys, args=args)  # written before this returns
        events.append("sent")

        async def replied():
            reply = await sending
            events.append("replied")
            return reply

        return replied()

    def seal(verdict, request):
        events.append(f"sealed {verdict.outcome}")
        return ("signed", verdict.outcome)

    intent = Intent(
        agent="proc-1", role=ROLE, tool=ERP_CREATE_PO, args=ARGS, workflow="wf-seal", step=1
    )
    decider._script.send = send
    try:
        decided = [
            await decider.decide(
                intent,
                0,
                time.time(),
                call_id=f"intent-{n}",
                commit=("allow",),
                first_key=governance.key("intent", "wf-seal"),
                seal=seal,
            )
            for n in range(2)
        ]
    finally:
        del decider._script.send

    assert decided[0] == Fresh(decided[0].verdict, None, ("signed", "allow"))
    # Asked again, the first decision stands: what was sealed for the second is not used.
    assert isinstance(decided[1], FirstDecision) and decided[1].intent_id == "intent-0"
    assert events == ["sent", "sealed allow", "replied"] * 2


async def test_an_intent_asked_again_gets_its_first_decision_and_commits_nothing_more(
    running_with_redis,
) -> None:
    from govmesh.governance._replay import decisions_key

    policy, governance, decide, redis, key_prefix = running_with_redis
    first = await decide("wf-again")
    # The policy changes before the agent (resuming after a crash, say) asks again.
    policy.write_text(SEED.replace("    - Vendor_A\n", ""))
    await _wait_for(lambda: governance.reloads == 1)
    again = await decide("wf-again")

    assert first.outcome == again.outcome == "allow"
    assert again.intent_hash == first.intent_hash and again.intent_id != first.intent_id
    assert again.policy_hash == first.policy_hash != governance.policies.hash
    assert again.expires_at > first.expires_at  # signed afresh for the gateway
    assert float(await redis.hget(governance.key("spend"), "wf-again")) == ARGS["amount_usd"]
    assert await redis.xlen(decisions_key(key_prefix)) == 1
    assert governance.decided == {"allow": 1, "repeated": 1}
    # Another step of the same workflow is a new intent, decided under the policy now.
    assert (await decide("wf-other")).outcome == "deny"


async def test_an_escalated_intent_asked_again_gets_the_approvals_settlement(governed) -> None:
    from govmesh.governance._approvals import Answer

    _, governance, decide, redis, _, decisions = governed
    escalated = await decide("wf-esc", 7_000.0)
    assert escalated.outcome == "escalate" and not escalated.final

    pending = await decide("wf-esc", 7_000.0)
    assert (pending.outcome, pending.final) == ("escalate", False)
    assert pending.approval_id == escalated.approval_id
    assert await redis.hget(governance.key("spend"), "wf-esc") is None

    settled = await governance._settle(escalated.approval_id, Answer(approved=True, by="alice"))
    assert settled is not None and settled.outcome == "allow"
    announced = await asyncio.wait_for(decisions.get(), 10)
    assert announced.intent_id == escalated.intent_id and announced.outcome == "allow"
    final = await decide("wf-esc", 7_000.0)
    assert (final.outcome, final.final, final.approved_by) == ("allow", True, "alice")
    assert final.approval_id == escalated.approval_id
    assert float(await redis.hget(governance.key("spend"), "wf-esc")) == 7_000.0


async def test_a_pending_approval_is_decided_again_when_the_policy_changes(governed) -> None:
    policy, governance, decide, _, _, decisions = governed
    asked = {
        wf: await decide(wf, amount)
        for wf, amount in (("wf-lift", 7_000.0), ("wf-veto", 9_000.0), ("wf-keep", 8_200.0))
    }
    assert {d.outcome for d in asked.values()} == {"escalate"}

    # Approval above 8,000 now, and a cap of 8,500: the first is allowed outright, the
    # second denied outright, the third still waits for a person.
    policy.write_text(
        SEED.replace("require_approval_if_over: 5000", "require_approval_if_over: 8000").replace(
            "spending_limit_usd: 10000", "spending_limit_usd: 8500"
        )
    )
    final = {}
    while len(final) < 2:
        d = await asyncio.wait_for(decisions.get(), 10)
        final[d.workflow] = d
    assert final["wf-lift"].outcome == "allow" and final["wf-veto"].outcome == "deny"
    assert "approved by policy" in final["wf-lift"].reasons
    assert "rejected by policy" in final["wf-veto"].reasons
    assert any(
        r.startswith(f"policy changed to {governance.policies.hash[:12]}")
        for r in final["wf-veto"].reasons
    )
    assert [r.approval_id for r in await governance.approvals.pending()] == [
        asked["wf-keep"].approval_id
    ]
    lifted = await governance.approvals.done(asked["wf-lift"].approval_id)
    assert lifted is not None and lifted.answer.by == "policy" and lifted.outcome == "allow"


async def test_intents_arriving_together_are_decided_in_groups_and_recorded_once_each(
    two_actors: Governed,
) -> None:
    import msgspec

    from govmesh.governance._replay import DecisionRecord, decisions_key, replay

    decisions, actors = two_actors.decisions, two_actors.actors
    # Two purchases per workflow: 3,000 then 4,000 against the seed's 5,000 escalation
    # threshold per purchase and 10,000 per workflow; workflows 0-9 also buy 4,000 more,
    # which the workflow limit must deny.
    for n in range(60):
        await _intent(two_actors, f"wf-g{n}", 3000.0)
    for n in range(60):
        await _intent(two_actors, f"wf-g{n}", 4000.0, step=2)
    for n in range(10):
        await _intent(two_actors, f"wf-g{n}", 4000.0, step=3)
    got = [await asyncio.wait_for(decisions.get(), 10) for _ in range(130)]
    redis = actors[0].redis
    rows = await redis.xrange(decisions_key(actors[0].deployment.key_prefix))
    spend = {
        k.decode(): float(v)
        for k, v in (await redis.hgetall(f"{actors[0].deployment.key_prefix}:spend")).items()
    }
    report = await replay(redis, prefix=actors[0].deployment.key_prefix)
    round_trips = sum(a.decider.round_trips for a in actors)
    records = [msgspec.msgpack.decode(f[b"record"], type=DecisionRecord) for _, f in rows]
    # Whichever purchase of workflows 0-9 comes last, in whatever order they are decided,
    # the workflow limit denies exactly one.
    assert sorted(d.outcome for d in got) == ["allow"] * 120 + ["deny"] * 10
    assert len(records) == 130 == len({r.intent_id for r in records})
    allowed: dict[str, float] = {}
    for r in records:
        if r.outcome == "allow":
            workflow = r.intent.workflow
            allowed[workflow] = allowed.get(workflow, 0.0) + r.intent.args["amount_usd"]
    assert spend == allowed
    assert all(amount <= 10_000 for amount in spend.values())
    assert (report.decisions, report.matched) == (130, 130)
    # The seed limits workflow spend only: the other figures are neither read nor recorded.
    # (The agent's spend today is read for its budget authority.)
    assert {r.unused for r in records} == {("recent_calls",)}
    assert round_trips < 130


async def test_an_approval_settled_again_after_a_takeover_commits_once_and_answers_the_same(
    running_with_redis,
) -> None:
    _, governance, decide, redis, key_prefix = running_with_redis
    escalated = await decide("wf-taken-over", 7000.0)  # over 5,000: escalates
    assert escalated.outcome == "escalate"
    [request] = await governance.approvals.pending()

    # An actor settles the approval, commits the spend and publishes its allow, then dies
    # before marking it settled; another takes the settlement over and decides again.
    first = await governance._within_limits(request)
    again = await governance._within_limits(request)

    assert first == again == (True, ())
    assert float(await redis.hget(f"{key_prefix}:spend", "wf-taken-over")) == 7000.0


async def test_an_approval_cannot_spend_what_the_agents_budget_authority_no_longer_has(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    from govmesh.governance.messages import ApprovalAnswer

    async with two_governance_actors(
        tmp_path, secure_nats, redis_server, prefix, SEED, budget_usd=10_000
    ) as g:
        await _intent(g, "wf-auth-a", 7000.0)  # over 5,000: escalates, commits nothing yet
        escalated = await asyncio.wait_for(g.decisions.get(), 10)
        await _intent(g, "wf-auth-b", 4000.0)  # allowed: 4,000 of the day's 10,000
        allowed = await asyncio.wait_for(g.decisions.get(), 10)
        await g.operator.publish(
            g.operator.subjects.approval("wf-auth-a"),
            ApprovalAnswer(approval_id=escalated.approval_id, approved=True, by="dana"),
            workflow="wf-auth-a",
        )
        final = await asyncio.wait_for(g.decisions.get(), 10)
    assert (escalated.outcome, allowed.outcome) == ("escalate", "allow")
    assert final.approval_id == escalated.approval_id and final.outcome == "deny"
    assert any("budget authority" in r for r in final.reasons), final.reasons
