"""What the providers that speak HTTP share: the API key from the process's environment,
and a failed HTTP answer as a `ModelError`."""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from govmesh.errors import ConfigError, ModelError

__all__ = ["api_key", "failure", "retry_after", "wire_name"]

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
