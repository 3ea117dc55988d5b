"""A retried step never repeats a tool's effect: the gateway's idempotency ledger, with the
procurement example's simulated ERP and its own records as the proof."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import redis.asyncio as aioredis

from govmesh.bus import Bus, Delivery, SecurityEvent
from govmesh.errors import ConfigError, ToolError
from govmesh.governance._actor import GovernanceService
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.tools import (
    LEASE_S,
    STEP_IN_PROGRESS,
    Entry,
    GatewayService,
    Ledger,
    ToolCall,
    ToolContext,
    ToolResult,
    tool,
)

from _deploy import ERP_TERMS, Coordinator, deployment
from procurement.tools import Order, Placed, PurchaseOrder, create_purchase_order, orders

POLICY = str(Path(__file__).parent.parent / "policies" / "procurement-agent-v2.yaml")
ROLE = "Procurement-Agent-v2"
AGENT = "proc-1"
ERP_CREATE_PO = create_purchase_order.name
LEGACY = "erp.legacy_purchase_order"
"""A tool the tests register as not idempotent."""
FLAKY = "erp.flaky_purchase_order"
"""A tool a test registers to fail as it says (`Flaky`)."""
ARGS = {"item": "laptops", "vendor": "Vendor_A", "amount_usd": 1200.0}


class Mesh:
    """Governance, ``gateways`` gateways in one queue group, and one agent, on one tenant."""

    def __init__(
        self,
        nats_url: str,
        redis_url: str,
        tenant: str,
        transport: Any,
        *,
        gateways: int = 1,
        lease_s: float = LEASE_S,
    ) -> None:
        self.dep, self.issuer = deployment(nats_url, redis_url, tenant, transport)
        self.count = gateways
        self.lease_s = lease_s
        self.decisions: asyncio.Queue[Delivery] = asyncio.Queue()
        self.events: asyncio.Queue[SecurityEvent] = asyncio.Queue()
        self.legacy_runs: list[dict[str, Any]] = []
        self.legacy_gate = asyncio.Event()
        self.legacy_gate.set()
        self.flaky = Flaky()

        @tool(name=LEGACY)
        async def legacy(order: Order, ctx: ToolContext) -> dict[str, int]:
            await self.legacy_gate.wait()
            self.legacy_runs.append(msgspec.to_builtins(order))
            return {"order": len(self.legacy_runs)}

        @tool(name=FLAKY)
        async def flaky(order: Order, ctx: ToolContext) -> Placed:
            return await self.flaky(order, ctx)

        self.legacy = legacy
        self.tools = (create_purchase_order, legacy, flaky)

    async def __aenter__(self) -> Mesh:
        self.governance = GovernanceService(
            self.dep,
            self.issuer.identity("governance-1", "governance"),
            policy_paths=[POLICY],
            tools=[ERP_TERMS],
        )
        await self.governance.start()
        self.gateways = [
            GatewayService(
                self.dep,
                self.issuer.identity(f"gateway-{i}", "gateway"),
                tools=self.tools,
                lease_s=self.lease_s,
            )
            for i in range(1, self.count + 1)
        ]
        for gateway in self.gateways:
            await gateway.start()
        self.agent = await Bus.connect(
            self.dep,
            self.issuer.identity(
                AGENT, ROLE, capabilities=(ERP_CREATE_PO, LEGACY, FLAKY), budget_usd=50_000
            ),
        )
        self.monitor = await Bus.connect(self.dep, self.issuer.identity("monitor-1", "auditor"))
        self.coordinator = await Coordinator.connect(self.dep, self.issuer, (AGENT,))

        async def on_decision(d: Delivery) -> None:
            await self.decisions.put(d)

        async def on_event(d: Delivery) -> None:
            await self.events.put(d.body)

        await self.agent.subscribe(
            self.agent.subjects.decisions(self.agent.identity.agent_id),
            on_decision,
            accepts=Decision,
        )
        await self.monitor.subscribe(
            self.monitor.subjects.security, on_event, accepts=SecurityEvent
        )
        await self.agent.flush()
        await self.monitor.flush()
        self.redis = self.gateways[0].redis
        self.ledger = self.gateways[0].ledger
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.coordinator.close()
        await self.monitor.close()
        await self.agent.close()
        for gateway in self.gateways:
            await gateway.close()
        await self.governance.close()

    async def orders(self) -> list[PurchaseOrder]:
        """Every order the ERP placed in this deployment."""
        return await orders(self.redis, self.dep.key_prefix)

    async def decide(
        self, workflow: str, args: dict[str, Any], *, step: int = 1, tool: str = ERP_CREATE_PO
    ) -> Delivery:
        await self.coordinator.start(workflow)
        await self.agent.publish(
            self.agent.subjects.intent(AGENT),
            ToolIntent(tool=tool, args=args, step=step),
            workflow=workflow,
        )
        d = await asyncio.wait_for(self.decisions.get(), 10)
        assert d.body.outcome == "allow", d.body.reasons
        return d

    async def call(
        self,
        workflow: str,
        args: dict[str, Any],
        decision: bytes,
        *,
        step: int = 1,
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

    def key(self, workflow: str, d: Delivery, *, step: int = 1) -> str:
        return self.ledger.key(workflow, step, d.body.intent_hash)

    async def dead_gateway_claim(
        self, workflow: str, d: Delivery, *, tool: str = ERP_CREATE_PO, lapsed: bool = True
    ) -> Entry:
        """What a gateway that claimed the step and died leaves behind: a running entry whose
        lease lapsed an hour ago (``lapsed``) or lasts another hour."""
        started = time.time() - 3_600 if lapsed else time.time()
        entry = Entry(
            state="running",
            workflow=workflow,
            step=1,
            intent_hash=d.body.intent_hash,
            tool=tool,
            idempotency_key=self.ledger.idempotency_key(workflow, 1, d.body.intent_hash),
            decision_id=d.envelope.id,
            gateway="gateway-0",
            call="call-to-gateway-0",
            started_at=started,
            lease_until=started + 1_800,
        )
        assert await self.ledger.begin(entry, idempotent=True, may_run=True) == "new"
        return entry

    def tool_context(self, workflow: str, d: Delivery, entry: Entry) -> ToolContext:
        return ToolContext(
            workflow=workflow,
            agent=AGENT,
            step=1,
            decision_id=d.envelope.id,
            idempotency_key=entry.idempotency_key,
            key_prefix=self.dep.key_prefix,
            redis=self.redis,
        )

    def rejected(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for gateway in self.gateways:
            for reason, n in gateway.bus.rejected.items():
                total[reason] = total.get(reason, 0) + n
        return total


@pytest.fixture
async def m(secure_nats, redis_server, prefix):
    transport, server = secure_nats
    async with Mesh(server.url, redis_server.url, prefix, transport, gateways=1) as mesh:
        yield mesh


@pytest.fixture
async def m2(secure_nats, redis_server, prefix):
    transport, server = secure_nats
    async with Mesh(server.url, redis_server.url, prefix, transport, gateways=2) as mesh:
        yield mesh


async def test_a_retried_step_gets_the_recorded_answer_and_the_erp_has_one_order(
    m: Mesh,
) -> None:
    d = await m.decide("wf-1", ARGS)
    first = await m.call("wf-1", ARGS, d.data)
    assert first.ok and not first.replayed, first.error
    again = await m.call("wf-1", ARGS, d.data)
    # A fresh decision for the same intent is the same step too.
    fresh = await m.call("wf-1", ARGS, (await m.decide("wf-1", ARGS)).data)
    for retry in (again, fresh):
        assert retry == ToolResult(ok=True, result=first.result, replayed=True)
    orders = await m.orders()
    assert [o.po_id for o in orders] == [first.result["po_id"]]
    entry = await m.ledger.entry(m.key("wf-1", d))
    assert entry is not None
    assert (entry.state, entry.attempts, entry.decision_id, entry.result) == (
        "done",
        1,
        d.envelope.id,
        first,
    )
    gateway = m.gateways[0]
    assert (gateway.ran, gateway.replayed) == ({ERP_CREATE_PO: 1}, {ERP_CREATE_PO: 2})
    assert m.rejected() == {}


async def test_another_intent_at_the_same_step_is_another_entry_with_its_own_decision(
    m: Mesh,
) -> None:
    d = await m.decide("wf-2", ARGS)
    assert (await m.call("wf-2", ARGS, d.data)).ok
    other = {**ARGS, "item": "monitors"}
    refused = await m.call("wf-2", other, d.data)
    assert "intent_mismatch" in refused.error
    second = await m.call("wf-2", other, (await m.decide("wf-2", other)).data)
    assert second.ok and not second.replayed, second.error
    assert sorted(o.item for o in await m.orders()) == ["laptops", "monitors"]


@pytest.mark.parametrize("ran_before_crash", [True, False])
async def test_a_step_retried_after_a_crash_between_run_and_record_does_not_repeat_the_effect(
    m: Mesh, ran_before_crash: bool
) -> None:
    d = await m.decide("wf-3", ARGS)
    entry = await m.dead_gateway_claim("wf-3", d)
    if ran_before_crash:
        effect = await create_purchase_order(Order(**ARGS), m.tool_context("wf-3", d, entry))

    retry = await m.call("wf-3", ARGS, d.data)

    assert retry.ok and not retry.replayed, retry.error
    orders = await m.orders()
    assert [o.po_id for o in orders] == [retry.result["po_id"]]
    if ran_before_crash:
        assert retry.result == msgspec.to_builtins(effect)
    found = await m.ledger.entry(m.key("wf-3", d))
    assert found is not None
    assert (found.state, found.attempts, found.gateway, found.result) == (
        "done",
        2,
        "gateway-1",
        retry,
    )
    assert await m.call("wf-3", ARGS, d.data) == ToolResult(
        ok=True, result=retry.result, replayed=True
    )
    assert len(await m.orders()) == 1
    assert m.rejected() == {}


async def test_a_tool_that_is_not_idempotent_is_not_rerun_after_a_crash_but_left_in_doubt(
    m: Mesh,
) -> None:
    d = await m.decide("wf-4", ARGS, tool=LEGACY)
    entry = await m.dead_gateway_claim("wf-4", d, tool=LEGACY)
    await m.legacy(Order(**ARGS), m.tool_context("wf-4", d, entry))

    first = await m.call("wf-4", ARGS, d.data, tool=LEGACY)
    again = await m.call("wf-4", ARGS, d.data, tool=LEGACY)

    assert m.legacy_runs == [ARGS]
    for result in (first, again):
        assert not result.ok
        assert result.error.startswith("in doubt: "), result.error
        assert entry.idempotency_key in result.error and "gateway-0" in result.error
    found = await m.ledger.entry(m.key("wf-4", d))
    assert found is not None and found.state == "in_doubt"
    # Reported once, when the gateway found it, for a person to resolve.
    event = await asyncio.wait_for(m.events.get(), 10)
    assert (event.reason, event.receiver, event.claimed_sender) == ("in_doubt", "gateway-1", AGENT)
    assert m.gateways[0].in_doubt == {LEGACY: 1}
    assert m.rejected() == {"in_doubt": 1}

    # A person checks the tool's records and resolves the step; retries get that answer.
    resolved = ToolResult(ok=True, result={"order": 1})
    assert await m.ledger.finish(m.key("wf-4", d), resolved, now=time.time()) == resolved
    after = await m.call("wf-4", ARGS, d.data, tool=LEGACY)
    assert after == ToolResult(ok=True, result={"order": 1}, replayed=True)
    assert m.legacy_runs == [ARGS]


@pytest.mark.parametrize("tool", [ERP_CREATE_PO, LEGACY])
async def test_a_retry_while_the_lease_is_live_runs_nothing(m: Mesh, tool: str) -> None:
    d = await m.decide("wf-5", ARGS, tool=tool)
    await m.dead_gateway_claim("wf-5", d, tool=tool, lapsed=False)

    result = await m.call("wf-5", ARGS, d.data, tool=tool)

    assert result == ToolResult(ok=False, error=STEP_IN_PROGRESS)
    assert await m.orders() == [] and m.legacy_runs == []
    found = await m.ledger.entry(m.key("wf-5", d))
    assert found is not None and (found.state, found.gateway) == ("running", "gateway-0")
    assert m.gateways[0].in_progress == {tool: 1}
    assert m.rejected() == {}


async def test_a_slow_tool_keeps_its_lease_so_a_retry_past_the_first_lease_runs_nothing(
    secure_nats, redis_server, prefix
) -> None:
    transport, server = secure_nats
    async with Mesh(server.url, redis_server.url, prefix, transport, lease_s=1.0) as m:
        m.legacy_gate.clear()
        d = await m.decide("wf-11", ARGS, tool=LEGACY)
        key = m.key("wf-11", d)
        running = asyncio.create_task(m.call("wf-11", ARGS, d.data, tool=LEGACY))
        first = await _entry_when(m, key, lambda e: True)
        # Renewed past the end of the first lease, and still held by the running call.
        await _entry_when(m, key, lambda e: e.lease_until > first.lease_until + m.lease_s)

        retry = await m.call("wf-11", ARGS, d.data, tool=LEGACY)

        assert retry == ToolResult(ok=False, error=STEP_IN_PROGRESS)
        m.legacy_gate.set()
        assert await running == ToolResult(ok=True, result={"order": 1})
        assert m.legacy_runs == [ARGS]
        assert m.rejected() == {}


async def test_two_gateways_in_the_queue_group_given_one_step_concurrently_run_it_once(
    m2: Mesh,
) -> None:
    d = await m2.decide("wf-6", ARGS)

    results = await asyncio.gather(*(m2.call("wf-6", ARGS, d.data) for _ in range(24)))

    ran = [r for r in results if r.ok and not r.replayed]
    assert len(ran) == 1
    po_id = ran[0].result["po_id"]
    for r in results:
        assert (r.ok and r.result["po_id"] == po_id) or r.error == STEP_IN_PROGRESS, r
    assert [o.po_id for o in await m2.orders()] == [po_id]
    assert sum(g.ran[ERP_CREATE_PO] for g in m2.gateways) == 1
    # The queue group spread the calls over both gateways (all 24 on one: p = 2**-23).
    for g in m2.gateways:
        assert g.ran[ERP_CREATE_PO] + g.replayed[ERP_CREATE_PO] + g.in_progress[ERP_CREATE_PO]
    assert m2.rejected() == {}


async def test_concurrent_claims_of_one_step_leave_one_owner(m: Mesh, redis_server) -> None:
    d = await m.decide("wf-7", ARGS)
    now = time.time()
    other = aioredis.Redis.from_url(redis_server.url)
    try:
        ledgers = [m.ledger, Ledger(other, tenant=m.dep.tenant)]
        found = await asyncio.gather(
            *(
                ledgers[i % 2].begin(
                    Entry(
                        state="running",
                        workflow="wf-7",
                        step=1,
                        intent_hash=d.body.intent_hash,
                        tool=ERP_CREATE_PO,
                        idempotency_key="k",
                        decision_id=d.envelope.id,
                        gateway=f"gateway-{i % 2}",
                        call=f"call-{i}",
                        started_at=now,
                        lease_until=now + 60,
                    ),
                    idempotent=True,
                    may_run=True,
                )
                for i in range(20)
            )
        )
    finally:
        await other.aclose()
    assert sorted(found) == ["new"] + ["running"] * 19


async def test_an_expired_decision_gets_the_recorded_answer_but_runs_nothing(m: Mesh) -> None:
    d = await m.decide("wf-8", ARGS)
    first = await m.call("wf-8", ARGS, d.data)
    expired = _expired_copy(m, "wf-8", d.body)

    replay = await m.call("wf-8", ARGS, expired)
    assert replay == ToolResult(ok=True, result=first.result, replayed=True)

    d2 = await m.decide("wf-8", ARGS, step=2)
    refused = await m.call("wf-8", ARGS, _expired_copy(m, "wf-8", d2.body), step=2)
    assert "decision_expired" in refused.error
    assert len(await m.orders()) == 1
    assert m.rejected() == {"decision_expired": 1}


async def test_a_used_decision_whose_entry_was_removed_is_refused(m: Mesh) -> None:
    d = await m.decide("wf-9", ARGS)
    assert (await m.call("wf-9", ARGS, d.data)).ok
    # A person removed the entry, so the step may run again, but only by a fresh decision.
    await m.redis.delete(m.key("wf-9", d))

    result = await m.call("wf-9", ARGS, d.data)

    assert "decision_reused" in result.error
    assert len(await m.orders()) == 1
    assert m.rejected() == {"decision_reused": 1}


async def test_the_erp_executes_one_order_per_idempotency_key(m: Mesh) -> None:
    def ctx(step: int, key: str) -> ToolContext:
        return ToolContext(
            workflow="wf-10",
            agent=AGENT,
            step=step,
            decision_id="d",
            idempotency_key=key,
            key_prefix=m.dep.key_prefix,
            redis=m.redis,
        )

    order = Order(**ARGS)
    same = await asyncio.gather(*(create_purchase_order(order, ctx(1, "k1")) for _ in range(10)))
    other = await create_purchase_order(order, ctx(2, "k2"))
    assert len({placed.po_id for placed in same}) == 1
    assert [o.po_id for o in await m.orders()] == [same[0].po_id, other.po_id]


async def test_an_unreachable_erp_is_a_tool_error_retryable_only_under_an_idempotency_key() -> None:
    down = aioredis.Redis.from_url("redis://127.0.0.1:1")  # nothing listens on port 1

    def ctx(key: str) -> ToolContext:
        return ToolContext(
            workflow="wf",
            agent=AGENT,
            step=1,
            decision_id="d",
            idempotency_key=key,
            key_prefix="t-down",
            redis=down,
        )

    try:
        with pytest.raises(ToolError, match="the ERP is unreachable") as with_key:
            await create_purchase_order(Order(**ARGS), ctx("k"))
        with pytest.raises(ToolError) as without_key:
            await create_purchase_order(Order(**ARGS), ctx(""))
    finally:
        await down.aclose()
    assert with_key.value.retryable and not without_key.value.retryable


def _expired_copy(m: Mesh, workflow: str, decision: Decision) -> bytes:
    """The decision as governance would sign it had it expired a minute ago."""
    body = Decision(
        **{f: getattr(decision, f) for f in decision.__struct_fields__ if f != "expires_at"},
        expires_at=time.time() - 60,
    )
    _, data = m.governance.bus.codec.seal(
        m.governance.identity,
        subject=m.agent.subjects.decision(m.agent.identity.agent_id, workflow),
        body=body,
    )
    return data


async def _entry_when(m: Mesh, key: str, holds: Callable[[Entry], bool]) -> Entry:
    """The entry at ``key`` once it exists and ``holds``; polled, since nothing announces it."""
    async with asyncio.timeout(10):
        while True:
            entry = await m.ledger.entry(key)
            if entry is not None and holds(entry):
                return entry
            await asyncio.sleep(0.02)


async def test_a_refused_call_is_recorded_and_not_run_again(m: Mesh) -> None:
    bad = {**ARGS, "amount_usd": 0}
    d = await m.decide("wf-12", bad)

    first = await m.call("wf-12", bad, d.data)
    again = await m.call("wf-12", bad, d.data)

    assert first == ToolResult(
        ok=False, error=f"{ERP_CREATE_PO}: bad argument $.amount_usd = 0: Expected `float` > 0.0"
    )
    assert again == ToolResult(ok=False, error=first.error, replayed=True)
    assert await m.orders() == []


def test_the_lease_must_be_a_positive_number_of_seconds(redis_server) -> None:
    dep, issuer = deployment("nats://127.0.0.1:1", redis_server.url, "t-lease")
    for bad in (0, -1.0, math.inf, True, "30"):
        with pytest.raises(ConfigError, match="lease_s"):
            GatewayService(dep, issuer.identity("gateway-1", "gateway"), lease_s=bad)


class Flaky:
    """What the ``FLAKY`` tool does: fail with ``failures`` in turn, then place an order in
    the ERP."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self, order: Order, ctx: ToolContext) -> Placed:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return await create_purchase_order(order, ctx)


