"""The one place that builds NATS subject strings.

Scheme (``<t>`` is the tenant)::

    gm.<t>.intent.<agent>               tool intents, answered by governance
    gm.<t>.decision.<agent>.<workflow>  signed governance decisions, for that agent only
    gm.<t>.tool.<tool>                  tool calls to the gateway (tool names may contain dots)
    gm.<t>.result.<agent>               the gateway's record of each answer to a call of <agent>
    gm.<t>.usage.<agent>                model usage for the budget actor
    gm.<t>.state.<agent>                snapshots for the state actor (not in the event stream)
    gm.<t>.snapshot.<agent>             what the state actor stored of them, without content
    gm.<t>.msg.<agent>                  agent-to-agent messages
    gm.<t>.approval.<workflow>          approval requests and answers
    gm.<t>.ctl.<service>                queries to platform actors
    gm.<t>.security                     security events

Outside the tenant's tree (not captured by the event stream)::

    _INBOX.<t>.<member>.>               reply inboxes of one member (nats-py ``inbox_prefix``)
    $JS.API.STREAM.<op>.<stream>        the JetStream API on the tenant's stream, which is
    $JS.API.CONSUMER.<op>.<stream>...   named ``GOVMESH_EVENTS_<t>`` (`Subjects.event_stream`)
    $JS.ACK.<stream>.<consumer>...      acknowledgements of what a consumer read
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "EVENT_STREAM_PREFIX",
    "GOVERNANCE_SERVICE",
    "INBOX_ROOT",
    "ROOT",
    "TOKEN_SERVICE",
    "Subjects",
    "inbox_owner",
    "validate_token",
]

TOKEN_SERVICE: Final = "identity"
"""The ``ctl`` service that renews Agent-ID tokens; every member asks it."""
GOVERNANCE_SERVICE: Final = "governance"
"""The ``ctl`` service of governance: operators ask it for the approvals, the
coordinator records workflow starts there."""

ROOT: Final = "gm"
INBOX_ROOT: Final = "_INBOX"
JETSTREAM_ROOT: Final = "$JS.API"
JETSTREAM_ACK: Final = "$JS.ACK"
EVENT_STREAM_PREFIX: Final = "GOVMESH_EVENTS_"
"""A tenant's event stream is this prefix and the tenant id."""
_TOKEN = re.compile(r"^[A-Za-z0-9_\-:]+$")
_TOOL = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_DEEP_AREAS: Final = frozenset({"tool", "decision"})
"""Areas whose subjects have more than one token after the area."""


def validate_token(value: str, *, what: str) -> str:
    """Return ``value`` if it is a single subject token, else raise ValueError quoting it."""
    if not _TOKEN.match(value):
        raise ValueError(
            f"{what} must be letters, digits, '_', '-' or ':' (no dots, spaces or "
            f"wildcards): {value!r}"
        )
    return value


def inbox_owner(subject: str) -> str:
    """The agent whose inbox (`Subjects.msg`) ``subject`` is, of any tenant; empty for any
    other subject."""
    parts = subject.split(".")
    if len(parts) == 4 and parts[0] == ROOT and parts[2] == "msg":
        return parts[3]
    return ""


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

    def decision(self, agent: str, workflow: str) -> str:
        """Where governance publishes its decisions for ``agent`` on ``workflow``."""
        workflow = validate_token(workflow, what="workflow id")
        return f"{self._one('decision', agent, 'agent id')}.{workflow}"

    def decisions(self, agent: str) -> str:
        """Wildcard for every decision for ``agent``: the one subscription it may make."""
        return f"{self._one('decision', agent, 'agent id')}.*"

    def tool(self, tool: str) -> str:
        """Where the gateway receives calls of ``tool``."""
        if not _TOOL.match(tool):
            raise ValueError(f"tool name must be dot-separated words: {tool!r}")
        return f"{self.prefix}.tool.{tool}"

    def result(self, agent: str) -> str:
        """Where the gateway records each answer it gave a tool call of ``agent``: the answer
        itself goes to the caller's reply inbox, which the event stream does not record."""
        return self._one("result", agent, "agent id")

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
        if area in _DEEP_AREAS:
            return f"{self.prefix}.{area}.>"
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
    def event_stream(self) -> str:
        """The name of the JetStream stream that records this tenant's events."""
        return f"{EVENT_STREAM_PREFIX}{self.tenant}"

    @property
    def jetstream_read(self) -> tuple[str, ...]:
        """The JetStream subjects needed to replay this tenant's stream: create, read and
        inspect consumers of it, inspect it, and acknowledge what was read; nothing of
        another tenant's stream, and no deleting, purging or changing anything."""
        stream = self.event_stream
        return (
            f"{JETSTREAM_ROOT}.STREAM.INFO.{stream}",
            # nats-py names every consumer it creates: CREATE.<stream>.<name>[.<filter>].
            f"{JETSTREAM_ROOT}.CONSUMER.CREATE.{stream}.>",
            f"{JETSTREAM_ROOT}.CONSUMER.INFO.{stream}.*",
            f"{JETSTREAM_ROOT}.CONSUMER.MSG.NEXT.{stream}.*",
            f"{JETSTREAM_ACK}.{stream}.>",
        )

    @property
    def jetstream_admin(self) -> tuple[str, ...]:
        """The JetStream subjects needed to set up this tenant's stream: create it (a
        create never changes an existing stream) and inspect it and its consumers; not
        updating, purging or deleting it, nor anything of another tenant's stream."""
        stream = self.event_stream
        return (
            f"{JETSTREAM_ROOT}.STREAM.CREATE.{stream}",
            f"{JETSTREAM_ROOT}.STREAM.INFO.{stream}",
            f"{JETSTREAM_ROOT}.CONSUMER.INFO.{stream}.*",
        )
