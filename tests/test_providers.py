"""The OpenAI-compatible and Anthropic providers over the official clients, against a local
HTTP server speaking each API's wire format (no network): usage as each API reports it,
structured output and tool calls, and retries made by govmesh, each attempt reserved,
counted and priced."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import redis.asyncio as aioredis

from govmesh.agents._base import AgentService, RetryPolicy
from govmesh.bus import Bus, Delivery
from govmesh.errors import ConfigError, ModelError
from govmesh.forecasting import BudgetQuery, BudgetReport, BudgetService, Price, Usage
from govmesh.llm import (
    AnthropicModel,
    AnthropicSettings,
    Message,
    ModelRequest,
    OpenAIModel,
    OpenAISettings,
    ToolCall,
    ToolDef,
    prompt_bytes,
)
from govmesh.reservations import BudgetCaps, ReservationBook

from _deploy import deployment
from _model_servers import ScriptedApi, anthropic_error, completion, message

KEY_ENV = "GOVMESH_TEST_MODEL_KEY"
KEY = "sk-test-0123456789"
PRICE = Price(input_per_1k=3.0, output_per_1k=15.0, cache_read_per_1k=0.3, cache_write_per_1k=3.75)
VENDOR = {
    "type": "object",
    "properties": {"vendor": {"type": "string"}, "amount": {"type": "number"}},
    "required": ["vendor", "amount"],
}
ORDER = ToolDef(
    name="erp.create_po",
    description="Create a purchase order.",
    parameters={"type": "object", "properties": {"amount": {"type": "number"}}},
)


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def _anthropic(api: ScriptedApi, **settings: object) -> AnthropicModel:
    return AnthropicModel(
        AnthropicSettings(model="claude-test", base_url=api.url, api_key_env=KEY_ENV, **settings)  # type: ignore[arg-type]
    )


def _openai(api: ScriptedApi, **settings: object) -> OpenAIModel:
    return OpenAIModel(
        OpenAISettings(
            model="local-model", base_url=f"{api.url}/v1", api_key_env=KEY_ENV, **settings
        )  # type: ignore[arg-type]
    )


def _request(prompt: str = "Which vendor?", **fields: object) -> ModelRequest:
    return ModelRequest(prompt=prompt, max_tokens=64, key="wf:a:plan", **fields)  # type: ignore[arg-type]


async def test_anthropic_usage_with_cache_tokens_is_reported_as_the_api_counts_it(key) -> None:
    async with ScriptedApi() as api:
        api.reply(
            message("Acme.", input_tokens=40, output_tokens=9, cache_read=100, cache_write=20)
        )
        api.reply(message("Zenith.", input_tokens=40, output_tokens=30, thinking=21))
        model = _anthropic(api)
        try:
            answer = await model.complete(_request(system="You buy things."))
            thought = await model.complete(_request())
        finally:
            await model.close()
    seen, _ = api.requests
    sent = seen.headers.get("x-api-key") or seen.headers["authorization"].removeprefix("Bearer ")
    assert sent == key
    assert seen.body["system"] == "You buy things."
    assert seen.body["messages"] == [{"role": "user", "content": "Which vendor?"}]
    assert seen.body["max_tokens"] == 64 and seen.body["model"] == "claude-test"
    assert answer.text == "Acme." and answer.stop_reason == "end_turn"
    assert (answer.input_tokens, answer.output_tokens) == (40, 9)
    assert (answer.cache_read_tokens, answer.cache_write_tokens) == (100, 20)
    assert answer.prompt_tokens == 160
    # Thinking is within output_tokens; govmesh counts it apart, so each is priced once.
    assert (thought.output_tokens, thought.reasoning_tokens) == (9, 21)


async def test_anthropic_answers_a_schema_through_a_forced_tool_and_returns_tool_calls_unmade(
    key,
) -> None:
    async with ScriptedApi() as api:
        api.reply(message(tool_uses=(("govmesh_answer", {"vendor": "acme", "amount": 5}),)))
        api.reply(message(tool_uses=(("erp_create_po", {"amount": 5}),), stop_reason="tool_use"))
        model = _anthropic(api)
        try:
            structured = await model.complete(_request(schema=VENDOR))
            asked = await model.complete(_request(tools=(ORDER,), schema=VENDOR))
        finally:
            await model.close()
    first, second = api.requests
    assert first.body["tool_choice"] == {"type": "tool", "name": "govmesh_answer"}
    assert first.body["tools"][0]["input_schema"] == VENDOR
    assert json.loads(structured.text) == {"vendor": "acme", "amount": 5}
    # With tools of its own the model may choose one; the dotted name is spelt for the API.
    assert second.body["tool_choice"] == {"type": "any"}
    assert [t["name"] for t in second.body["tools"]] == ["erp_create_po", "govmesh_answer"]
    [call] = asked.tool_calls
    assert (call.name, call.args, call.id) == ("erp.create_po", {"amount": 5}, "toolu_0")
    assert asked.stop_reason == "tool_use" and asked.text == ""


def _tool_chat() -> tuple[Message, ...]:
    """A chat where the model asked for two calls, got one result and one refusal, and the
    user said more."""
    asked = (
        ToolCall(name="erp.create_po", args={"amount": 5}, id="c1"),
        ToolCall(name="erp.create_po", args={"amount": 9000}, id="c2"),
    )
    return (
        Message(role="user", content="Order from acme."),
        Message(role="assistant", content="Ordering.", tool_calls=asked),
        Message.result(asked[0], {"po": "PO-1"}),
        Message.result(asked[1], "denied: over the limit", error=True),
        Message(role="user", content="And now?"),
    )


async def test_tool_results_go_back_to_each_api_in_its_own_form(key) -> None:
    chat = _tool_chat()
    async with ScriptedApi() as api:
        api.reply(message("Done."))
        api.reply(completion("Done."))
        anthropic, openai = _anthropic(api), _openai(api)
        try:
            await anthropic.complete(
                ModelRequest(messages=chat, tools=(ORDER,), max_tokens=64, key="wf:a:1")
            )
            await openai.complete(
                ModelRequest(messages=chat, tools=(ORDER,), max_tokens=64, key="wf:a:1")
            )
        finally:
            await anthropic.close()
            await openai.close()
    # Anthropic: tool_use blocks in the assistant turn; the results, then the user's text,
    # in one user turn, since turns alternate.
    assert api.requests[0].body["messages"] == [
        {"role": "user", "content": "Order from acme."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Ordering."},
                {"type": "tool_use", "id": "c1", "name": "erp_create_po", "input": {"amount": 5}},
                {
                    "type": "tool_use",
                    "id": "c2",
                    "name": "erp_create_po",
                    "input": {"amount": 9000},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "c1",
                    "content": '{"po": "PO-1"}',
                    "is_error": False,
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "c2",
                    "content": "denied: over the limit",
                    "is_error": True,
                },
                {"type": "text", "text": "And now?"},
            ],
        },
    ]
    # OpenAI: the calls on the assistant message, a "tool" message answering each by id.
    sent = api.requests[1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool", "user"]
    assert sent[1]["tool_calls"][1] == {
        "id": "c2",
        "type": "function",
        "function": {"name": "erp_create_po", "arguments": '{"amount": 9000}'},
    }
    assert [(m["tool_call_id"], m["content"]) for m in sent[2:4]] == [
        ("c1", '{"po": "PO-1"}'),
        ("c2", "denied: over the limit"),
    ]


def test_a_chat_whose_tool_results_do_not_answer_its_calls_is_refused_naming_the_turn() -> None:
    chat = _tool_chat()
    stray = Message.result(ToolCall(name="erp.create_po", id="c9"), "{}")
    unnamed = Message(role="assistant", tool_calls=(ToolCall(name="erp.create_po"),))
    cases = [
        ((*chat[:3], chat[4]), "call 'c2' of messages[1] has no result before messages[3]"),
        ((*chat, stray), "messages[5] is the result of call 'c9'"),
        ((*chat[:3], chat[2]), "messages[3] is the result of call 'c1'"),
        ((chat[0], unnamed), "messages[1] asks for 'erp.create_po' without an id"),
        (chat[:2], "call 'c1' of messages[1] has no result"),
    ]
    for messages, problem in cases:
        with pytest.raises(ConfigError, match=re.escape(problem)):
            ModelRequest(messages=messages, max_tokens=8, key="k")


def test_the_prompt_bound_counts_the_tool_calls_and_results_sent_back() -> None:
    chat = _tool_chat()
    # The same text with no calls: results said as the user, a role of as many bytes.
    bare = tuple(
        Message(role="user" if m.role == "tool" else m.role, content=m.content) for m in chat
    )
    with_tools = prompt_bytes(ModelRequest(messages=chat, max_tokens=8, key="k"))
    without = prompt_bytes(ModelRequest(messages=bare, max_tokens=8, key="k"))
    sent = sum(len(c.id) + len(c.name) + len(json.dumps(c.args)) for c in chat[1].tool_calls)
    assert with_tools - without == sent + 2 * (2 + len("erp.create_po"))


async def test_openai_usage_splits_cached_and_reasoning_tokens_so_each_is_priced_once(key) -> None:
    async with ScriptedApi() as api:
        api.reply(
            completion(
                '{"vendor": "acme", "amount": 5}',
                prompt_tokens=30,
                completion_tokens=20,
                cached=10,
                reasoning=5,
            )
        )
        api.reply(
            completion(
                None, tool_calls=(("erp_create_po", '{"amount": 5}'),), finish_reason="tool_calls"
            )
        )
        model = _openai(api)
        try:
            chat = (
                Message(role="user", content="Which vendor?"),
                Message(role="assistant", content="Acme or Zenith."),
                Message(role="user", content="Pick one."),
            )
            answer = await model.complete(
                ModelRequest(
                    messages=chat, system="Be brief.", schema=VENDOR, max_tokens=64, key="k"
                )
            )
            asked = await model.complete(_request(tools=(ORDER,)))
        finally:
            await model.close()
    first, second = api.requests
    assert first.path == "/v1/chat/completions"
    assert first.headers["authorization"] == f"Bearer {key}"
    assert [m["role"] for m in first.body["messages"]] == ["system", "user", "assistant", "user"]
    assert first.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": VENDOR},
    }
    assert first.body["max_tokens"] == 64
    assert (answer.input_tokens, answer.cache_read_tokens) == (20, 10)
    assert (answer.output_tokens, answer.reasoning_tokens) == (15, 5)
    assert answer.stop_reason == "stop" and answer.model == "local-model"
    assert second.body["tools"][0]["function"]["name"] == "erp_create_po"
    [call] = asked.tool_calls
    assert (call.name, call.args) == ("erp.create_po", {"amount": 5})
    assert asked.stop_reason == "tool_calls"


async def test_llama_cpp_python_servers_are_asked_for_json_with_a_schema_their_way(key) -> None:
    async with ScriptedApi() as api:
        api.reply(completion('{"vendor": "acme", "amount": 1}'))
        model = _openai(api, response_format="json_object", token_limit="max_completion_tokens")
        try:
            await model.complete(_request(schema=VENDOR))
        finally:
            await model.close()
    [seen] = api.requests
    assert seen.body["response_format"] == {"type": "json_object", "schema": VENDOR}
    assert seen.body["max_completion_tokens"] == 64 and "max_tokens" not in seen.body


async def test_a_slow_answer_is_a_retryable_timeout(key) -> None:
    async with ScriptedApi() as api:
        api.reply(completion("late"), delay_s=1.0)
        model = _openai(api, timeout_s=0.2)
        try:
            with pytest.raises(ModelError) as caught:
                await model.complete(_request())
        finally:
            await model.close()
    assert caught.value.retryable and caught.value.kind == "timeout"


async def test_a_missing_key_variable_is_a_clear_error_when_the_model_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"api_key_env '{KEY_ENV}' is not set"):
        AnthropicModel(AnthropicSettings(model="claude-test", api_key_env=KEY_ENV))
    with pytest.raises(ConfigError, match=f"api_key_env '{KEY_ENV}' is not set"):
        OpenAIModel(OpenAISettings(model="gpt-test", api_key_env=KEY_ENV))
    # A local server that takes no key needs no variable.
    await OpenAIModel(
        OpenAISettings(model="local", base_url="http://127.0.0.1:1/v1", api_key_env="")
    ).close()


class _Rig:
    """An agent thinking with ``model`` under caps, the budget actor, a listener of the
    usage events the agent sends and a coordinator who asks the budget actor for reports."""

    def __init__(
        self, agent: AgentService, budget: BudgetService, listener: Bus, asker: Bus
    ) -> None:
        self.agent, self.budget, self.listener, self.asker = agent, budget, listener, asker
        self.usage: list[Usage] = []

    async def report(self, workflow: str, calls: int) -> BudgetReport:
        want = BudgetQuery(workflows=(workflow,), detail=True)
        for _ in range(200):  # usage events are asynchronous
            reply = await self.asker.request(
                self.asker.subjects.ctl("budget"), want, accepts=BudgetReport
            )
            report: BudgetReport = reply.body
            if report.calls >= calls:
                return report
            await asyncio.sleep(0.02)
        raise AssertionError(f"the budget actor counted {report.calls} calls, not {calls}")


async def _rig(secure_nats, redis_server, prefix, model) -> _Rig:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    agent = AgentService(
        dep,
        issuer.identity("thinker-1", "agent"),
        model=model,
        prices={model.model: PRICE},
        budget=BudgetCaps(workflow_usd=100.0, soft_threshold=None),
        model_retry=RetryPolicy(initial_s=0.01, maximum_attempts=4),
    )
    budget = BudgetService(dep, issuer.identity("budget-1", "budget"), prices={model.model: PRICE})
    listener = await Bus.connect(dep, issuer.identity("budget-2", "budget"))
    asker = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    rig = _Rig(agent, budget, listener, asker)

    async def on_usage(d: Delivery) -> None:
        rig.usage.append(d.body)

    await budget.start()
    await agent.start()
    await listener.subscribe(listener.subjects.all("usage"), on_usage, accepts=Usage)
    await listener.flush()
    return rig


async def _close(rig: _Rig) -> None:
    await rig.asker.close()
    await rig.listener.close()
    await rig.agent.close()
    await rig.budget.close()


async def test_a_rate_limit_and_an_overload_are_retried_each_attempt_reserved_counted_and_priced(
    secure_nats, redis_server, prefix, key
) -> None:
    async with ScriptedApi() as api:
        api.reply(
            anthropic_error("rate_limit_error", "slow down"),
            status=429,
            headers={"retry-after": "1"},
        )
        api.reply(anthropic_error("overloaded_error", "Overloaded"), status=529)
        api.reply(
            message("Acme.", input_tokens=40, output_tokens=9, cache_read=100, cache_write=20)
        )
        rig = await _rig(secure_nats, redis_server, prefix, _anthropic(api))
        try:
            answer = await rig.agent.think("wf-retry", "Which vendor?", key="plan")
            report = await rig.report("wf-retry", calls=3)
        finally:
            await _close(rig)
    assert (answer.text, answer.retries) == ("Acme.", 2)
    assert len(api.requests) == 3
    # The backoff alone is 10 ms: the wait is the server's retry-after.
    assert api.requests[1].at - api.requests[0].at >= 1.0
    assert [(u.error, u.failure) for u in rig.usage] == [
        (True, "rate_limited"),
        (True, "server_error"),
        (False, ""),
    ]
    assert all(u.reservation for u in rig.usage)
    assert len({u.reservation for u in rig.usage}) == 3  # each attempt reserved its own
    cost = PRICE.cost(40, 9, cache_read_tokens=100, cache_write_tokens=20)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        settled, reserved = await ReservationBook(
            client, rig.agent.deployment.key_prefix, BudgetCaps()
        ).spent("wf-retry")
    finally:
        await client.aclose()
    assert settled == pytest.approx(cost, abs=1e-6) and reserved == 0
    # The ATFM history sees the failed attempts as retries: calls with errors.
    [row] = [b for b in report.burn if b.scope == "workflow"]
    [role] = row.roles
    assert (role.calls, role.errors) == (3, 2)
    assert (role.input_tokens, role.output_tokens) == (160, 9)


async def test_a_request_the_api_refuses_is_not_retried(
    secure_nats, redis_server, prefix, key
) -> None:
    async with ScriptedApi() as api:
        api.reply(anthropic_error("invalid_request_error", "max_tokens too large"), status=400)
        rig = await _rig(secure_nats, redis_server, prefix, _anthropic(api))
        try:
            with pytest.raises(ModelError) as caught:
                await rig.agent.think("wf-bad", "Which vendor?", key="plan")
            await rig.report("wf-bad", calls=1)
        finally:
            await _close(rig)
    assert not caught.value.retryable and caught.value.status == 400
    assert len(api.requests) == 1
    assert [(u.error, u.failure) for u in rig.usage] == [(True, "rejected")]


async def test_an_answer_that_does_not_follow_the_schema_is_reflected_on_with_the_reason(
    secure_nats, redis_server, prefix, key
) -> None:
    async with ScriptedApi() as api:
        api.reply(completion("Acme, I think."))
        api.reply(completion('{"vendor": "acme"}'))
        api.reply(completion('{"vendor": "acme", "amount": 5}'))
        rig = await _rig(secure_nats, redis_server, prefix, _openai(api))
        try:
            request = ModelRequest(
                prompt="Which vendor?", schema=VENDOR, max_tokens=64, key="wf-schema:plan"
            )
            answer, reflections = await rig.agent.think_until_usable(
                "wf-schema", request, max_reflections=3
            )
            await rig.report("wf-schema", calls=3)
        finally:
            await _close(rig)
    assert reflections == 2 and json.loads(answer.text) == {"vendor": "acme", "amount": 5}
    assert [u.error for u in rig.usage] == [True, True, False]
    second, third = api.requests[1].body["messages"], api.requests[2].body["messages"]
    assert second[-2] == {"role": "assistant", "content": "Acme, I think."}
    assert "not JSON" in second[-1]["content"]
    assert "'amount' is a required property" in third[-1]["content"]


def test_retry_after_is_read_in_seconds_in_milliseconds_or_as_a_date() -> None:
    from govmesh.llm._wire import failure, retry_after

    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after({"retry-after": "Wed, 21 Oct 2026 07:28:10 GMT"}, now=1792567680.0) == 10.0
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({"retry-after": "-1"}) is None
    assert retry_after({}) is None
    kinds = {
        s: (failure(s, {}, "x").kind, failure(s, {}, "x").retryable)
        for s in (400, 401, 408, 429, 500, 503, 529)
    }
    assert kinds == {
        400: ("rejected", False),
        401: ("rejected", False),
        408: ("timeout", True),
        429: ("rate_limited", True),
        500: ("server_error", True),
        503: ("server_error", True),
        529: ("server_error", True),
    }


async def test_a_call_cancelled_midway_leaves_its_reservation_to_lapse_at_its_full_amount(
    secure_nats, redis_server, prefix, key
) -> None:
    import time

    async with ScriptedApi() as api:
        api.reply(completion("late"), delay_s=2.0)
        rig = await _rig(secure_nats, redis_server, prefix, _openai(api))
        try:
            call = asyncio.create_task(rig.agent.think("wf-cancel", "Which vendor?", key="plan"))
            while not api.requests:
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            book = rig.agent.book
            assert book is not None
            settled, reserved = await book.spent("wf-cancel")
            lapsed = await book.settle_lapsed(now=time.time() + book.caps.reservation_ttl_s + 1)
            after = await book.spent("wf-cancel")
        finally:
            await _close(rig)
    assert (settled, lapsed) == (0.0, 1) and reserved > 0
    assert after == (reserved, 0.0)  # counted high, never low
    assert rig.usage == []  # no usage was reported for a call that never answered
