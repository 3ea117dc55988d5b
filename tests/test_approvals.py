"""Approvals on real servers: a paused workflow waits through restarts of governance, the
state actor and the Redis-protocol server, resumes on an operator's signed answer, and an
approval nobody answers takes its policy's default."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from govmesh.agents import AgentHost, Outcome, WorkflowStart
from govmesh.bus import Bus, Delivery
from govmesh.config import Deployment
from govmesh.governance._actor import GovernanceService
from govmesh.governance._approvals import CLAIM_GRACE_S, Answer, ApprovalRecord, ApprovalStore
from govmesh.governance._operator import ApprovalNotPending, OperatorDesk
from govmesh.governance._starts import record_start
from govmesh.identity import OPERATOR_MEMBER, EnrolmentServer, Issuer
from govmesh.llm import SimulatedModel, SimulatedModelSettings
from govmesh.runtime import JoinedDeployment, Member, RedisServer, Transport
from govmesh.state import Keyring, StateService
from govmesh.state.messages import SnapshotQuery, SnapshotReply
from govmesh.tools import GatewayService

from _deploy import ERP_TERMS, deployment
from procurement.agents import Purchase
from procurement.tools import create_purchase_order, orders

ERP_CREATE_PO = create_purchase_order.name

ROOT = Path(__file__).parent.parent
KEYRING = Keyring.generate("test")
"""Every state actor of a deployment holds the same snapshot keys."""
SEED = (ROOT / "policies" / "procurement-agent-v2.yaml").read_text()
ROLE = "Procurement-Agent-v2"
AGENT = "procurement-1"


@dataclass
class Stack:
    """In-process services of one tenant on the session's mutual-TLS NATS."""

    dep: Deployment
    issuer: Issuer
    transport: Transport
    policy: Path
    redis: RedisServer
    governance: GovernanceService
    state: StateService
    coordinator: Bus
    outcomes: asyncio.Queue[Outcome]
    enrolment: Path
    spawned: int = 0

    async def start_governance(self, **kw: float) -> GovernanceService:
        self.spawned += 1
        service = GovernanceService(
            self.dep,
            self.issuer.identity(f"governance-{self.spawned}", "governance"),
            policy_paths=[str(self.policy)],
            sweep_interval_s=kw.get("sweep_interval_s", 0.05),
            tools=[ERP_TERMS],
        )
        await service.start()
        return service

    async def start_state(self) -> StateService:
        self.spawned += 1
        service = StateService(
            self.dep, self.issuer.identity(f"state-{self.spawned}", "state"), keyring=KEYRING
        )
        await service.start()
        return service

    async def buy(self, workflow: str, amount: float) -> None:
        await record_start(self.coordinator, workflow, (AGENT,))
        await self.coordinator.publish(
            self.coordinator.subjects.msg(AGENT),
            WorkflowStart(
                kind="Purchase",
                body=msgspec.msgpack.encode(
                    Purchase(item="monitors", vendor="Vendor_A", amount_usd=amount)
                ),
            ),
            workflow=workflow,
        )

    def desk(self) -> OperatorDesk:
        # As `govmesh.runtime.join` gives it: without the Redis URL, which holds its password.
        return OperatorDesk(
            JoinedDeployment(
                deployment=msgspec.structs.replace(self.dep, redis_url=""),
                enrolment=self.enrolment,
                pid=os.getpid(),
                started_at=time.time(),
                what="test",
            )
        )

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[ApprovalStore]:
        """The tenant's approvals in Redis, as the deployment's owner reads them."""
        r = aioredis.Redis.from_url(self.dep.redis_url)
        try:
            yield ApprovalStore(r, self.dep.key_prefix)
        finally:
            await r.aclose()

    async def snapshot(self, workflow: str, version: int = 0) -> SnapshotReply:
        # Only the agent itself may read its snapshots: ask as the agent.
        async with await Bus.connect(self.dep, self.issuer.identity(AGENT, ROLE)) as agent:
            reply = await agent.request(
                agent.subjects.ctl("state"),
                SnapshotQuery(workflow=workflow, agent=AGENT, version=version),
                accepts=SnapshotReply,
            )
        return reply.body


