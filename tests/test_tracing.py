"""One workflow, one trace: spans of every actor that worked on a procurement workflow,
joined by the trace context in the envelopes, with the OpenTelemetry GenAI names; and the
metrics the same work records: tokens, cost, decisions by outcome, latencies."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from govmesh.agents import Outcome
from govmesh.bus import Bus, Delivery
from govmesh.governance._actor import GovernanceService
from govmesh.llm import ModelRequest, ModelResponse, SimulatedModel, SimulatedModelSettings

from _agents import MODEL, PRICES, mesh
from _deploy import Coordinator, deployment
from _shipping import POLICY, ROLE, Shipment, ship
from procurement.tools import create_purchase_order

ERP_CREATE_PO = create_purchase_order.name

ROOT = Path(__file__).parent.parent
TOOL = ship.name


@pytest.fixture(scope="module")
def spans(tracer_provider: TracerProvider) -> InMemorySpanExporter:
    """Every span this process records from now on."""
    exporter = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


class RecordingModel(SimulatedModel):
    """The simulated model, keeping every answer it gives."""

    def __init__(self, settings: SimulatedModelSettings, *, seed: int) -> None:
        super().__init__(settings, seed=seed)
        self.answers: list[ModelResponse] = []

    async def complete(self, request: ModelRequest) -> ModelResponse:
        answer = await super().complete(request)
        self.answers.append(answer)
        return answer


async def run_shipments(
    secure_nats, redis_server, prefix, tmp_path, model: SimulatedModel, requests
) -> dict[str, Outcome]:
    """Run each of ``requests`` (workflow, shipment, traceparent) through governance, the
    gateway, the state actor and a shipper thinking with ``model``; returns the outcomes by
    workflow."""
    async with mesh(secure_nats, redis_server, prefix, tmp_path, policy=POLICY, tools=[ship]) as m:
        await m.host(
            "shipper-1",
            "_shipping:Shipper",
            role=ROLE,
            capabilities=(TOOL,),
            model=lambda: model,
            prices=PRICES,
        )
        started = [
            await m.start(workflow, "shipper-1", shipment, trace=traceparent)
            for workflow, shipment, traceparent in requests
        ]
        outcomes = await asyncio.wait_for(asyncio.gather(*started), 30)
        await asyncio.sleep(0.3)  # the last snapshot's span ends after the outcome is sent
    return {workflow: o for (workflow, _, _), o in zip(requests, outcomes, strict=True)}


def _model(cls: type[SimulatedModel] = SimulatedModel) -> SimulatedModel:
    return cls(MODEL, seed=1)


async def test_one_workflow_is_one_trace_across_its_actors(
    spans, secure_nats, redis_server, prefix, tmp_path
) -> None:
    trace_id = uuid.uuid4().hex
    request = Shipment(item="monitors", vendor="Vendor_A", amount_usd=1200.0)
    outcomes = await run_shipments(
        secure_nats,
        redis_server,
        prefix,
        tmp_path,
        _model(),
        [("wf-traced", request, f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")],
    )
    assert outcomes["wf-traced"].result == "completed", outcomes

    ours = [s for s in spans.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    names = {s.name for s in ours}
    assert {
        "invoke_agent shipper-1",
        f"chat {MODEL.name}",
        "govmesh.decide",
        f"execute_tool {TOOL}",
        "govmesh.snapshot",
        "handle ToolIntent",
        "handle ToolCall",
    } <= names, names
    members = {s.attributes["govmesh.member"] for s in ours if s.name.startswith("handle ")}
    assert {"governance-1", "gateway-1", "state-1", "shipper-1"} <= members
    [chat] = [s for s in ours if s.name.startswith("chat ")]
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.provider.name"] == "govmesh.simulated"
    assert chat.attributes["gen_ai.request.model"] == MODEL.name
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0
    [tool] = [s for s in ours if s.name.startswith("execute_tool ")]
    assert tool.attributes["gen_ai.tool.name"] == TOOL
    assert tool.attributes["govmesh.tool.ok"] is True
    [decide] = [s for s in ours if s.name == "govmesh.decide"]
    assert decide.attributes["govmesh.decision.outcome"] == "allow"
    assert decide.attributes["govmesh.policy.hash"]
    # Parents are in the trace: the tool ran under the gateway's handling of the call, which
    # is a child of a span of the agent that sent it.
    by_id = {s.context.span_id: s for s in ours}
    handling = by_id[tool.parent.span_id]
    assert handling.name == "handle ToolCall"
    assert by_id[handling.parent.span_id].name == "invoke_agent shipper-1"
    [decide_handling] = [s for s in ours if s.name == "handle ToolIntent"]
    assert by_id[decide_handling.parent.span_id].name == "invoke_agent shipper-1"


async def test_a_workflow_records_tokens_cost_decisions_and_latencies(
    metric_reader, secure_nats, redis_server, prefix, tmp_path
) -> None:
    model = _model(RecordingModel)
    metric_reader.read()  # skip what earlier tests recorded
    outcomes = await run_shipments(
        secure_nats,
        redis_server,
        prefix,
        tmp_path,
        model,
        [
            ("wf-allowed", Shipment(item="desks", vendor="Vendor_A", amount_usd=900.0), ""),
            ("wf-denied", Shipment(item="desks", vendor="Vendor_Z", amount_usd=900.0), ""),
        ],
    )
    got = metric_reader.read()
    assert {w: o.result for w, o in outcomes.items()} == {
        "wf-allowed": "completed",
        "wf-denied": "denied",
    }
    answers = model.answers
    assert len(answers) >= 2  # each workflow thought at least once
    name = MODEL.name
    chat = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "govmesh.simulated",
        "gen_ai.request.model": name,
        "gen_ai.response.model": name,
    }
    tokens = "gen_ai.client.token.usage"
    assert got.total(tokens, {**chat, "gen_ai.token.type": "input"}) == sum(
        a.input_tokens for a in answers
    )
    assert got.total(tokens, {**chat, "gen_ai.token.type": "output"}) == sum(
        a.output_tokens for a in answers
    )
    assert got.count(tokens) == 2 * len(answers)
    price = PRICES[name]
    cost = sum(
        a.input_tokens * price.input_per_1k + a.output_tokens * price.output_per_1k for a in answers
    )
    assert got.total("govmesh.model.cost", chat) == pytest.approx(cost / 1000)
    assert got.count("gen_ai.client.operation.duration", chat) == len(answers)
    # One decision per workflow, counted by outcome, each with its latency.
    policy = {"govmesh.decision.source": "policy"}
    assert got.total("govmesh.decisions", {**policy, "govmesh.decision.outcome": "allow"}) == 1
    assert got.total("govmesh.decisions", {**policy, "govmesh.decision.outcome": "deny"}) == 1
    assert got.total("govmesh.decisions") == 2
    for outcome in ("allow", "deny"):
        where = {"govmesh.decision.outcome": outcome}
        assert got.count("govmesh.decision.duration", where) == 1
    # Only the allowed workflow ran its tool, once.
    assert got.count("gen_ai.execute_tool.duration", {"gen_ai.tool.name": TOOL}) == 1
    assert got.count("gen_ai.execute_tool.duration") == 1
    # Every member timed each message it handled; an agent that asks again (its retry on a
    # slow answer) is handled again, so at least one each.
    handled = "govmesh.handler.duration"
    assert got.count(handled, {"govmesh.message.kind": "ToolIntent"}) >= 2
    assert got.count(handled, {"govmesh.message.kind": "ToolCall"}) >= 1
    assert got.count(handled, {"govmesh.message.kind": "Outcome"}) == 2
    assert got.total("govmesh.security.rejections") == 0


async def test_each_decision_carries_its_own_intents_trace_when_decided_in_one_group(
    spans, secure_nats, redis_server, prefix, tmp_path
) -> None:
    from govmesh.governance.messages import Decision, ToolIntent

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "policies" / "procurement-agent-v2.yaml").read_text())
    governance = GovernanceService(
        dep, issuer.identity("governance-1", "governance"), policy_paths=[str(policy)]
    )
    agent = await Bus.connect(
        dep,
        issuer.identity(
            "procurement-1", "Procurement-Agent-v2", capabilities=(ERP_CREATE_PO,), budget_usd=1e6
        ),
    )
    coordinator = await Coordinator.connect(dep, issuer, ("procurement-1",))
    traces: dict[str, str] = {}
    decided: dict[str, str] = {}
    all_in = asyncio.Event()

    async def on_decision(d: Delivery) -> None:
        decided[d.body.intent_id] = d.envelope.trace
        if len(decided) == len(traces):
            all_in.set()

    try:
        await governance.start()
        await agent.subscribe(
            agent.subjects.decisions(agent.identity.agent_id), on_decision, accepts=Decision
        )
        await agent.flush()
        await coordinator.start(*(f"wf-group-{n}" for n in range(20)))
        for n in range(20):  # sent at once: later ones are decided in a group with earlier
            trace_id = uuid.uuid4().hex
            sent = await agent.publish(
                agent.subjects.intent("procurement-1"),
                ToolIntent(
                    tool=ERP_CREATE_PO,
                    args={"item": "monitors", "vendor": "Vendor_A", "amount_usd": 100.0 + n},
                    step=1,
                ),
                workflow=f"wf-group-{n}",
                trace=f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01",
            )
            traces[sent.id] = trace_id
        await asyncio.wait_for(all_in.wait(), 30)
    finally:
        await coordinator.close()
        await agent.close()
        await governance.close()

    assert governance.decider.round_trips < len(traces)  # some were decided together
    for intent_id, trace_id in traces.items():
        assert decided[intent_id].split("-")[1] == trace_id, intent_id
