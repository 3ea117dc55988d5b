"""A local HTTP server that speaks the wire formats govmesh's providers use: Anthropic's
Messages API (``POST /v1/messages``) and OpenAI-compatible chat completions
(``POST /v1/chat/completions``). It answers with the replies a test queues and records
every request, so the official clients are tested over real HTTP, with no network."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Seen:
    """A request the server got (header names in lower case)."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Reply:
    body: dict[str, Any]
    status: int
    headers: dict[str, str]
    delay_s: float


class ScriptedApi:
    """Answers each request with the next queued reply (the last one again when the queue
    runs dry). Use as an async context manager; ``url`` is its base URL."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self._replies: deque[_Reply] = deque()
        self._last: _Reply | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    def reply(
        self,
        body: dict[str, Any],
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """Queue the answer to one more request."""
        self._replies.append(_Reply(body, status, headers or {}, delay_s))

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests.append(
            Seen(
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=await request.json(),
            )
        )
        reply = self._replies.popleft() if self._replies else self._last
        assert reply is not None, "no reply queued"
        self._last = reply
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)

    async def __aenter__(self) -> ScriptedApi:
        app = web.Application()
        app.router.add_post("/v1/messages", self._answer)
        app.router.add_post("/v1/chat/completions", self._answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def message(
    text: str = "",
    *,
    tool_uses: tuple[tuple[str, dict[str, Any]], ...] = (),
    input_tokens: int = 12,
    output_tokens: int = 7,
    cache_read: int | None = None,
    cache_write: int | None = None,
    thinking: int | None = None,
    stop_reason: str = "end_turn",
    model: str = "claude-test",
) -> dict[str, Any]:
    """A Messages API answer."""
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    content += [
        {"type": "tool_use", "id": f"toolu_{i}", "name": name, "input": args}
        for i, (name, args) in enumerate(tool_uses)
    ]
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_read_input_tokens": cache_read,
            "cache_creation_input_tokens": cache_write,
            "output_tokens_details": None if thinking is None else {"thinking_tokens": thinking},
        },
    }


def anthropic_error(kind: str, text: str) -> dict[str, Any]:
    """A Messages API error body."""
    return {"type": "error", "error": {"type": kind, "message": text}}


def completion(
    text: str | None = "",
    *,
    tool_calls: tuple[tuple[str, str], ...] = (),
    prompt_tokens: int = 30,
    completion_tokens: int = 20,
    cached: int = 0,
    reasoning: int = 0,
    finish_reason: str = "stop",
    model: str = "local-model",
) -> dict[str, Any]:
    """A chat completions answer; ``tool_calls`` are (name, JSON arguments)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(tool_calls)
        ]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        },
    }