@pytest.fixture
async def stack(
    tmp_path: Path, secure_nats: tuple[Transport, object], prefix: str
) -> AsyncIterator[Callable[[str], asyncio.Future[Stack]]]:
    """Builds the services for a policy text; a Redis-protocol server of the test's own,
    so restarting it disturbs no other test."""
    transport, server = secure_nats
    redis = RedisServer(workdir=tmp_path / "redis")
    redis.start()
    services: list[object] = []
    built: list[Stack] = []
    servers: list[EnrolmentServer] = []

    async def build(policy_text: str) -> Stack:
        dep, issuer = deployment(server.url, redis.url, prefix, transport)  # type: ignore[attr-defined]
        policy = tmp_path / "policy.yaml"
        policy.write_text(policy_text)
        gateway = GatewayService(
            dep, issuer.identity("gateway-1", "gateway"), tools=[create_purchase_order]
        )
        agent = AgentHost(
            dep,
            issuer.identity(AGENT, ROLE, capabilities=(ERP_CREATE_PO,), budget_usd=25_000),
            agent="procurement.agents:Buyer",
            model=functools.partial(SimulatedModel, SimulatedModelSettings(latency_ms=1), seed=1),
        )
        for service in (gateway, agent):
            await service.start()
            services.append(service)
        outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))

        async def on_outcome(d: Delivery) -> None:
            await outcomes.put(d.body)

        await coordinator.subscribe(
            coordinator.subjects.msg("coordinator-1"), on_outcome, accepts=Outcome
        )
        await coordinator.flush()
        # Operators enrol their own keys over the socket, as `govmesh approvals` does.
        transport.register([Member.for_role(OPERATOR_MEMBER, "operator", tenant=prefix)])
        enrolment = EnrolmentServer(
            tmp_path / "enrol.sock", issuer=issuer, ca=transport.ca, tenant=prefix
        )
        await enrolment.start()
        servers.append(enrolment)
        s = Stack(
            dep=dep,
            issuer=issuer,
            transport=transport,
            policy=policy,
            redis=redis,
            governance=None,  # type: ignore[arg-type]
            state=None,  # type: ignore[arg-type]
            coordinator=coordinator,
            outcomes=outcomes,
            enrolment=enrolment.path,
        )
        s.governance = await s.start_governance()
        s.state = await s.start_state()
        built.append(s)
        return s

    yield build  # type: ignore[misc]
    for s in built:
        await s.coordinator.close()
        await s.governance.close()
        await s.state.close()
    for service in services:
        await service.close()  # type: ignore[attr-defined]
    for enrolment in servers:
        await enrolment.close()
    redis.stop()


