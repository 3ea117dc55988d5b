"""The one place that builds NATS subject strings.

Scheme (``<t>`` is the tenant)::

    gm.<t>.intent.<agent>      tool intents, answered by governance
    gm.<t>.decision.<workflow> signed governance decisions
    gm.<t>.tool.<tool>         tool calls to the gateway (tool names may contain dots)
    gm.<t>.usage.<agent>       model usage for the budget actor
    gm.<t>.state.<agent>       snapshots for the state actor (not captured by the event stream)
    gm.<t>.snapshot.<agent>    what the state actor stored of them, without content
    gm.<t>.msg.<agent>         agent-to-agent messages
    gm.<t>.approval.<workflow> approval requests and answers
    gm.<t>.ctl.<service>       queries to platform actors
    gm.<t>.security            security events

Outside the tenant's tree (not captured by the event stream)::

    _INBOX.<t>.<member>.>      reply inboxes of one member (its nats-py ``inbox_prefix``)
    $JS.API.>                  the JetStream API
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["INBOX_ROOT", "JETSTREAM_API", "ROOT", "Subjects", "validate_token"]

ROOT: Final = "gm"
INBOX_ROOT: Final = "_INBOX"
JETSTREAM_ROOT: Final = "$JS.API"
JETSTREAM_API: Final = f"{JETSTREAM_ROOT}.>"
JETSTREAM_ACK: Final = "$JS.ACK"
_TOKEN = re.compile(r"^[A-Za-z0-9_\-:]+$")
_TOOL = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def validate_token(value: str, *, what: str) -> str:
    """Return ``value`` if it is a single subject token, else raise ValueError quoting it."""
    if not _TOKEN.match(value):
        raise ValueError(
            f"{what} must be letters, digits, '_', '-' or ':' (no dots, spaces or "
            f"wildcards): {value!r}"
        )
    return value


class Subjects:
    """Subject builder for one tenant.

    Args:
        tenant: the tenant id; one subject token.
    """

    __slots__ = ("prefix", "tenant")

    def __init__(self, tenant: str) -> None:
        self.tenant = validate_token(tenant, what="tenant")
        self.prefix = f"{ROOT}.{tenant}"

    def _one(self, area: str, name: str, what: str) -> str:
        return f"{self.prefix}.{area}.{validate_token(name, what=what)}"

    def intent(self, agent: str) -> str:
        """Where ``agent`` publishes tool intents."""
        return self._one("intent", agent, "agent id")

    def decision(self, workflow: str) -> str:
        """Where governance publishes decisions for ``workflow``."""
        return self._one("decision", workflow, "workflow id")

    def tool(self, tool: str) -> str:
        """Where the gateway receives calls of ``tool``."""
        if not _TOOL.match(tool):
            raise ValueError(f"tool name must be dot-separated words: {tool!r}")
        return f"{self.prefix}.tool.{tool}"

    def usage(self, agent: str) -> str:
        """Where ``agent`` reports model usage."""
        return self._one("usage", agent, "agent id")

    def state(self, agent: str) -> str:
        """Where ``agent`` sends snapshots."""
        return self._one("state", agent, "agent id")

    def snapshot(self, agent: str) -> str:
        """Where the state actor records each snapshot of ``agent`` it stored (no content)."""
        return self._one("snapshot", agent, "agent id")

    def msg(self, agent: str) -> str:
        """The inbox of ``agent`` for agent-to-agent messages."""
        return self._one("msg", agent, "agent id")

    def approval(self, workflow: str) -> str:
        """Approval requests and answers for ``workflow``."""
        return self._one("approval", workflow, "workflow id")

    def ctl(self, service: str) -> str:
        """Queries to the platform actor ``service`` (``budget``, ``state``...)."""
        return self._one("ctl", service, "service name")

    @property
    def security(self) -> str:
        """Security events."""
        return f"{self.prefix}.security"

    def all(self, area: str) -> str:
        """Wildcard for every subject of ``area`` (e.g. ``all("intent")``)."""
        if area == "tool":
            return f"{self.prefix}.tool.>"
        return f"{self.prefix}.{validate_token(area, what='area')}.*"

    @property
    def everything(self) -> str:
        """Every subject of this tenant."""
        return f"{self.prefix}.>"

    def inbox_prefix(self, member: str) -> str:
        """The reply-inbox prefix of ``member``, for nats-py ``connect(inbox_prefix=...)``.

        nats-py puts every reply subject of a member's requests under it, so server
        permissions can let each member subscribe to its own replies and nobody else's.
        """
        return f"{INBOX_ROOT}.{self.tenant}.{validate_token(member, what='member id')}"

    def inboxes(self, member: str) -> str:
        """Wildcard for every reply inbox of ``member``."""
        return f"{self.inbox_prefix(member)}.>"

    @property
    def jetstream_read(self) -> tuple[str, ...]:
        """The JetStream subjects needed to replay a stream: consumers, stream info and
        acknowledgements of what was read; not creating, changing or deleting streams."""
        return (
            f"{JETSTREAM_ROOT}.CONSUMER.>",
            f"{JETSTREAM_ROOT}.STREAM.INFO.*",
            f"{JETSTREAM_ACK}.>",
        )

    @property
    def jetstream_api(self) -> str:
        """Wildcard for the JetStream API (creating and inspecting streams)."""
        return JETSTREAM_API
