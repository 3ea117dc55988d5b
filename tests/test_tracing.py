"""One workflow, one trace: spans of every actor that worked on a procurement workflow,
joined by the trace context in the envelopes, with the OpenTelemetry GenAI names."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from govmesh.agents import ProcurementAgent
from govmesh.agents.messages import PurchaseOutcome, PurchaseRequest
from govmesh.bus import Bus, Delivery
from govmesh.governance._actor import GovernanceService
from govmesh.llm import SimulatedModel
from govmesh.scenarios import load_scenario
from govmesh.state import StateService
from govmesh.tools import ERP_CREATE_PO, GatewayService

from _deploy import deployment

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """Every span this process records (one tracer provider per process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def test_one_procurement_workflow_is_one_trace_across_its_actors(
    spans, secure_nats, redis_server, prefix, tmp_path
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    scenario = load_scenario(ROOT / "scenarios" / "procurement.yaml")
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies" / "procurement-agent-v2.yaml").read_text())
    model = SimulatedModel(msgspec.structs.replace(scenario.model, error_probability=0.0), seed=1)
    services = [
        GovernanceService(
            dep, issuer.identity("governance-1", "governance"), policy_paths=[str(policy)]
        ),
        GatewayService(dep, issuer.identity("gateway-1", "gateway")),
        StateService(dep, issuer.identity("state-1", "state")),
        ProcurementAgent(
            dep,
            issuer.identity(
                "procurement-1",
                "Procurement-Agent-v2",
                capabilities=(ERP_CREATE_PO,),
                budget_usd=25_000,
            ),
            model=model,
            prices=dict(scenario.prices),
        ),
    ]
    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    outcomes: asyncio.Queue[PurchaseOutcome] = asyncio.Queue()

    async def on_outcome(d: Delivery) -> None:
        await outcomes.put(d.body)

    trace_id = uuid.uuid4().hex
    try:
        for service in services:
            await service.start()
        await coordinator.subscribe(
            coordinator.subjects.msg("coordinator-1"), on_outcome, accepts=PurchaseOutcome
        )
        await coordinator.flush()
        await coordinator.publish(
            coordinator.subjects.msg("procurement-1"),
            PurchaseRequest(item="monitors", vendor="Vendor_A", amount_usd=1200.0),
            workflow="wf-traced",
            trace=f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01",
        )
        outcome = await asyncio.wait_for(outcomes.get(), 30)
        assert outcome.result == "executed", outcome
        await asyncio.sleep(0.3)  # the last snapshot's span ends after the outcome is sent
    finally:
        await coordinator.close()
        for service in reversed(services):
            await service.close()

    ours = [s for s in spans.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    names = {s.name for s in ours}
    assert {
        "invoke_agent procurement-1",
        f"chat {scenario.model.name}",
        "govmesh.decide",
        f"execute_tool {ERP_CREATE_PO}",
        "govmesh.snapshot",
        "handle ToolIntent",
        "handle ToolCall",
    } <= names, names
    members = {s.attributes["govmesh.member"] for s in ours if s.name.startswith("handle ")}
    assert {"governance-1", "gateway-1", "state-1", "procurement-1"} <= members
    [chat] = [s for s in ours if s.name.startswith("chat ")]
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.provider.name"] == "govmesh.simulated"
    assert chat.attributes["gen_ai.request.model"] == scenario.model.name
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0
    [tool] = [s for s in ours if s.name.startswith("execute_tool ")]
    assert tool.attributes["gen_ai.tool.name"] == ERP_CREATE_PO
    assert tool.attributes["govmesh.tool.ok"] is True
    [decide] = [s for s in ours if s.name == "govmesh.decide"]
    assert decide.attributes["govmesh.decision.outcome"] == "allow"
    assert decide.attributes["govmesh.policy.hash"]
    # Parents are in the trace: the tool ran under the gateway's handling of the call, which
    # is a child of a span of the agent that sent it.
    by_id = {s.context.span_id: s for s in ours}
    handling = by_id[tool.parent.span_id]
    assert handling.name == "handle ToolCall"
    assert by_id[handling.parent.span_id].name == "invoke_agent procurement-1"
    [decide_handling] = [s for s in ours if s.name == "handle ToolIntent"]
    assert by_id[decide_handling.parent.span_id].name == "invoke_agent procurement-1"
