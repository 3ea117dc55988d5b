"""A model behind Anthropic's Messages API, over the official ``anthropic`` client."""

from __future__ import annotations

import json
from typing import Any, Final

import anthropic
import msgspec
from anthropic.types import TextBlock, ToolUseBlock

from govmesh.errors import ModelError
from govmesh.llm._provider import ModelRequest, ModelResponse, ToolCall, prompt_bytes
from govmesh.llm._wire import api_key, failure, wire_name

__all__ = ["AnthropicModel", "AnthropicSettings"]

ANSWER_TOOL: Final = "govmesh_answer"
"""The tool a call with a schema is answered through: the model fills in its input, which
the Messages API checks against the schema, and that input is the answer's text."""


class AnthropicSettings(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="provider",
    tag="anthropic",
):
    """An agent's model behind Anthropic's Messages API; comes from the scenario file or
    the app. Holds no secret: the key is read from ``api_key_env`` in the agent's process.

    Attributes:
        model: the model, as requests name it (``claude-sonnet-4-5``).
        base_url: the API's URL; empty for Anthropic's.
        api_key_env: the environment variable holding the API key.
        name: the model's name as priced; ``model`` when empty.
        timeout_s: how long one attempt may take before it is given up and retried.
        template_tokens: tokens the API may add around the messages (role markers; with
            tools or a schema, its tool-use system prompt, some hundreds of tokens), for
            the reservation's upper bound of the prompt.
    """

    model: str
    base_url: str = ""
    api_key_env: str = "ANTHROPIC_API_KEY"
    name: str = ""
    timeout_s: float = 60.0
    template_tokens: int = 1024

    @property
    def priced_as(self) -> str:
        """The name the price table has the model under."""
        return self.name or self.model


class AnthropicModel:
    """A `govmesh.ModelProvider` over Anthropic's Messages API.

    The client's own retries are off: the agent retries (429 with ``retry-after``, 5xx,
    529 overloaded, timeouts), so each attempt is reserved, counted and priced. Cancelling
    `complete` closes the request.

    Args:
        settings: which model and how to call it.

    Raises:
        ConfigError: ``settings.api_key_env`` is not set in this process's environment.
    """

    provider = "anthropic"
    """The provider name spans report (``gen_ai.provider.name``)."""

    def __init__(self, settings: AnthropicSettings) -> None:
        self.settings = settings
        self._client = anthropic.AsyncAnthropic(
            base_url=settings.base_url or None,
            api_key=api_key(settings.api_key_env, provider=self.provider),
            max_retries=0,
            timeout=settings.timeout_s,
        )

    @property
    def model(self) -> str:
        """The model's name as priced."""
        return self.settings.priced_as

    def max_input_tokens(self, request: ModelRequest) -> int:
        """The prompt's bytes plus the API's own tokens: a byte-level tokenizer never makes
        more tokens than bytes."""
        return prompt_bytes(request) + self.settings.template_tokens

    async def close(self) -> None:
        """Close the client's connections. Safe to call twice."""
        await self._client.close()

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Answer one call.

        Raises:
            ModelError: the attempt failed; retryable for a 429, a 5xx, a 529, a timeout
                or a lost connection.
        """
        names = {wire_name(t.name): t.name for t in request.tools}
        try:
            reply = await self._client.messages.create(**self._body(request))
        except anthropic.APIStatusError as exc:
            raise failure(exc.status_code, exc.response.headers, str(exc.message)) from None
        except anthropic.APITimeoutError:
            raise ModelError(
                f"{self.model}: no answer within {self.settings.timeout_s}s",
                retryable=True,
                kind="timeout",
            ) from None
        except anthropic.APIConnectionError as exc:
            raise ModelError(
                f"{self.model}: connection failed: {exc}", retryable=True, kind="connection"
            ) from None
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
            "messages": [{"role": m.role, "content": m.content} for m in request.chat()],
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