async def _call_failing(m: Mesh, workflow: str, *failures: Exception) -> tuple[Flaky, Delivery]:
    m.flaky = Flaky(*failures)
    return m.flaky, await m.decide(workflow, ARGS, tool=FLAKY)


async def test_a_tool_raising_an_unexpected_error_is_answered_at_once_and_recorded_failed(
    m: Mesh, redis_server, caplog: pytest.LogCaptureFixture
) -> None:
    secret = redis_server.url  # holds the deployment's Redis password
    flaky, d = await _call_failing(m, "wf-13", RuntimeError(f"lost {secret}"))

    first = await m.call("wf-13", ARGS, d.data, tool=FLAKY)
    again = await m.call("wf-13", ARGS, d.data, tool=FLAKY)

    assert not first.ok and not first.retryable and not first.replayed
    assert first.error.startswith(f"{FLAKY}: RuntimeError: lost "), first.error
    password = urlsplit(secret).password
    assert password and password not in first.error and ":***@" in first.error
    assert again == ToolResult(ok=False, error=first.error, replayed=True)
    assert flaky.calls == 1
    # The traceback is in the gateway's log, masked like the answer.
    assert "Traceback" in caplog.text and "RuntimeError: lost" in caplog.text
    assert password not in caplog.text
    found = await m.ledger.entry(m.key("wf-13", d))
    assert found is not None and (found.state, found.result) == ("done", first)
    stats = m.gateways[0].stats()
    assert (stats["failed"], stats["ran"]) == ({FLAKY: 1}, {})
    assert await m.orders() == []


