"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from test_governance import ROLE, SEED, Governed, _two_governance_actors

from govmesh.bus import Bus, Delivery, SecurityEvent
from govmesh.config import utc_day
from govmesh.governance._replay import ReplayReport, decisions_key, replay
from govmesh.governance.messages import StartRecord, ToolIntent
from govmesh.tools import ERP_CREATE_PO

# ---------------------------------------------------------------------------------------
# 1. The audit index verifies every message of the stream as a live receiver does.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 2. Monitoring survives a malformed message in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 3. The Redis-protocol server needs credentials.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 4. Publishes refused by nats-server become security events.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 5. A decision is readable only by the agent it answers.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 6. Intents are decided only for workflows the deployment started; budget authority is
#    cumulative.
# ---------------------------------------------------------------------------------------


PURCHASE = {"item": "desks", "vendor": "Vendor_A", "amount_usd": 4000.0}
"""Under the seed policy's approval threshold (5,000) and workflow limit (10,000)."""


@contextlib.asynccontextmanager
async def _governed(
    tmp_path, secure_nats, redis_server, prefix, *, budget_usd: float = 50_000
) -> AsyncIterator[tuple[Governed, asyncio.Queue[SecurityEvent]]]:
    """Two real governance actors in one queue group on the seed policy, an agent
    ``proc-1`` whose token carries ``budget_usd``, and the tenant's security events."""
    async with _two_governance_actors(
        tmp_path, secure_nats, redis_server, prefix, SEED, budget_usd=budget_usd
    ) as g:
        events: asyncio.Queue[SecurityEvent] = asyncio.Queue()

        async def on_event(d: Delivery) -> None:
            await events.put(d.body)

        watcher = await Bus.connect(g.dep, g.issuer.identity("watcher-1", "auditor"))
        try:
            await watcher.subscribe(watcher.subjects.security, on_event, accepts=SecurityEvent)
            await watcher.flush()
            yield g, events
        finally:
            await watcher.close()


async def _purchase(agent: Bus, workflow: str, *, step: int = 1) -> None:
    """The agent asks for a 4,000 purchase in ``workflow``, started or not."""
    await agent.publish(
        agent.subjects.intent(agent.identity.agent_id),
        ToolIntent(tool=ERP_CREATE_PO, args=PURCHASE, step=step),
        workflow=workflow,
    )


async def _replayed_the_same(g: Governed) -> ReplayReport:
    report = await replay(g.actors[0].redis, prefix=g.dep.key_prefix)
    assert report.mismatches == [] and report.matched == report.decisions, report
    return report


async def test_intents_for_made_up_workflows_are_refused_and_reported(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix) as (g, events):
        # A compromised agent splits 3 x 4,000 across three workflow ids nobody started.
        made_up = [f"wf-made-up-{n}" for n in range(3)]
        for workflow in made_up:
            await _purchase(g.agent, workflow)
        decided = [await asyncio.wait_for(g.decisions.get(), 10) for _ in made_up]
        assert sorted(d.workflow for d in decided) == made_up
        assert [d.outcome for d in decided] == ["deny"] * 3
        reported = [await asyncio.wait_for(events.get(), 10) for _ in made_up]
        spend = await g.actors[0].redis.hgetall(f"{g.dep.key_prefix}:spend")
        report = await _replayed_the_same(g)

    for decision in decided:
        assert decision.reasons == (f"workflow {decision.workflow!r} was not started",)
    assert {(e.reason, e.claimed_sender) for e in reported} == {("unknown_workflow", "proc-1")}
    assert spend == {}
    assert report.decisions == 3


async def test_an_agent_the_start_record_does_not_name_is_refused(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix) as (g, events):
        await g.coordinator.start("wf-started")  # names proc-1 only
        outsider = await Bus.connect(
            g.dep,
            g.issuer.identity("proc-2", ROLE, capabilities=(ERP_CREATE_PO,), budget_usd=50_000),
        )
        try:
            await _purchase(outsider, "wf-started")
            refused = await asyncio.wait_for(g.decisions.get(), 10)
            assert (refused.agent, refused.outcome) == ("proc-2", "deny")
            event = await asyncio.wait_for(events.get(), 10)
            await _purchase(g.agent, "wf-started", step=2)
            allowed = await asyncio.wait_for(g.decisions.get(), 10)
        finally:
            await outsider.close()
        await _replayed_the_same(g)

    assert refused.reasons == ("agent 'proc-2' is not named in the start of workflow 'wf-started'",)
    assert (event.reason, event.claimed_sender) == ("not_a_participant", "proc-2")
    assert (allowed.agent, allowed.outcome) == ("proc-1", "allow")


