"""The gateway runs a tool only with a matching, fresh, unused governance decision."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from govmesh.bus import Bus, Delivery
from govmesh.errors import BusError
from govmesh.governance._actor import GovernanceService
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.tools import ERP_CREATE_PO, GatewayService, SimulatedErp, ToolCall, ToolResult

from _deploy import ERP_TERMS, Coordinator, deployment

POLICY = str(Path(__file__).parent.parent / "policies" / "procurement-agent-v2.yaml")
ROLE = "Procurement-Agent-v2"


class Setup:
    def __init__(self, nats_url: str, redis_url: str, tenant: str, transport) -> None:
        self.dep, self.issuer = deployment(nats_url, redis_url, tenant, transport)
        self.decisions: asyncio.Queue[Delivery] = asyncio.Queue()
        self.extra: list[Bus] = []

    async def __aenter__(self) -> Setup:
        self.governance = GovernanceService(
            self.dep,
            self.issuer.identity("governance-1", "governance"),
            policy_paths=[POLICY],
            tools=[ERP_TERMS],
        )
        self.gateway = GatewayService(self.dep, self.issuer.identity("gateway-1", "gateway"))
        await self.governance.start()
        await self.gateway.start()
        self.agent = await Bus.connect(
            self.dep,
            self.issuer.identity("proc-1", ROLE, capabilities=(ERP_CREATE_PO,), budget_usd=50_000),
        )

        async def on_decision(d: Delivery) -> None:
            await self.decisions.put(d)

        await self.agent.subscribe(
            self.agent.subjects.decisions(self.agent.identity.agent_id),
            on_decision,
            accepts=Decision,
        )
        await self.agent.flush()
        self.coordinator = await Coordinator.connect(self.dep, self.issuer, ("proc-1",))
        self.erp = SimulatedErp(self.gateway.redis, prefix=self.dep.key_prefix)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for bus in self.extra:
            await bus.close()
        await self.coordinator.close()
        await self.agent.close()
        await self.gateway.close()
        await self.governance.close()

    async def decide(self, workflow: str, args: dict, step: int = 1) -> Delivery:
        await self.coordinator.start(workflow)
        await self.agent.publish(
            self.agent.subjects.intent("proc-1"),
            ToolIntent(tool=ERP_CREATE_PO, args=args, step=step),
            workflow=workflow,
        )
        return await asyncio.wait_for(self.decisions.get(), 10)

    async def call(self, workflow: str, args: dict, decision: bytes, step: int = 1) -> ToolResult:
        reply = await self.agent.request(
            self.agent.subjects.tool(ERP_CREATE_PO),
            ToolCall(tool=ERP_CREATE_PO, args=args, step=step, decision=decision),
            accepts=ToolResult,
            workflow=workflow,
            timeout=10,
        )
        return reply.body


@pytest.fixture
async def s(secure_nats, redis_server, prefix):
    transport, server = secure_nats
    async with Setup(server.url, redis_server.url, prefix, transport) as setup:
        yield setup


ARGS = {"item": "laptops", "vendor": "Vendor_A", "amount_usd": 1200.0}


async def test_allowed_call_runs_once_and_a_repeated_call_gets_its_answer_back(s: Setup) -> None:
    d = await s.decide("wf-1", ARGS)
    assert d.body.outcome == "allow"
    first = await s.call("wf-1", ARGS, d.data)
    assert first.ok, first.error
    assert not first.replayed
    again = await s.call("wf-1", ARGS, d.data)
    assert again.ok and again.replayed
    assert again.result == first.result
    orders = await s.erp.orders()
    assert [(o.workflow, o.vendor, o.amount_usd) for o in orders] == [("wf-1", "Vendor_A", 1200.0)]
    assert s.gateway.ran == {ERP_CREATE_PO: 1}
    assert s.gateway.bus.rejected["decision_reused"] == 0


async def test_changed_arguments_are_refused(s: Setup) -> None:
    d = await s.decide("wf-2", ARGS)
    result = await s.call("wf-2", {**ARGS, "amount_usd": 9_999.0}, d.data)
    assert not result.ok
    assert "intent_mismatch" in result.error
    result = await s.call("wf-2", ARGS, d.data, step=2)
    assert "intent_mismatch" in result.error
    assert await s.erp.orders() == []


async def test_decision_for_another_workflow_is_refused(s: Setup) -> None:
    d = await s.decide("wf-3", ARGS)
    result = await s.call("wf-4", ARGS, d.data)
    assert not result.ok
    assert "wrong_subject" in result.error
    assert await s.erp.orders() == []


async def test_forged_decision_signed_by_the_agent_is_refused(s: Setup) -> None:
    real = await s.decide("wf-5", {**ARGS, "vendor": "Vendor_C"})
    assert real.body.outcome == "deny"
    forged = Decision(**{**_fields(real.body), "outcome": "allow", "expires_at": time.time() + 60})
    _, data = s.agent.codec.seal(
        s.agent.identity,
        subject=s.agent.subjects.decision(s.agent.identity.agent_id, "wf-5"),
        body=forged,
    )
    result = await s.call("wf-5", {**ARGS, "vendor": "Vendor_C"}, data)
    assert not result.ok
    assert "decision_not_from_governance" in result.error
    denied = await s.call("wf-5", {**ARGS, "vendor": "Vendor_C"}, real.data)
    assert "decision_not_allow" in denied.error
    assert await s.erp.orders() == []


def _fields(decision: Decision) -> dict:
    return {f: getattr(decision, f) for f in decision.__struct_fields__}


async def _security_events(s: Setup) -> asyncio.Queue:
    from govmesh.bus import SecurityEvent

    events: asyncio.Queue = asyncio.Queue()

    async def on_event(d: Delivery) -> None:
        await events.put(d.body)

    monitor = await Bus.connect(s.dep, s.issuer.identity("monitor-1", "auditor"))
    s.extra.append(monitor)
    await monitor.subscribe(monitor.subjects.security, on_event, accepts=SecurityEvent)
    await monitor.flush()
    return events


async def test_intent_for_a_tool_the_token_lacks_is_dropped_and_reported(s: Setup) -> None:
    events = await _security_events(s)
    rogue = await Bus.connect(s.dep, s.issuer.identity("rogue-1", ROLE, budget_usd=50_000))
    try:
        await rogue.publish(
            rogue.subjects.intent("rogue-1"),
            ToolIntent(tool=ERP_CREATE_PO, args=ARGS, step=1),
            workflow="wf-6",
        )
        event = await asyncio.wait_for(events.get(), 10)
    finally:
        await rogue.close()
    assert (event.reason, event.claimed_sender, event.receiver) == (
        "capability",
        "rogue-1",
        "governance-1",
    )
    # The governance actor decided nothing for it, and keeps serving others.
    assert s.decisions.empty()
    assert (await s.decide("wf-7", ARGS)).body.outcome == "allow"
    assert s.governance.decided == {"allow": 1}


async def test_intent_over_the_token_budget_authority_is_dropped(s: Setup) -> None:
    events = await _security_events(s)
    small = await Bus.connect(
        s.dep,
        s.issuer.identity("small-1", ROLE, capabilities=(ERP_CREATE_PO,), budget_usd=1_000),
    )
    try:
        await small.publish(
            small.subjects.intent("small-1"),
            ToolIntent(tool=ERP_CREATE_PO, args=ARGS, step=1),
            workflow="wf-8",
        )
        event = await asyncio.wait_for(events.get(), 10)
    finally:
        await small.close()
    assert event.reason == "over_budget_authority"
    assert s.governance.decided == {}


async def test_tool_call_for_a_tool_the_token_lacks_is_dropped(s: Setup) -> None:
    d = await s.decide("wf-9", ARGS)
    rogue = await Bus.connect(s.dep, s.issuer.identity("proc-2", ROLE))
    try:
        with pytest.raises(BusError):
            await rogue.request(
                rogue.subjects.tool(ERP_CREATE_PO),
                ToolCall(tool=ERP_CREATE_PO, args=ARGS, step=1, decision=d.data),
                accepts=ToolResult,
                workflow="wf-9",
                timeout=1,
            )
    finally:
        await rogue.close()
    assert s.gateway.bus.rejected["capability"] == 1
    assert await s.erp.orders() == []
