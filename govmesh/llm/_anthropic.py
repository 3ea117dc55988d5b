"""A model behind Anthropic's Messages API, over the official ``anthropic`` client."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from govmesh.llm._provider import Message, ModelRequest, ModelResponse, ToolCall
from govmesh.llm._wire import RemoteModel, RemoteSettings, client_errors, wire_name

__all__ = ["AnthropicModel", "AnthropicSettings"]

ANSWER_TOOL: Final = "govmesh_answer"
"""The tool a call with a schema is answered through: the model fills in its input, which
the Messages API checks against the schema, and that input is the answer's text."""


class AnthropicSettings(RemoteSettings, frozen=True, tag_field="provider", tag="anthropic"):
    """An agent's model behind Anthropic's Messages API (see `RemoteSettings`).

    Attributes:
        api_key_env: ``ANTHROPIC_API_KEY`` unless given.
        template_tokens: 1024 unless given: with tools or a schema the API adds its
            tool-use system prompt, some hundreds of tokens.
    """

    api_key_env: str = "ANTHROPIC_API_KEY"
    template_tokens: int = 1024


class AnthropicModel(RemoteModel[AnthropicSettings]):
    """A `govmesh.ModelProvider` over Anthropic's Messages API, through the official
    ``anthropic`` client (see `RemoteModel`). A 529 (overloaded) is retried like a 5xx."""

    provider = "anthropic"

    def __init__(self, settings: AnthropicSettings) -> None:
        import anthropic  # here: importing it costs every process that never calls it

        super().__init__(settings)
        self._client = anthropic.AsyncAnthropic(**self.client_options())

    async def close(self) -> None:
        """Close the client's connections. Safe to call twice."""
        await self._client.close()

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Answer one call.

        Raises:
            ModelError: the attempt failed; retryable for a 429, a 5xx, a 529, a timeout
                or a lost connection.
        """
        import anthropic
        from anthropic.types import TextBlock, ToolUseBlock

        names = {wire_name(t.name): t.name for t in request.tools}
        with client_errors(anthropic, self.settings):
            reply = await self._client.messages.create(**self._body(request))
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in reply.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                given = block.input if isinstance(block.input, dict) else {}
                if block.name == ANSWER_TOOL and request.schema is not None:
                    texts = [json.dumps(given)]
                else:
                    calls.append(
                        ToolCall(name=names.get(block.name, block.name), args=given, id=block.id)
                    )
        usage = reply.usage
        details = usage.output_tokens_details
        thinking = details.thinking_tokens if details is not None else 0
        return ModelResponse(
            text="".join(texts),
            model=reply.model or self.settings.model,
            # Anthropic counts cache reads and writes apart from input_tokens, as govmesh
            # does, and thinking tokens within output_tokens, which govmesh counts apart.
            input_tokens=usage.input_tokens,
            output_tokens=max(0, usage.output_tokens - thinking),
            cache_read_tokens=usage.cache_read_input_tokens or 0,
            cache_write_tokens=usage.cache_creation_input_tokens or 0,
            reasoning_tokens=thinking,
            stop_reason=reply.stop_reason or "",
            tool_calls=tuple(calls),
        )

    def _body(self, request: ModelRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.model,
            "max_tokens": request.max_tokens,
            "messages": _messages(request.chat()),
        }
        if request.system:
            body["system"] = request.system
        tools = [
            {
                "name": wire_name(t.name),
                "description": t.description,
                "input_schema": t.parameters or {"type": "object", "properties": {}},
            }
            for t in request.tools
        ]
        if request.schema is not None:
            tools.append(
                {
                    "name": ANSWER_TOOL,
                    "description": "Give the answer, as the schema says.",
                    "input_schema": request.schema,
                }
            )
            # With tools of its own the model may ask for one of them instead of answering.
            body["tool_choice"] = (
                {"type": "any"} if request.tools else {"type": "tool", "name": ANSWER_TOOL}
            )
        if tools:
            body["tools"] = tools
        return body


def _messages(chat: Sequence[Message]) -> list[dict[str, Any]]:
    """The chat in the API's form: an assistant turn's tool calls are ``tool_use`` blocks,
    and tool results are ``tool_result`` blocks of the user turn after it, merged with any
    user text that follows, since the API wants user and assistant turns in alternation."""
    turns: list[dict[str, Any]] = []
    for m in chat:
        role = "assistant" if m.role == "assistant" else "user"
        blocks: list[dict[str, Any]] = []
        if m.role == "tool":
            blocks.append(
                {
                    "type": "tool_result",
                    "tool_use_id": m.call_id,
                    "content": m.content,
                    "is_error": m.error,
                }
            )
        elif m.content:
            blocks.append({"type": "text", "text": m.content})
        blocks += [
            {"type": "tool_use", "id": c.id, "name": wire_name(c.name), "input": c.args}
            for c in m.tool_calls
        ]
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    return [_plain(t) for t in turns]


def _plain(turn: dict[str, Any]) -> dict[str, Any]:
    """A turn of one text block as a plain string, as most callers of the API send it."""
    match turn["content"]:
        case [{"type": "text", "text": str(text)}]:
            return {"role": turn["role"], "content": text}
        case _:
            return turn
