"""The role names every part of govmesh shares, in one place.

A member's role decides its NATS permissions (`govmesh.identity.permissions_for`) and is named
in its Agent-ID token. Agent roles are named by scenarios; these are the generic agent role
and the platform's own roles.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "AGENT_ROLE",
    "AUDITOR_ROLE",
    "BUDGET_ROLE",
    "COORDINATOR_ROLE",
    "GATEWAY_ROLE",
    "GOVERNANCE_ROLE",
    "ISSUER_ROLE",
    "OPERATOR_ROLE",
    "PLATFORM_ROLES",
    "SENTINEL_ROLE",
    "STATE_ROLE",
]

AGENT_ROLE: Final = "agent"
GOVERNANCE_ROLE: Final = "governance"
GATEWAY_ROLE: Final = "gateway"
BUDGET_ROLE: Final = "budget"
STATE_ROLE: Final = "state"
ISSUER_ROLE: Final = "issuer"
OPERATOR_ROLE: Final = "operator"
COORDINATOR_ROLE: Final = "coordinator"
AUDITOR_ROLE: Final = "auditor"
SENTINEL_ROLE: Final = "sentinel"
"""The member that reports what the embedded nats-server refused (`ServerSentinel`)."""
PLATFORM_ROLES: Final = frozenset(
    {
        GOVERNANCE_ROLE,
        GATEWAY_ROLE,
        BUDGET_ROLE,
        STATE_ROLE,
        ISSUER_ROLE,
        OPERATOR_ROLE,
        COORDINATOR_ROLE,
        AUDITOR_ROLE,
        SENTINEL_ROLE,
    }
)
