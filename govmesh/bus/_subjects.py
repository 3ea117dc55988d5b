"""The one place that builds NATS subject strings.

Scheme (``<t>`` is the tenant)::

    gm.<t>.intent.<agent>      tool intents, answered by governance
    gm.<t>.decision.<workflow> signed governance decisions
    gm.<t>.tool.<tool>         tool calls to the gateway (tool names may contain dots)
    gm.<t>.usage.<agent>       model usage for the budget actor
    gm.<t>.state.<agent>       snapshots for the state actor
    gm.<t>.msg.<agent>         agent-to-agent messages
    gm.<t>.approval.<workflow> approval requests and answers
    gm.<t>.ctl.<service>       queries to platform actors
    gm.<t>.security            security events
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["ROOT", "Subjects", "validate_token"]

ROOT: Final = "gm"
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
