"""A model behind an OpenAI-compatible chat completions API (OpenAI, vLLM, Ollama,
llama.cpp's server, LiteLLM proxies), over the official ``openai`` client."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from govmesh.llm._provider import Message, ModelRequest, ModelResponse, ToolCall, arguments
from govmesh.llm._wire import RemoteModel, RemoteSettings, client_errors, wire_name

__all__ = ["OpenAIModel", "OpenAISettings"]


class OpenAISettings(RemoteSettings, frozen=True, tag_field="provider", tag="openai"):
    """An agent's model behind an OpenAI-compatible API (see `RemoteSettings`).

    Attributes:
        api_key_env: ``OPENAI_API_KEY`` unless given.
        response_format: how structured output is asked for: ``json_schema`` (OpenAI,
            vLLM) or ``json_object`` with a ``schema`` (llama-cpp-python's server).
        token_limit: the request field of the completion cap: ``max_tokens``, or
            ``max_completion_tokens`` for OpenAI's reasoning models.
        tool_turn_content: how an assistant turn with tool calls and no text is sent
            back: ``null``, as OpenAI's API documents it (Bedrock refuses ``""`` there, and
            Ollama's templates render it otherwise), or ``empty``, a ``""``, for servers
            that refuse ``null`` (llama-cpp-python's).
    """

    api_key_env: str = "OPENAI_API_KEY"
    response_format: Literal["json_schema", "json_object"] = "json_schema"
    token_limit: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    tool_turn_content: Literal["null", "empty"] = "null"


class OpenAIModel(RemoteModel[OpenAISettings]):
    """A `govmesh.ModelProvider` over an OpenAI-compatible chat completions API, through
    the official ``openai`` client (see `RemoteModel`)."""

    provider = "openai"

    def __init__(self, settings: OpenAISettings) -> None:
        import openai  # here: importing it costs every process that never calls it

        super().__init__(settings)
        self._client = openai.AsyncOpenAI(**self.client_options())

    async def close(self) -> None:
        """Close the client's connections. Safe to call twice."""
        await self._client.close()

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Answer one call.

        Raises:
            ModelError: the attempt failed; retryable for a 429, a 5xx, a timeout or a
                lost connection.
        """
        import openai

        names = {wire_name(t.name): t.name for t in request.tools}
        with client_errors(openai, self.settings):
            reply = await self._client.chat.completions.create(**self._body(request))
        usage = reply.usage
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        cached = _detail(usage and usage.prompt_tokens_details, "cached_tokens")
        reasoning = _detail(usage and usage.completion_tokens_details, "reasoning_tokens")
        text, stop, problem = "", "", "the answer has no choices"
        calls: list[ToolCall] = []
        if reply.choices:
            choice = reply.choices[0]
            text, stop = choice.message.content or "", choice.finish_reason or ""
            calls, problem = _tool_calls(choice.message.tool_calls or (), names)
        return ModelResponse(
            text=text,
            model=reply.model or self.settings.model,
            # OpenAI counts cached prompt tokens in prompt_tokens and reasoning tokens in
            # completion_tokens; govmesh prices each kind once.
            input_tokens=max(0, prompt - cached),
            output_tokens=max(0, completion - reasoning),
            cache_read_tokens=cached,
            reasoning_tokens=reasoning,
            stop_reason=stop,
            tool_calls=tuple(calls),
            error=bool(problem),
            problem=problem,
        )

    def _body(self, request: ModelRequest) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        empty = None if self.settings.tool_turn_content == "null" else ""
        messages += [_message(m, empty) for m in request.chat()]
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": messages,
            self.settings.token_limit: request.max_tokens,
        }
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": wire_name(t.name),
                        "description": t.description,
                        "parameters": t.parameters or {"type": "object", "properties": {}},
                    },
                }
                for t in request.tools
            ]
        if request.schema is not None:
            if self.settings.response_format == "json_object":
                body["response_format"] = {"type": "json_object", "schema": request.schema}
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": request.schema},
                }
        return body


def _message(m: Message, empty: str | None) -> dict[str, Any]:
    """One turn of the chat in the API's form: a tool result answers its call by id, and
    an assistant turn of tool calls alone has ``empty`` as its content."""
    match m.role:
        case "tool":
            return {"role": "tool", "tool_call_id": m.call_id, "content": m.content}
        case "assistant" if m.tool_calls:
            return {
                "role": "assistant",
                "content": m.content or empty,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": wire_name(c.name), "arguments": arguments(c.args)},
                    }
                    for c in m.tool_calls
                ],
            }
        case _:
            return {"role": m.role, "content": m.content}


def _tool_calls(given: Iterable[Any], names: Mapping[str, str]) -> tuple[list[ToolCall], str]:
    """The function calls among ``given``, named as the request's tools are, and what was
    wrong with their arguments if anything was."""
    calls: list[ToolCall] = []
    problem = ""
    for call in given:
        function = getattr(call, "function", None)
        if function is None:  # a custom tool call: govmesh offers functions only
            continue
        try:
            args = json.loads(function.arguments or "{}")
        except ValueError as exc:
            args, problem = {}, f"arguments of {function.name} are not JSON: {exc}"
        if not isinstance(args, dict):
            args, problem = {}, f"arguments of {function.name} are not an object: {args!r}"
        # A server that gives no id (some OpenAI-compatible ones) gets one, so the call's
        # result can answer it when the chat goes on.
        calls.append(
            ToolCall(
                name=names.get(function.name, function.name),
                args=args,
                id=call.id or f"call_{len(calls)}",
            )
        )
    return calls, problem


def _detail(details: Any, field: str) -> int:
    value = getattr(details, field, None) if details is not None else None
    return int(value) if isinstance(value, int) and math.isfinite(value) else 0