async def _pending(desk: OperatorDesk, count: int, timeout: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await desk.pending()
        if len(found) >= count:
            return [r.approval_id for r in found]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{count} approvals never became pending")


async def test_a_pending_approval_survives_restarts_of_governance_state_and_redis(
    stack,
) -> None:
    s: Stack = await stack(SEED)
    await s.buy("wf-restart", 7_000.0)
    async with s.desk() as desk:
        [approval_id] = await _pending(desk, 1)
    paused = await s.snapshot("wf-restart")
    assert paused.found and paused.snapshot is not None
    assert paused.snapshot.goal["phase"] == "awaiting_approval"
    assert paused.snapshot.goal["approval_id"] == approval_id

    await s.governance.close()
    await s.state.close()
    s.redis.restart()
    s.governance = await s.start_governance()
    s.state = await s.start_state()

    async with s.desk() as desk:
        assert [r.approval_id for r in await desk.pending()] == [approval_id]
        request, result = await desk.answer(approval_id[:10], approved=True, by="alice")
    assert request.approval_id == approval_id
    assert result.found and result.outcome == "allow" and result.by == "alice"

    outcome = await asyncio.wait_for(s.outcomes.get(), 20)
    assert outcome.result == "completed", outcome
    assert outcome.approved_by == "alice" and outcome.approval_id == approval_id
    placed = await orders(s.governance.redis, s.dep.key_prefix)
    assert [(o.workflow, o.amount_usd) for o in placed] == [("wf-restart", 7_000.0)]
    resumed = await s.snapshot("wf-restart", version=paused.snapshot.version)
    assert resumed.snapshot is not None and resumed.snapshot.goal["phase"] == "awaiting_approval"
    latest = await s.snapshot("wf-restart")
    assert latest.snapshot is not None and latest.snapshot.goal["phase"] == "done"


async def test_an_approval_is_settled_once_when_two_operators_answer_at_once(stack) -> None:
    s: Stack = await stack(SEED)
    second = await s.start_governance()
    try:
        await s.buy("wf-race", 6_000.0)
        async with s.desk() as alice, s.desk() as bob:
            [approval_id] = await _pending(alice, 1)
            answers = await asyncio.gather(
                alice.answer(approval_id, approved=True, by="alice"),
                bob.answer(approval_id, approved=False, by="bob"),
                return_exceptions=True,
            )
        settled = [a for a in answers if not isinstance(a, BaseException)]
        refused = [a for a in answers if isinstance(a, ApprovalNotPending)]
        assert len(settled) == 1 and len(refused) == 1, answers
        _, result = settled[0]
        outcome = await asyncio.wait_for(s.outcomes.get(), 20)
        assert outcome.result == ("completed" if result.outcome == "allow" else "rejected")
        await asyncio.sleep(0.3)
        assert s.outcomes.empty(), "the workflow got one final decision"
        async with s.store() as store:
            record = await store.done(approval_id)
        assert record is not None and record.answer.by == result.by
        assert record.outcome == result.outcome
    finally:
        await second.close()


@pytest.mark.parametrize(("default", "result"), [("deny", "rejected"), ("allow", "completed")])
async def test_an_approval_nobody_answers_takes_the_policy_default(
    stack, default: str, result: str
) -> None:
    policy = SEED + f"  approval_expiry_s: 0.5\n  on_expiry: {default}\n"
    s: Stack = await stack(policy)
    await s.buy("wf-lapse", 8_000.0)

    outcome = await asyncio.wait_for(s.outcomes.get(), 20)
    assert outcome.first_decision == "escalate"
    assert outcome.result == result, outcome
    assert any("expired unanswered" in r for r in outcome.reasons), outcome.reasons
    async with s.store() as store:
        record = await store.done(outcome.approval_id)
    async with s.desk() as desk:
        assert await desk.pending() == []
        with pytest.raises(ApprovalNotPending, match="already settled: expired"):
            await desk.answer(outcome.approval_id, approved=True, by="late")
        with pytest.raises(ApprovalNotPending, match="already settled: expired"):
            await desk.answer(outcome.approval_id[:8], approved=True, by="late")
    assert record is not None and record.answer.expired and record.outcome == default


async def test_a_claim_abandoned_by_a_dead_actor_is_settled_with_its_answer(stack) -> None:
    s: Stack = await stack(SEED)
    await s.buy("wf-abandoned", 9_000.0)
    async with s.desk() as desk:
        [approval_id] = await _pending(desk, 1)
        await s.governance.close()  # nobody settles while the claim is staged
        # An actor took carol's answer long enough ago, then died before finishing.
        async with s.store() as store:
            taken = await store.claim(
                approval_id,
                Answer(approved=True, by="carol", operator="operator"),
                now=time.time() - CLAIM_GRACE_S - 1,
            )
        assert taken is not None

        s.governance = await s.start_governance()
        outcome = await asyncio.wait_for(s.outcomes.get(), 20)
    async with s.store() as store:
        record = await store.done(approval_id)
    assert outcome.result == "completed" and outcome.approved_by == "carol"
    assert record is not None and record.answer.by == "carol" and record.outcome == "allow"


async def test_a_settlement_is_recorded_through_a_redis_restart(stack) -> None:
    s: Stack = await stack(SEED)
    await s.buy("wf-outage", 6_500.0)
    loop = asyncio.get_running_loop()
    finish = s.governance.approvals.finish
    outages = []

    async def finish_while_redis_restarts(record: ApprovalRecord) -> None:
        # Redis goes down between the final decision and its record, and is back 0.5 s on
        # (started from this thread, which owns the test's servers).
        if not outages:
            outages.append(record.approval_id)
            s.redis.stop()
            loop.call_later(0.5, s.redis.start)
        await finish(record)

    s.governance.approvals.finish = finish_while_redis_restarts  # type: ignore[method-assign]
    async with s.desk() as desk:
        [approval_id] = await _pending(desk, 1)
        _, result = await desk.answer(approval_id, approved=True, by="dana")
    outcome = await asyncio.wait_for(s.outcomes.get(), 20)
    async with s.store() as store, s.desk() as desk:
        record = await store.done(approval_id)
        assert await desk.pending() == []
    assert outages == [approval_id]
    assert result.outcome == "allow" and outcome.result == "completed"
    assert record is not None and record.answer.by == "dana" and record.outcome == "allow"


async def test_an_unknown_approval_changes_nothing(stack) -> None:
    s: Stack = await stack(SEED)
    async with s.desk() as desk:
        with pytest.raises(ApprovalNotPending, match="no pending approval"):
            await desk.answer("feedface", approved=True, by="alice")
        with pytest.raises(ApprovalNotPending, match="lowercase hex"):
            await desk.answer("*", approved=True, by="alice")
        assert await desk.pending() == []