async def test_only_the_coordinator_records_a_start(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix) as (g, events):
        # Agents may publish on ctl.*: the agent starts a workflow of its own.
        await g.agent.publish(
            g.agent.subjects.ctl("governance"), StartRecord(agents=("proc-1",)), workflow="wf-own"
        )
        await asyncio.sleep(0.2)  # time for it to be recorded, were it recorded
        await _purchase(g.agent, "wf-own")
        decision = await asyncio.wait_for(g.decisions.get(), 10)
        assert decision.outcome == "deny"
        reported = [await asyncio.wait_for(events.get(), 10) for _ in range(2)]

    assert decision.reasons == ("workflow 'wf-own' was not started",)
    assert sorted((e.reason, e.claimed_sender) for e in reported) == [
        ("not_a_coordinator", "proc-1"),
        ("unknown_workflow", "proc-1"),
    ]


async def test_budget_authority_is_cumulative_per_agent_per_day(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix, budget_usd=10_000) as (
        g,
        events,
    ):
        workflows = [f"wf-authority-{n}" for n in range(3)]
        await g.coordinator.start(*workflows)
        # 3 x 4,000 at once, each in a started workflow of its own, to either actor.
        await asyncio.gather(*(_purchase(g.agent, w) for w in workflows))
        decided = [await asyncio.wait_for(g.decisions.get(), 10) for _ in workflows]
        assert sorted(d.outcome for d in decided) == ["allow", "allow", "deny"]
        event = await asyncio.wait_for(events.get(), 10)
        day_spend = await g.actors[0].redis.hgetall(
            f"{g.dep.key_prefix}:day-spend:{utc_day(time.time())}"
        )
        await _replayed_the_same(g)

    [denied] = [d for d in decided if d.outcome == "deny"]
    assert denied.reasons == (
        "amount 4000 plus spend today 8000 (total 12000) exceeds the agent's budget "
        "authority 10000 a day",
    )
    assert (event.reason, event.claimed_sender) == ("over_budget_authority", "proc-1")
    assert {k: float(v) for k, v in day_spend.items()} == {b"proc-1": 8000.0}


# ---------------------------------------------------------------------------------------
# 7. The advertised directory holds nothing that can mint identities.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 8. State stays with its agent, and the tool tier stays sealed in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 9. Stream permissions are least privilege, per tenant.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 10. A message replayed to another governance actor of the group is refused.
# ---------------------------------------------------------------------------------------


async def test_an_intent_replayed_to_the_other_governance_actor_is_refused(
    tmp_path, secure_nats, redis_server, prefix
) -> None:
    async with _governed(tmp_path, secure_nats, redis_server, prefix) as (g, events):
        first, second = g.actors
        await g.coordinator.start("wf-replayed")
        subject = g.agent.subjects.intent("proc-1")
        _, captured = g.agent.codec.seal(
            g.agent.identity,
            subject=subject,
            body=ToolIntent(tool=ERP_CREATE_PO, args=PURCHASE, step=1),
            workflow="wf-replayed",
        )
        await g.agent.send(subject, captured)
        original = await asyncio.wait_for(g.decisions.get(), 10)
        decided_by = first if first.decided else second
        other = second if decided_by is first else first
        # The actor that decided leaves the group: the replay can only reach the other.
        await decided_by.close()
        await g.agent.send(subject, captured)
        with contextlib.suppress(TimeoutError):
            answered = await asyncio.wait_for(g.decisions.get(), 1)
            raise AssertionError(f"{other.identity.agent_id} answered the replay: {answered}")
        event = await asyncio.wait_for(events.get(), 10)
        records = await other.redis.xlen(decisions_key(g.dep.key_prefix))

    assert original.outcome == "allow"
    assert (event.reason, event.receiver) == ("replay", other.identity.agent_id)
    assert other.decided == {}
    assert records == 1


# ---------------------------------------------------------------------------------------
# 11. Safe defaults: no machine settings changed unasked; bounded subscriptions.
# ---------------------------------------------------------------------------------------
