"""The gateway runs a tool only with a matching, fresh, unused governance decision; it runs
the tools it is given (by object or by path), with typed arguments, and every answer it gives
is on the event stream."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from govmesh.bus import Bus, Delivery, ensure_event_stream
from govmesh.errors import BusError, ConfigError
from govmesh.governance._actor import GovernanceService
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.observability._service import AuditService
from govmesh.tools import GatewayService, ToolCall, ToolResult, ToolSpec

from _deploy import ERP_TERMS, Coordinator, deployment
from procurement.tools import create_purchase_order, orders

POLICY = str(Path(__file__).parent.parent / "policies" / "procurement-agent-v2.yaml")
ROLE = "Procurement-Agent-v2"
ERP_CREATE_PO = create_purchase_order.name


class Setup:
    def __init__(
        self,
        nats_url: str,
        redis_url: str,
        tenant: str,
        transport,
        *,
        tools: Sequence[str | ToolSpec] = (create_purchase_order,),
        search_path: Sequence[str] = (),
    ) -> None:
        self.dep, self.issuer = deployment(nats_url, redis_url, tenant, transport)
        self.tools, self.search_path = tools, search_path
        self.decisions: asyncio.Queue[Delivery] = asyncio.Queue()
        self.extra: list[Bus] = []

    async def __aenter__(self) -> Setup:
        self.governance = GovernanceService(
            self.dep,
            self.issuer.identity("governance-1", "governance"),
            policy_paths=[POLICY],
            tools=[ERP_TERMS],
        )
        self.gateway = GatewayService(
            self.dep,
            self.issuer.identity("gateway-1", "gateway"),
            tools=self.tools,
            search_path=self.search_path,
        )
        await self.governance.start()
        await self.gateway.start()
        self.agent = await Bus.connect(
            self.dep,
            self.issuer.identity(
                "proc-1", ROLE, capabilities=tuple(self.gateway.tools), budget_usd=50_000
            ),
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
        return self

    async def __aexit__(self, *exc: object) -> None:
        for bus in self.extra:
            await bus.close()
        await self.coordinator.close()
        await self.agent.close()
        await self.gateway.close()
        await self.governance.close()

    async def decide(
        self, workflow: str, args: dict, step: int = 1, *, tool: str = ERP_CREATE_PO
    ) -> Delivery:
        await self.coordinator.start(workflow)
        await self.agent.publish(
            self.agent.subjects.intent("proc-1"),
            ToolIntent(tool=tool, args=args, step=step),
            workflow=workflow,
        )
        return await asyncio.wait_for(self.decisions.get(), 10)

    async def call(
        self,
        workflow: str,
        args: dict,
        decision: bytes,
        step: int = 1,
        *,
        tool: str = ERP_CREATE_PO,
    ) -> ToolResult:
        reply = await self.agent.request(
            self.agent.subjects.tool(tool),
            ToolCall(tool=tool, args=args, step=step, decision=decision),
            accepts=ToolResult,
            workflow=workflow,
            timeout=10,
        )
        return reply.body

    async def orders(self) -> list:
        return await orders(self.gateway.redis, self.dep.key_prefix)


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
    orders = await s.orders()
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
    assert await s.orders() == []


async def test_decision_for_another_workflow_is_refused(s: Setup) -> None:
    d = await s.decide("wf-3", ARGS)
    result = await s.call("wf-4", ARGS, d.data)
    assert not result.ok
    assert "wrong_subject" in result.error
    assert await s.orders() == []


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
    assert await s.orders() == []


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
    assert await s.orders() == []


USER_TOOL = '''
import msgspec

import govmesh


class Line(msgspec.Struct, frozen=True):
    sku: str
    qty: int


class Quote(msgspec.Struct, frozen=True):
    vendor: str
    amount_usd: float
    lines: list[Line]


class Quoted(msgspec.Struct, frozen=True):
    units: int
    counter: str


@govmesh.tool(name="erp.quote", spend="amount_usd")
async def quote(q: Quote, ctx: govmesh.ToolContext) -> Quoted:
    """Count the units quoted, in a counter of the deployment."""
    counter = ctx.key("quotes", "made")
    await ctx.redis.incr(counter)
    return Quoted(units=sum(line.qty for line in q.lines), counter=counter)
'''
QUOTE = {
    "vendor": "Vendor_A",
    "amount_usd": 300.0,
    "lines": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 3}],
}


@pytest.fixture
async def user_tool(secure_nats, redis_server, prefix, tmp_path):
    """A gateway given a tool by path, in a folder of the user's that is not on sys.path."""
    module = f"user_tools_{prefix}"
    (tmp_path / f"{module}.py").write_text(USER_TOOL)
    transport, server = secure_nats
    tools = [f"{module}:quote", create_purchase_order]
    async with Setup(
        server.url, redis_server.url, prefix, transport, tools=tools, search_path=[str(tmp_path)]
    ) as setup:
        yield setup