async def test_a_tool_error_that_is_not_retryable_is_the_steps_answer(m: Mesh) -> None:
    flaky, d = await _call_failing(m, "wf-14", ToolError("vendor blocked"))

    first = await m.call("wf-14", ARGS, d.data, tool=FLAKY)
    again = await m.call("wf-14", ARGS, d.data, tool=FLAKY)

    assert first == ToolResult(ok=False, error=f"{FLAKY}: vendor blocked")
    assert again == ToolResult(ok=False, error=first.error, replayed=True)
    assert flaky.calls == 1
    assert m.gateways[0].failed == {FLAKY: 1}


async def test_a_retryable_tool_error_gives_the_step_back_and_the_next_call_runs_it_once(
    m: Mesh,
) -> None:
    flaky, d = await _call_failing(m, "wf-15", ToolError("ERP busy", retryable=True))

    failed = await m.call("wf-15", ARGS, d.data, tool=FLAKY)
    released = await m.ledger.entry(m.key("wf-15", d))
    retried = await m.call("wf-15", ARGS, d.data, tool=FLAKY)
    again = await m.call("wf-15", ARGS, d.data, tool=FLAKY)

    assert failed == ToolResult(ok=False, error=f"{FLAKY}: ERP busy", retryable=True)
    assert released is not None and (released.state, released.result) == ("retryable", failed)
    assert retried.ok and not retried.replayed, retried.error
    assert again == ToolResult(ok=True, result=retried.result, replayed=True)
    assert flaky.calls == 2
    assert [o.po_id for o in await m.orders()] == [retried.result["po_id"]]
    found = await m.ledger.entry(m.key("wf-15", d))
    assert found is not None and (found.state, found.attempts) == ("done", 2)
    assert (m.gateways[0].failed, m.gateways[0].ran) == ({FLAKY: 1}, {FLAKY: 1})
    assert m.rejected() == {}


async def test_a_retryable_failure_runs_nothing_for_an_expired_decision(m: Mesh) -> None:
    flaky, d = await _call_failing(m, "wf-16", ToolError("ERP busy", retryable=True))
    assert (await m.call("wf-16", ARGS, d.data, tool=FLAKY)).retryable

    refused = await m.call("wf-16", ARGS, _expired_copy(m, "wf-16", d.body), tool=FLAKY)

    assert "decision_expired" in refused.error
    assert flaky.calls == 1
