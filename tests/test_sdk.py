"""Agents written on the SDK, hosted by `AgentHost` on real servers: every governed call
decided by policy, waited for durably, run once, and its typed result handed back."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

import govmesh
from govmesh import ToolError
from govmesh.agents import AgentHost, RetryPolicy
from govmesh.errors import ConfigError
from govmesh.tools import GatewayService

import _shipping
from _agents import HANG_GUARD_S, mesh
from _shipping import POLICY, ROLE, Shipment, Shipped, ship

SHIPPER = "_shipping:Shipper"
TOOL = ship.name


@pytest.fixture(autouse=True)
def behaviour() -> _shipping.Behaviour:
    """A fresh behaviour of the test tool for each test."""
    _shipping.BEHAVIOUR = _shipping.Behaviour()
    return _shipping.BEHAVIOUR


@pytest.fixture
async def shipping(secure_nats, redis_server, prefix, tmp_path):
    """The services, with a shipper agent ``shipper-1``."""
    async with mesh(secure_nats, redis_server, prefix, tmp_path, policy=POLICY, tools=[ship]) as m:
        await m.host(
            "shipper-1",
            SHIPPER,
            role=ROLE,
            capabilities=(TOOL,),
            tool_retry=RetryPolicy(initial_s=0.01, maximum_attempts=3),
        )
        yield m


class Parcel(msgspec.Struct, frozen=True):
    """A payload no handler of the shipper takes."""

    weight_kg: float


def _order(amount: float, vendor: str = "Vendor_A") -> Shipment:
    return Shipment(item="monitors", vendor=vendor, amount_usd=amount)


async def test_each_governed_call_is_allowed_denied_approved_or_rejected_as_policy_says(
    shipping, behaviour
) -> None:
    m = shipping
    m.approve["wf-rejected"] = False
    runs = {
        "wf-allowed": _order(900.0),
        "wf-denied": _order(900.0, vendor="Vendor_Z"),
        "wf-approved": _order(6_000.0),
        "wf-rejected": _order(7_000.0),
    }
    got = dict(
        zip(
            runs,
            await asyncio.gather(*(m.run(w, "shipper-1", p) for w, p in runs.items())),
            strict=True,
        )
    )

    summary = {w: (o.result, o.first_decision) for w, o in got.items()}
    assert summary == {
        "wf-allowed": ("completed", "allow"),
        "wf-denied": ("denied", "deny"),
        "wf-approved": ("completed", "escalate"),
        "wf-rejected": ("rejected", "escalate"),
    }
    # The handler's typed result travels back as the tool returned it.
    allowed = msgspec.msgpack.decode(got["wf-allowed"].value, type=Shipped)
    approved = msgspec.msgpack.decode(got["wf-approved"].value, type=Shipped)
    assert {allowed.item, approved.item} == {"monitors"}
    assert sorted(s.tracking for s in behaviour.shipped.values()) == sorted(
        [allowed.tracking, approved.tracking]
    )
    assert got["wf-approved"].approved_by == "test-operator" and got["wf-approved"].approval_id
    assert got["wf-rejected"].approval_id and got["wf-rejected"].value == b""
    assert any("Vendor_Z" in r for r in got["wf-denied"].reasons), got["wf-denied"].reasons
    assert got["wf-allowed"].shown == {"tool": TOOL, "item": "monitors", "amount_usd": 900.0}
    assert all(o.model_calls == 1 for o in got.values())
    # Only what was allowed ran, each once.
    assert behaviour.effects == {("wf-allowed", 1): 1, ("wf-approved", 1): 1}


async def test_a_tool_raising_runtime_error_is_reported_to_its_agent_as_failed(
    shipping, behaviour
) -> None:
    behaviour.failures.append(RuntimeError("the depot's disk is full"))

    outcome = await shipping.run("wf-broken", "shipper-1", _order(900.0))

    assert (outcome.result, outcome.first_decision) == ("failed", "allow")
    assert outcome.reasons == (f"{TOOL}: RuntimeError: the depot's disk is full",)
    assert behaviour.calls == 1 and not behaviour.effects
    assert shipping.service(GatewayService).stats()["failed"] == {TOOL: 1}


async def test_a_retryable_tool_error_is_retried_and_the_call_takes_effect_once(
    shipping, behaviour
) -> None:
    behaviour.failures.append(ToolError("the depot is busy", retryable=True))

    outcome = await shipping.run("wf-busy", "shipper-1", _order(900.0))

    assert outcome.result == "completed", outcome.reasons
    assert behaviour.calls == 2
    assert behaviour.effects == {("wf-busy", 1): 1}


async def test_a_tool_that_keeps_failing_retryably_fails_after_the_policys_attempts(
    shipping, behaviour
) -> None:
    behaviour.failures.extend(ToolError(f"busy {n}", retryable=True) for n in range(10))

    outcome = await shipping.run("wf-always-busy", "shipper-1", _order(900.0))

    assert (outcome.result, outcome.reasons) == ("failed", (f"{TOOL}: busy 2",))
    assert behaviour.calls == 3 and not behaviour.effects


async def test_a_workflow_resumed_after_its_agent_dies_mid_call_repeats_no_step(
    shipping, behaviour
) -> None:
    m = shipping
    first = m.hosts["shipper-1"]
    behaviour.release = asyncio.Event()
    done = await m.start("wf-resumed", "shipper-1", _order(900.0))
    await asyncio.wait_for(behaviour.running.wait(), HANG_GUARD_S)
    # The agent's process goes away while the gateway runs its tool; what it knew is gone.
    await first.close()
    assert first.model.calls == 1  # type: ignore[attr-defined]
    del m.hosts["shipper-1"]
    second = await m.host("shipper-1", SHIPPER, role=ROLE, capabilities=(TOOL,))
    behaviour.release.set()

    outcome = await asyncio.wait_for(done, HANG_GUARD_S)

    assert (outcome.result, outcome.first_decision) == ("completed", "allow"), outcome.reasons
    assert outcome.model_calls == 1
    assert second.model.calls == 0, "the plan came from the journal"  # type: ignore[attr-defined]
    assert second.resumed == {"decided": 1}, second.resumed
    assert behaviour.effects == {("wf-resumed", 1): 1}
    assert msgspec.msgpack.decode(outcome.value, type=Shipped).tracking == "T-1"
    # Asked again, the agent answers from the outcome it kept, and does nothing.
    again = m.outcomes.pop("wf-resumed")
    assert again.result() == outcome
    assert await m.run("wf-resumed", "shipper-1", _order(900.0)) == outcome
    assert second.answered_again == 1 and behaviour.effects == {("wf-resumed", 1): 1}


async def test_a_workflow_waiting_for_a_person_resumes_in_a_new_agent_process(
    shipping, behaviour
) -> None:
    m = shipping
    m.hold.add("wf-held")
    done = await m.start("wf-held", "shipper-1", _order(6_000.0))
    await asyncio.wait_for(m.requests.get(), HANG_GUARD_S)
    await m.hosts.pop("shipper-1").close()
    second = await m.host("shipper-1", SHIPPER, role=ROLE, capabilities=(TOOL,))
    await m.answer("wf-held", approved=True)

    outcome = await asyncio.wait_for(done, HANG_GUARD_S)

    assert (outcome.result, outcome.first_decision) == ("completed", "escalate"), outcome
    assert outcome.approved_by == "test-operator" and outcome.model_calls == 1
    assert second.model.calls == 0  # type: ignore[attr-defined]
    assert behaviour.effects == {("wf-held", 1): 1}


async def test_a_durable_timer_wakes_its_workflow_after_the_agent_and_state_actor_restart(
    secure_nats, redis_server, prefix, tmp_path, behaviour
) -> None:
    from govmesh.config import Clock
    from govmesh.state import StateService

    two_days = 2 * 86_400.0
    # Two simulated days take four real seconds.
    clock = Clock(origin=time.time(), speed=two_days / 4)
    async with mesh(
        secure_nats, redis_server, prefix, tmp_path, policy=POLICY, tools=[ship], clock=clock
    ) as m:
        dep = m.dep
        first = await m.host(
            "shipper-1", SHIPPER, role=ROLE, capabilities=(TOOL,), options={"pickup_s": two_days}
        )
        done = await m.start("wf-wait", "shipper-1", _order(900.0))
        state = m.service(StateService)
        while not (pending := await state.timers.pending()):
            await asyncio.sleep(0.05)
        [timer] = pending
        assert timer.due_at - dep.clock.now() > two_days - 3_600  # two days from now
        # The agent and the state actor go away mid-wait; new ones take over.
        await m.hosts.pop("shipper-1").close()
        await state.close()
        m.services.remove(state)
        m.services.append(
            StateService(dep, m.issuer.identity("state-2", "state"), keyring=m.keyring)
        )
        await m.services[-1].start()
        second = await m.host(
            "shipper-1", SHIPPER, role=ROLE, capabilities=(TOOL,), options={"pickup_s": two_days}
        )

        outcome = await asyncio.wait_for(done, HANG_GUARD_S)

    assert outcome.result == "completed", outcome.reasons
    assert dep.clock.now() >= timer.due_at  # it did not go on before the two days were over
    assert first.model.calls == 1  # type: ignore[attr-defined]
    assert second.resumed == {"waiting": 1}
    assert second.timers == {"fired": 1, "missed": 0}  # woken by the timer itself
    assert second.model.calls == 0  # type: ignore[attr-defined]
    assert behaviour.effects == {("wf-wait", 1): 1}


@pytest.fixture
async def desk(shipping):
    """The services with a shipper, and a desk ``desk-1`` that asks it."""
    await shipping.host("desk-1", "_shipping:Desk", role="Desk")
    return shipping


async def test_an_agent_asks_another_and_gets_its_typed_result_and_governance_facts(
    desk, behaviour
) -> None:
    m = desk
    m.approve["wf-ask-rejected"] = False
    agents = ("shipper-1",)

    allowed = await m.run("wf-ask", "desk-1", _order(900.0), agents=agents)
    rejected = await m.run("wf-ask-rejected", "desk-1", _order(7_000.0), agents=agents)

    assert (allowed.result, allowed.first_decision) == ("completed", "allow")
    assert msgspec.msgpack.decode(allowed.value, type=Shipped).item == "monitors"
    # The desk's note and the shipper's plan.
    assert allowed.model_calls == 2
    assert allowed.shown == {"tool": TOOL, "item": "monitors", "amount_usd": 900.0}
    assert (rejected.result, rejected.first_decision) == ("rejected", "escalate")
    assert rejected.approval_id and rejected.model_calls == 2
    assert behaviour.effects == {("wf-ask", 1): 1}


async def test_asking_an_agent_the_deployment_does_not_have_fails_at_once_naming_it(
    shipping,
) -> None:
    await shipping.host(
        "desk-9",
        "_shipping:Desk",
        role="Desk",
        options={"shipper": "shipper-9"},
        peers=("desk-9", "shipper-1"),
    )

    outcome = await shipping.run("wf-nobody", "desk-9", _order(900.0))

    assert outcome.result == "failed"
    assert "'shipper-9' is not an agent of this deployment" in outcome.reasons[0]
    assert "['desk-9', 'shipper-1']" in outcome.reasons[0]


async def test_an_asking_agent_restarted_mid_ask_gets_the_answer_without_asking_twice(
    desk, behaviour
) -> None:
    m = desk
    behaviour.release = asyncio.Event()
    done = await m.start("wf-ask-restart", "desk-1", _order(900.0), agents=("shipper-1",))
    await asyncio.wait_for(behaviour.running.wait(), HANG_GUARD_S)
    await m.hosts.pop("desk-1").close()
    second = await m.host("desk-1", "_shipping:Desk", role="Desk")
    behaviour.release.set()

    outcome = await asyncio.wait_for(done, HANG_GUARD_S)

    assert outcome.result == "completed", outcome.reasons
    assert outcome.model_calls == 2
    assert second.model.calls == 0  # type: ignore[attr-defined]
    assert second.resumed == {"thought": 1}
    assert m.hosts["shipper-1"].model.calls == 1  # type: ignore[attr-defined]
    assert behaviour.calls == 1 and behaviour.effects == {("wf-ask-restart", 1): 1}


async def test_a_part_sent_without_waiting_ends_before_the_workflow_is_told_and_counts_in_it(
    shipping, behaviour
) -> None:
    m = shipping
    await m.host("dispatcher-1", "_shipping:Dispatcher", role="Dispatcher")
    agents = ("shipper-1",)

    sent = await m.run("wf-send", "dispatcher-1", _order(900.0), agents=agents)
    denied = await m.run("wf-send-denied", "dispatcher-1", _order(900.0, "Vendor_C"), agents=agents)

    assert sent.result == "completed", sent.reasons
    assert msgspec.msgpack.decode(sent.value, type=str) == "dispatched"
    # The dispatcher's note and the shipper's plan, and the shipper's governed call.
    assert sent.model_calls == 2
    assert (sent.first_decision, sent.shown["tool"]) == ("allow", TOOL)
    assert behaviour.effects == {("wf-send", 1): 1}
    # How a sent part ended does not end the workflow that sent it; its facts are in it.
    assert (denied.result, denied.first_decision, denied.model_calls) == ("completed", "deny", 2)


async def test_a_call_the_agents_token_grants_no_capability_for_fails_at_once_saying_so(
    shipping, behaviour
) -> None:
    await shipping.host("shipper-2", SHIPPER, role=ROLE, capabilities=())

    outcome = await shipping.run("wf-no-capability", "shipper-2", _order(900.0))

    assert (outcome.result, outcome.first_decision) == ("failed", "")
    assert len(outcome.reasons) == 1 and "shipper-2 has no capability" in outcome.reasons[0]
    assert repr(TOOL) in outcome.reasons[0]
    assert behaviour.calls == 0 and not shipping.service(GatewayService).stats()["ran"]


async def test_a_handler_that_raises_fails_its_workflow_with_the_error(shipping) -> None:
    await shipping.host("clumsy-1", "_shipping:Clumsy", role=ROLE)

    outcome = await shipping.run("wf-bug", "clumsy-1", _order(900.0))

    assert (outcome.result, outcome.reasons) == ("failed", ("ValueError: cannot ship 'monitors'",))


async def test_a_start_of_an_unknown_kind_or_a_bad_payload_fails_naming_what_is_wrong(
    shipping,
) -> None:
    unknown = await shipping.run("wf-unknown", "shipper-1", Parcel(weight_kg=2.0))
    bad = await shipping.run("wf-bad", "shipper-1", Parcel(weight_kg=2.0), kind="Shipment")

    assert unknown.result == bad.result == "failed"
    assert unknown.reasons == (
        "shipper-1 has no handler of kind 'Parcel'; it handles ['Shipment']",
    )
    assert bad.reasons == ("Shipment: Object missing required field `item`",)


async def test_a_workflow_whose_model_spend_reaches_its_cap_halts_with_its_state_saved(
    shipping,
) -> None:
    from govmesh.bus import Bus
    from govmesh.forecasting import BudgetCaps
    from govmesh.state.messages import SnapshotQuery, SnapshotReply

    from _agents import MODEL, PRICES, model

    m = shipping
    looping = model(msgspec.structs.replace(MODEL, error_probability=1.0))
    await m.host(
        "shipper-2",
        SHIPPER,
        role=ROLE,
        capabilities=(TOOL,),
        model=looping,
        prices=PRICES,
        budget=BudgetCaps(workflow_usd=0.05, soft_threshold=None),
    )

    outcome = await m.run("wf-spent", "shipper-2", _order(900.0))

    assert outcome.result == "halted" and "cap" in outcome.reasons[0], outcome
    assert outcome.first_decision == "" and outcome.model_calls > 0
    assert m.hosts["shipper-2"].model.calls == outcome.model_calls  # type: ignore[attr-defined]
    # Only the agent itself may read its snapshots: ask as the agent.
    async with await Bus.connect(m.dep, m.issuer.identity("shipper-2", ROLE)) as bus:
        reply = await bus.request(
            bus.subjects.ctl("state"),
            SnapshotQuery(workflow="wf-spent", agent="shipper-2"),
            accepts=SnapshotReply,
        )
    goal = reply.body.snapshot.goal
    assert (goal["phase"], goal["calls"]) == ("halted", outcome.model_calls)
    assert goal["reason"] == outcome.reasons[0]


def test_an_agent_class_with_a_bad_handler_is_refused_when_defined() -> None:
    with pytest.raises(ConfigError, match=r"handler .*Untyped.go must be \(self, wf"):

        class Untyped(govmesh.Agent):
            @govmesh.handler
            async def go(self, wf, payload):  # type: ignore[no-untyped-def]
                return None

    with pytest.raises(ConfigError, match="a and b both handle kind 'Shipment'"):

        class Twice(govmesh.Agent):
            @govmesh.handler
            async def a(self, wf: govmesh.Workflow, s: Shipment) -> None:
                return None

            @govmesh.handler
            async def b(self, wf: govmesh.Workflow, s: Shipment) -> None:
                return None

    class Named(govmesh.Agent):
        tools = (ship,)

        @govmesh.handler(kind="ship-it")
        async def a(self, wf: govmesh.Workflow, s: Shipment) -> None:
            return None

    assert list(Named.handlers()) == ["ship-it"]
    assert Named.role == "Named" and Named.capabilities() == (TOOL,)


def test_an_agent_host_names_what_it_cannot_host(nats_server, redis_server, prefix) -> None:
    from _agents import model
    from _deploy import deployment

    dep, issuer = deployment(nats_server.url, redis_server.url, prefix)
    identity = issuer.identity("a-1", ROLE)
    for path, error in (
        ("_shipping:Nobody", "'_shipping' has no 'Nobody'"),
        ("_shipping:Shipment", "is <class '_shipping.Shipment'>, not a govmesh.Agent class"),
        ("_shipping:Shipper", r"options \{'speed': 3\}: .*unexpected keyword argument 'speed'"),
    ):
        with pytest.raises(ConfigError, match=error):
            AgentHost(dep, identity, agent=path, options={"speed": 3}, model=model())


def test_a_retry_policy_names_the_figure_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"maximum_attempts .* got 0"):
        RetryPolicy(maximum_attempts=0)
    with pytest.raises(ConfigError, match=r"backoff .* got 0.5"):
        RetryPolicy(backoff=0.5)
    assert [RetryPolicy(initial_s=1, maximum_s=5).delay(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]


async def test_a_handler_that_catches_a_denial_completes_with_what_it_returns(
    shipping, behaviour
) -> None:
    await shipping.host("careful-1", "_shipping:Careful", role=ROLE, capabilities=(TOOL,))

    outcome = await shipping.run("wf-careful", "careful-1", _order(900.0, vendor="Vendor_Z"))

    assert (outcome.result, outcome.first_decision) == ("completed", "deny")
    assert msgspec.msgpack.decode(outcome.value, type=Shipped).tracking == "none"
    assert not behaviour.effects


async def test_state_over_the_snapshot_limit_fails_the_workflow_naming_the_limit(shipping) -> None:
    await shipping.host(
        "careful-2", "_shipping:Careful", role=ROLE, capabilities=(TOOL,), options={"notes": 12_000}
    )

    outcome = await shipping.run("wf-notes", "careful-2", _order(900.0))

    assert outcome.result == "failed"
    assert outcome.reasons[0].startswith("StateError: goal state of wf-notes/careful-2 is 12,")


async def test_a_tool_call_the_model_asks_for_is_made_by_the_handler_governed(
    secure_nats, redis_server, prefix, tmp_path, behaviour
) -> None:
    import functools
    import json

    from govmesh.forecasting import Price
    from govmesh.llm import OpenAISettings, model_of

    from _model_servers import ScriptedApi, completion

    def asks(vendor: str) -> dict[str, object]:
        args = {"item": "monitors", "vendor": vendor, "amount_usd": 1200.0}
        return completion(
            None, tool_calls=(("test_ship", json.dumps(args)),), finish_reason="tool_calls"
        )

    prices = {"local-model": Price(input_per_1k=0.001, output_per_1k=0.002)}
    async with (
        ScriptedApi() as api,
        mesh(
            secure_nats, redis_server, prefix, tmp_path, policy=POLICY, tools=[ship], prices=prices
        ) as m,
    ):
        api.reply(asks("Vendor_A"))
        api.reply(asks("Vendor_Z"))
        settings = OpenAISettings(model="local-model", base_url=f"{api.url}/v1", api_key_env="")
        await m.host(
            "planner-1",
            "_shipping:Planner",
            role=ROLE,
            capabilities=(TOOL,),
            model=functools.partial(model_of, settings, seed=1),
            prices=prices,
        )
        allowed = await m.run("wf-asked", "planner-1", _order(0.0))
        denied = await m.run("wf-asked-z", "planner-1", _order(0.0))

    [offered] = api.requests[0].body["tools"]
    assert offered["function"]["name"] == "test_ship"
    assert "amount_usd" in offered["function"]["parameters"]["properties"]
    assert (allowed.result, allowed.first_decision) == ("completed", "allow")
    assert msgspec.msgpack.decode(allowed.value, type=list[Shipped])[0].item == "monitors"
    # The model only asked: policy denied the call to a vendor it does not allow.
    assert (denied.result, denied.first_decision) == ("denied", "deny")
    assert behaviour.calls == 1


async def test_act_makes_each_call_the_model_asks_for_governed_and_gives_it_the_results(
    secure_nats, redis_server, prefix, tmp_path, behaviour
) -> None:
    import functools
    import json

    from govmesh.forecasting import Price
    from govmesh.llm import OpenAISettings, model_of

    from _model_servers import ScriptedApi, completion

    def asks(*calls: tuple[str, dict[str, object]]) -> dict[str, object]:
        wire = tuple((name, json.dumps(args)) for name, args in calls)
        return completion(None, tool_calls=wire, finish_reason="tool_calls")

    good = {"item": "monitors", "vendor": "Vendor_A", "amount_usd": 1200.0}
    prices = {"local-model": Price(input_per_1k=0.001, output_per_1k=0.002)}
    settings = OpenAISettings(model="local-model", base_url="", api_key_env="")
    async with (
        ScriptedApi() as api,
        mesh(
            secure_nats, redis_server, prefix, tmp_path, policy=POLICY, tools=[ship], prices=prices
        ) as m,
    ):
        settings = msgspec.structs.replace(settings, base_url=f"{api.url}/v1")
        model = functools.partial(model_of, settings, seed=1)
        for agent, tell in (("shipper-act", False), ("shipper-told", True)):
            await m.host(
                agent,
                "_shipping:Operator",
                role=ROLE,
                capabilities=(TOOL,),
                model=model,
                prices=prices,
                options={"tell_failures": tell},
            )
        # A good call, then a call with a field missing and one of a tool not offered,
        # then an answer.
        api.reply(asks(("test_ship", good)))
        api.reply(asks(("test_ship", {"item": "desks"}), ("test_fly", {"to": "Mars"})))
        api.reply(completion("Shipped the monitors."))
        shipped = await m.run("wf-act", "shipper-act", _order(0.0))
        seen = len(api.requests)
        # A call policy denies, told to the model, which then answers.
        api.reply(asks(("test_ship", {**good, "vendor": "Vendor_Z"})))
        api.reply(completion("Vendor_Z is not allowed."))
        told = await m.run("wf-act-told", "shipper-told", _order(0.0))
        # The same call raises Denied where the agent does not tell the model.
        api.reply(asks(("test_ship", {**good, "vendor": "Vendor_Z"})))
        denied = await m.run("wf-act-denied", "shipper-act", _order(0.0))

    assert (shipped.result, shipped.first_decision) == ("completed", "allow")
    assert msgspec.msgpack.decode(shipped.value, type=str) == "Shipped the monitors."
    assert behaviour.calls == 1  # neither wrong call reached the tool
    second, third = (api.requests[i].body["messages"] for i in (1, 2))
    assert second[0] == {
        "role": "system",
        "content": "You ship things with the tools you are given.",
    }
    asked, result = second[2], second[3]
    assert asked["role"] == "assistant" and asked["tool_calls"][0]["id"] == "call_0"
    assert asked["content"] is None  # a turn of tool calls alone, as OpenAI documents it
    assert json.loads(asked["tool_calls"][0]["function"]["arguments"]) == good
    assert (result["role"], result["tool_call_id"]) == ("tool", "call_0")
    assert json.loads(result["content"]) == {"tracking": "T-1", "item": "monitors"}
    missing, unknown = third[-2:]
    assert missing["tool_call_id"] == "call_0" and "vendor" in missing["content"]
    assert unknown["tool_call_id"] == "call_1"
    assert unknown["content"] == "no tool 'test_fly'; the tools are: test.ship"

    assert (told.result, told.first_decision) == ("completed", "deny")
    assert msgspec.msgpack.decode(told.value, type=str) == "Vendor_Z is not allowed."
    refusal = api.requests[seen + 1].body["messages"][-1]
    assert refusal["role"] == "tool" and refusal["content"].startswith("denied: ")
    assert (denied.result, denied.first_decision) == ("denied", "deny")
    assert len(api.requests) == seen + 3  # the denied workflow asked the model once
