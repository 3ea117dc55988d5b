"""The govmesh error hierarchy: one root, a few subclasses that carry data.

Each subclass also inherits the matching built-in exception so callers that already catch
``ValueError`` or ``RuntimeError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "BusError",
    "ConfigError",
    "GovmeshError",
    "ModelError",
    "PolicyError",
    "RuntimeStartError",
    "ScenarioError",
    "SecurityError",
    "StateError",
    "ToolArgumentError",
    "ToolError",
]


class GovmeshError(Exception):
    """Root of every error govmesh raises on purpose."""


class ConfigError(GovmeshError, ValueError):
    """A setting, flag or file is invalid."""


class PolicyError(GovmeshError, ValueError):
    """A policy file is malformed.

    Attributes:
        path: the policy file, when known.
        line: 1-based line number of the offending value, when known.
        value: the offending value, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        value: object = None,
    ) -> None:
        self.path = path
        self.line = line
        self.value = value
        where = path or "<policy>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")


class ScenarioError(GovmeshError, ValueError):
    """A scenario file is malformed."""


class RuntimeStartError(GovmeshError, RuntimeError):
    """An embedded service (nats-server, Redis-protocol server, Ray) failed to start."""


class BusError(GovmeshError, RuntimeError):
    """Publishing, subscribing or a request on the bus failed."""


class SecurityError(GovmeshError, PermissionError):
    """A message or credential failed verification.

    Attributes:
        reason: short machine-readable reason, e.g. ``"bad_signature"`` or ``"replay"``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ModelError(GovmeshError, RuntimeError):
    """A model call failed: the provider did not answer, or answered with an error.

    Whether to try again is the error's property: a rate limit, a server error (5xx, 529
    overloaded) or a timeout is retryable, and the agent calls again with backoff, each
    attempt reserved, counted and priced; a bad request or a wrong key is not.

    Attributes:
        message: what went wrong (never a credential).
        retryable: calling again may succeed.
        kind: ``rate_limited``, ``server_error``, ``timeout``, ``connection`` or
            ``rejected`` (the request itself was refused).
        status: the HTTP status, when there was one.
        retry_after_s: how long the provider asked to wait (``retry-after``), if it did.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        kind: str,
        status: int = 0,
        retry_after_s: float | None = None,
    ) -> None:
        self.message = message
        self.retryable = retryable
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s
        super().__init__(message)


class StateError(GovmeshError, RuntimeError):
    """Persisting or restoring state failed."""


class ToolError(GovmeshError, RuntimeError):
    """A tool failed; the gateway answers the calling agent with ``message`` at once.

    Whether to try again is the error's property, as with Temporal's
    ``ApplicationError(non_retryable=...)``. By default the failure is the step's answer:
    it is recorded, and a repeated call of the step gets it back without running the tool.
    ``retryable=True`` promises that the attempt changed nothing (or that the tool dedupes on
    the call's idempotency key), so the agent calls again, with backoff, and the gateway
    runs the tool again under the same decision while that decision is valid.

    Attributes:
        message: what went wrong, as the agent is told it.
        retryable: the agent may call again.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        self.message = message
        self.retryable = retryable
        super().__init__(message)


class ToolArgumentError(GovmeshError, ValueError):
    """A tool call's arguments do not fit the tool's argument type.

    The gateway answers the calling agent with it at once and records it as the step's
    answer, like a tool's own ``ValueError``: the same arguments never fit.

    Attributes:
        tool: the tool's name.
        problem: what is wrong, without the tool's name (the message is both).
        path: where in the arguments the first misfit is (``$.amount_usd``, ``$.lines[2]``),
            or ``""`` when the arguments as a whole do not fit (a field is missing).
        value: the value found there, when there is one.
    """

    def __init__(self, tool: str, problem: str, *, path: str = "", value: object = None) -> None:
        self.tool = tool
        self.problem = problem
        self.path = path
        self.value = value
        super().__init__(f"{tool}: {problem}")