async def test_a_tool_given_by_path_runs_in_the_gateway_with_its_context(user_tool: Setup) -> None:
    s = user_tool
    d = await s.decide("wf-q1", QUOTE, tool="erp.quote")

    result = await s.call("wf-q1", QUOTE, d.data, tool="erp.quote")

    counter = f"{s.dep.key_prefix}:quotes:made"
    assert result == ToolResult(ok=True, result={"units": 5, "counter": counter})
    assert await s.gateway.redis.get(counter) == b"1"
    assert s.gateway.ran == {"erp.quote": 1}


async def test_arguments_that_do_not_fit_the_tools_type_are_answered_at_once_and_recorded(
    user_tool: Setup,
) -> None:
    s = user_tool
    bad = {**QUOTE, "lines": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": "many"}]}
    d = await s.decide("wf-q2", bad, tool="erp.quote")

    first = await s.call("wf-q2", bad, d.data, tool="erp.quote")
    again = await s.call("wf-q2", bad, d.data, tool="erp.quote")

    error = "erp.quote: bad argument $.lines[1].qty = 'many': Expected `int`, got `str`"
    assert first == ToolResult(ok=False, error=error)
    assert again == ToolResult(ok=False, error=error, replayed=True)
    # The tool never ran: its counter was never made.
    assert await s.gateway.redis.get(f"{s.dep.key_prefix}:quotes:made") is None
    assert (s.gateway.failed, s.gateway.ran) == ({"erp.quote": 1}, {})


async def test_a_path_that_names_no_tool_is_refused_when_the_gateway_is_made(
    redis_server, tmp_path
) -> None:
    (tmp_path / "not_tools.py").write_text("async def plain(args, ctx):\n    return {}\n")
    dep, issuer = deployment("nats://127.0.0.1:1", redis_server.url, "t-paths")
    identity = issuer.identity("gateway-1", "gateway")
    with pytest.raises(ConfigError, match=r"'not_tools:plain' is a function, not a tool"):
        GatewayService(dep, identity, tools=["not_tools:plain"], search_path=[str(tmp_path)])
    with pytest.raises(ConfigError, match=r"module 'no_such_module' does not import"):
        GatewayService(dep, identity, tools=["no_such_module:tool"])
    with pytest.raises(ConfigError, match=r"another tool is named 'erp.create_purchase_order'"):
        GatewayService(dep, identity, tools=[create_purchase_order, create_purchase_order])


async def test_every_answer_of_the_gateway_is_on_the_event_stream_and_in_audit_show(
    s: Setup, redis_server
) -> None:
    await ensure_event_stream(s.coordinator.bus.nc, s.dep.tenant)
    d = await s.decide("wf-audit", ARGS)
    ran = await s.call("wf-audit", ARGS, d.data)
    replayed = await s.call("wf-audit", ARGS, d.data)
    refused = await s.call("wf-audit", {**ARGS, "amount_usd": 1.0}, d.data)
    assert ran.ok and replayed.replayed and "intent_mismatch" in refused.error

    auditor = AuditService(s.dep, s.issuer.identity("audit-1", "auditor"))
    await auditor.start()
    try:
        index = auditor.index
        async with asyncio.timeout(10):
            while len(await index.by_kind("ToolResult")) < 3:
                await asyncio.sleep(0.05)
        trace = await index.show("wf-audit")
        report = await index.verify("wf-audit")
    finally:
        await auditor.close()

    calls = [r for r in trace.records if r.kind == "ToolCall"]
    results = [r for r in trace.records if r.kind == "ToolResult"]
    assert len(calls) == len(results) == 3
    # Each answer is signed by the gateway and hangs under the call it answers.
    for call, result in zip(calls, results, strict=True):
        assert (result.sender, result.subject) == ("gateway-1", s.gateway.subjects.result("proc-1"))
        assert trace.children[call.id] == [result.id]
    assert [(r.summary["ok"], r.summary["replayed"]) for r in results] == [
        (True, False),
        (True, True),
        (False, False),
    ]
    assert "intent_mismatch" in str(results[2].summary["error"])
    assert report.ok and trace.refused == []

    # As an operator types it (the command runs its own event loop, so not in this one).
    show = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "govmesh"),
        *("audit", "show", "wf-audit", "--tenant", s.dep.tenant, "--redis-url", redis_server.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    output = (await show.communicate())[0].decode()
    assert show.returncode == 0, output
    assert output.count("ToolResult from gateway-1") == 3, output
