"""The one interface every model provider implements, and the call and answer it speaks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, Protocol, runtime_checkable

import jsonschema
import msgspec

from govmesh.errors import ConfigError

__all__ = [
    "Message",
    "ModelProvider",
    "ModelRequest",
    "ModelResponse",
    "ToolCall",
    "ToolDef",
    "arguments",
    "prompt_bytes",
    "schema_problem",
]

_REFLECT: Final = "(previous answer was unusable; reflect and retry)"


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A call a model asked for: a tool's name and its arguments, not made yet.

    Attributes:
        id: the provider's id of the call, when it gives one.
    """

    name: str
    args: dict[str, Any] = {}
    id: str = ""


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One turn of a chat: what the user said, what the model answered (with the tool calls
    it asked for), or the result of one of those calls.

    Attributes:
        role: ``user``, ``assistant`` or ``tool`` (a tool call's result).
        content: the text; for a tool result, the result as JSON or the error's text.
        tool_calls: an assistant turn's calls (see `ModelResponse.said`).
        call_id: a tool result's call, as the assistant turn names it.
        name: a tool result's tool.
        error: a tool result that is a failure or a refusal, not a result.
    """

    role: Literal["user", "assistant", "tool"]
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    call_id: str = ""
    name: str = ""
    error: bool = False

    @classmethod
    def result(cls, call: ToolCall, value: Any, *, error: bool = False) -> Message:
        """The result of ``call`` to give back to the model: ``value`` as JSON (a string is
        given as it is), or, with ``error``, the text of why the call failed or was refused.
        """
        content = value if isinstance(value, str) else json.dumps(msgspec.to_builtins(value))
        return cls(role="tool", content=content, call_id=call.id, name=call.name, error=error)


class ToolDef(msgspec.Struct, frozen=True, kw_only=True):
    """A tool the model may ask to call: its name, what it does, and a JSON Schema of its
    arguments.

    The model only asks; the agent makes the call with ``Workflow.call_tool``, governed.
    """

    name: str
    description: str = ""
    parameters: dict[str, Any] = {}

    @classmethod
    def of(cls, schema: Mapping[str, Any]) -> ToolDef:
        """The definition of a tool from its ``ToolSpec.schema()``."""
        return cls(
            name=schema["name"],
            description=schema.get("description", ""),
            parameters=dict(schema.get("arguments", {})),
        )


class ModelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One model call: a chat (``messages``, or ``prompt`` as the one user message) with an
    optional system prompt, tools the model may ask for, and a JSON Schema its answer must
    follow.

    Attributes:
        max_tokens: the completion cap.
        key: a stable name for this call (workflow, agent, step, attempt), which seeded
            providers use so the same run gives the same answers.
        prompt: the user's one message; give it or ``messages``, not both.
        messages: the chat so far, user first.
        system: the system prompt.
        tools: tools the model may ask to call.
        schema: a JSON Schema the answer's text must follow (structured output).

    Raises:
        ConfigError: both or neither of ``prompt`` and ``messages``, a chat that does not
            start with the user, an assistant's tool call without an id, or tool results
            that do not answer exactly the calls of the assistant turn just before them.
    """

    max_tokens: int
    key: str
    prompt: str = ""
    messages: tuple[Message, ...] = ()
    system: str = ""
    tools: tuple[ToolDef, ...] = ()
    schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if bool(self.prompt) == bool(self.messages):
            raise ConfigError(
                f"model call {self.key!r}: give a prompt or messages, not both or neither "
                f"(prompt {self.prompt[:40]!r}, {len(self.messages)} messages)"
            )
        if self.messages and self.messages[0].role != "user":
            raise ConfigError(
                f"model call {self.key!r}: messages[0].role must be 'user', "
                f"got {self.messages[0].role!r}"
            )
        _check_tool_turns(self.key, self.messages)

    def chat(self) -> tuple[Message, ...]:
        """The chat to send: ``messages``, or ``prompt`` as the one user message."""
        return self.messages or (Message(role="user", content=self.prompt),)

    def reflected(self, answer: str, why: str) -> ModelRequest:
        """This call asked again after an unusable ``answer``: the chat goes on with that
        answer and a note telling the model ``why`` it was unusable."""
        note = f"(previous answer was unusable: {why}; reflect and retry)" if why else _REFLECT
        said = (Message(role="assistant", content=answer),) if answer else ()
        return msgspec.structs.replace(
            self,
            prompt="",
            messages=(*self.chat(), *said, Message(role="user", content=note)),
        )


class ModelResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A model's answer and its provider-reported usage.

    Attributes:
        error: the answer was unusable (malformed output, refusal, not following the
            request's schema), so the agent reflects and retries.
        cache_read_tokens, cache_write_tokens, reasoning_tokens: further token kinds some
            providers report and price apart (see `govmesh.forecasting.Price`); they are not
            counted again in ``input_tokens`` and ``output_tokens``.
        stop_reason: why the model stopped, as the provider says (``stop``, ``end_turn``,
            ``max_tokens``, ``tool_calls``, ...).
        tool_calls: calls the model asks for, for the handler to make governed.
        problem: why the answer is unusable, when govmesh found out (it does not follow
            the request's schema).
        retries: attempts that failed before this answer (a rate limit, a server error, a
            timeout), each a model call of its own, reserved, counted and priced.
    """

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    error: bool = False
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    stop_reason: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    problem: str = ""
    retries: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Every prompt token charged, of whatever kind."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    def said(self) -> Message:
        """This answer as the assistant's turn of a chat, to send back followed by a
        `Message.result` for each of its tool calls."""
        return Message(role="assistant", content=self.text, tool_calls=self.tool_calls)


@runtime_checkable
class ModelProvider(Protocol):
    """Something that answers model calls.

    A provider may raise `govmesh.errors.ModelError` for an attempt that failed; the agent
    retries the retryable ones with backoff, each attempt reserved and counted.
    """

    @property
    def model(self) -> str:
        """The model name, as priced in the price table."""
        ...

    def max_input_tokens(self, request: ModelRequest) -> int:
        """An upper bound of the prompt tokens ``request`` will be charged, known before the
        call, so its maximum cost can be reserved."""
        ...

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Answer one call."""
        ...


def prompt_bytes(request: ModelRequest) -> int:
    """The UTF-8 bytes of everything ``request`` sends as prompt: system prompt, chat, tool
    definitions and schema.

    A byte-level tokenizer (BPE over bytes, or one with byte fallback) never makes more
    tokens than bytes, so this plus the chat template's own tokens bounds the prompt.
    """
    size = len(request.system.encode())
    for m in request.chat():
        size += len(m.content.encode()) + len(m.role) + len(m.call_id) + len(m.name.encode())
        size += sum(
            len(c.id) + len(c.name.encode()) + len(arguments(c.args).encode()) for c in m.tool_calls
        )
    if request.tools:
        size += len(json.dumps([msgspec.to_builtins(t) for t in request.tools]).encode())
    if request.schema is not None:
        size += len(json.dumps(request.schema).encode())
    return size


def arguments(args: Mapping[str, Any]) -> str:
    """A tool call's arguments as JSON, as the providers send them back to the model."""
    return json.dumps(args)


def _check_tool_turns(key: str, messages: Sequence[Message]) -> None:
    """Every call of an assistant turn has an id, and the tool results right after the turn
    answer each of its calls once: what the APIs accept."""
    open_calls: dict[str, int] = {}  # calls asked and not yet answered: id -> turn
    for i, m in enumerate(messages):
        if m.role == "tool":
            if m.call_id not in open_calls:
                raise ConfigError(
                    f"model call {key!r}: messages[{i}] is the result of call {m.call_id!r}, "
                    "which the assistant turn before it did not ask for or was answered"
                )
            del open_calls[m.call_id]
            continue
        if open_calls:
            call, turn = next(iter(open_calls.items()))
            raise ConfigError(
                f"model call {key!r}: call {call!r} of messages[{turn}] has no result before "
                f"messages[{i}]"
            )
        for c in m.tool_calls:
            if not c.id:
                raise ConfigError(
                    f"model call {key!r}: messages[{i}] asks for {c.name!r} without an id"
                )
            open_calls[c.id] = i
    if open_calls:
        call, turn = next(iter(open_calls.items()))
        raise ConfigError(f"model call {key!r}: call {call!r} of messages[{turn}] has no result")


def schema_problem(text: str, schema: Mapping[str, Any]) -> str:
    """Why ``text`` is not a JSON value that follows ``schema``; empty when it is."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    error = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(schema)(schema).iter_errors(value)
    )
    if error is None:
        return ""
    where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.path)
    return f"at {where}: {error.message}"
