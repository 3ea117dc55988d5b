"""What the providers that speak HTTP share: their settings, the API key from the
process's environment, and the official clients' errors as `ModelError`s."""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from email.utils import parsedate_to_datetime
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from govmesh.errors import ConfigError, ModelError
from govmesh.llm._provider import ModelRequest, prompt_bytes

__all__ = [
    "RemoteModel",
    "RemoteSettings",
    "api_key",
    "client_errors",
    "failure",
    "retry_after",
    "wire_name",
]

S = TypeVar("S", bound="RemoteSettings")


class RemoteSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """An agent's model behind an API; comes from the scenario file or the app. Holds no
    secret: the key is read from ``api_key_env`` in the agent's process.

    Attributes:
        model: the model, as requests name it.
        base_url: the API's URL; empty for the provider's own.
        api_key_env: the environment variable holding the API key; empty for a server
            that takes none (a local one).
        name: the model's name as priced; ``model`` when empty.
        timeout_s: how long one attempt may take before it is given up and retried.
        template_tokens: tokens the API may add around the messages (role markers, a
            default system prompt, tool instructions), for the reservation's upper bound
            of the prompt.
    """

    model: str
    base_url: str = ""
    api_key_env: str = ""
    name: str = ""
    timeout_s: float = 60.0
    template_tokens: int = 256

    @property
    def priced_as(self) -> str:
        """The name the price table has the model under."""
        return self.name or self.model


class RemoteModel(Generic[S]):
    """What a `govmesh.ModelProvider` over an API shares with the others: its settings,
    its name as priced, the bound of a prompt's tokens and its client's options.

    The client's own retries are off: the agent retries a rate limit, a server error or a
    timeout, so each attempt is reserved, counted and priced. Cancelling a call closes its
    request.

    Args:
        settings: where the model is and how to call it.

    Raises:
        ConfigError: ``settings.api_key_env`` is not set in this process's environment.
    """

    provider: ClassVar[str]
    """The provider name spans and reports show (``gen_ai.provider.name``)."""

    def __init__(self, settings: S) -> None:
        self.settings = settings
        self._key = api_key(settings.api_key_env, provider=self.provider)

    @property
    def model(self) -> str:
        """The model's name as priced."""
        return self.settings.priced_as

    def max_input_tokens(self, request: ModelRequest) -> int:
        """The prompt's bytes plus the template's tokens: a byte-level tokenizer (BPE over
        bytes, or one with byte fallback) never makes more tokens than bytes."""
        return prompt_bytes(request) + self.settings.template_tokens

    def client_options(self) -> dict[str, Any]:
        """The official client's options: the API's URL, the key, the timeout, and no
        retries of its own."""
        return {
            "base_url": self.settings.base_url or None,
            "api_key": self._key,
            "max_retries": 0,
            "timeout": self.settings.timeout_s,
        }


@contextlib.contextmanager
def client_errors(sdk: ModuleType, settings: RemoteSettings) -> Iterator[None]:
    """Turn the errors of ``sdk`` (the ``openai`` or ``anthropic`` module: their clients
    share one shape of errors) into `ModelError`s."""
    try:
        yield
    except sdk.APIStatusError as exc:
        raise failure(exc.status_code, exc.response.headers, str(exc.message)) from None
    except sdk.APITimeoutError:
        raise ModelError(
            f"{settings.model}: no answer within {settings.timeout_s}s",
            retryable=True,
            kind="timeout",
        ) from None
    except sdk.APIConnectionError as exc:
        raise ModelError(
            f"{settings.model}: connection failed: {exc}", retryable=True, kind="connection"
        ) from None


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")

NO_KEY = "none"
"""What a server that takes no key is sent: the clients insist on some key."""


def api_key(variable: str, *, provider: str) -> str:
    """The API key in environment variable ``variable`` of this process (the agent's
    actor), never from a file or a message; `NO_KEY` when ``variable`` is empty.

    Raises:
        ConfigError: the variable is not set, or is empty.
    """
    if not variable:
        return NO_KEY
    key = os.environ.get(variable, "")
    if not key:
        raise ConfigError(
            f"{provider} model: api_key_env {variable!r} is not set in the agent's "
            "environment; set it there (the key is never read from a scenario file), or "
            "give api_key_env: '' for a server that takes no key"
        )
    return key


def retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked to wait: ``retry-after-ms``, or ``retry-after`` in seconds
    or as an HTTP date; None when it did not ask (or asked nonsense)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    given = headers.get("retry-after")
    if given is None:
        return None
    try:
        seconds = float(given)
    except ValueError:
        try:
            when = parsedate_to_datetime(given)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def failure(status: int, headers: Mapping[str, str], message: str) -> ModelError:
    """The `ModelError` of an HTTP answer with error ``status``: a rate limit (429), a
    request timeout or conflict (408, 409) and server errors (5xx, Anthropic's 529
    overloaded) are retryable, honouring ``retry-after``; anything else is the request's
    fault and is not."""
    if status == 429:
        kind = "rate_limited"
    elif status == 408:
        kind = "timeout"
    elif status >= 500 or status == 409:
        kind = "server_error"
    else:
        kind = "rejected"
    return ModelError(
        f"HTTP {status}: {message}",
        retryable=kind != "rejected",
        kind=kind,
        status=status,
        retry_after_s=retry_after(headers),
    )


def wire_name(tool: str) -> str:
    """A tool's name as the APIs let tools be named (``server.tool`` has a dot)."""
    return _NAME_CHARS.sub("_", tool)[:64]
