"""Start records: governance decides intents only for workflows the deployment started.

The party that starts workflows (the ``coordinator`` role) has governance record each start
before the workflow's first message goes out (`record_start`). Governance keeps the signed
record in Redis, where the decision script of every governance actor of the tenant reads it,
and answers only once it is written: so no actor can see the workflow's first intent before
its start. Recording a start again (a start sent again, a resumed run) changes nothing but
the signed record kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from govmesh.bus import Bus
from govmesh.errors import SecurityError
from govmesh.governance.messages import StartRecord, StartRecorded
from govmesh.identity import Claims
from govmesh.roles import COORDINATOR_ROLE, GOVERNANCE_ROLE
from govmesh.subjects import GOVERNANCE_SERVICE, validate_token

__all__ = ["START_RECORD_FIELD", "coordinator_only", "record_start", "start_key"]

START_RECORD_FIELD: Final = "@record"
"""The field of a start record's hash that holds the signed message; no agent id can be it
(agent ids are subject tokens)."""


def start_key(prefix: str, workflow: str) -> str:
    """The start record of ``workflow``: a hash of the agents it names (each to ``1``) and
    the signed record itself (`START_RECORD_FIELD`)."""
    return f"{prefix}:started:{workflow}"


def coordinator_only(claims: Claims, body: Any) -> None:
    """Refuse a start record from anyone but the party that starts workflows."""
    if claims.role != COORDINATOR_ROLE:
        raise SecurityError(
            "not_a_coordinator", f"{claims.sub!r} (role {claims.role!r}) sent a start record"
        )


def checked_start(workflow: str, record: StartRecord) -> None:
    """Raise ValueError, quoting the value, for a start record that names no workflow, no
    agent, or an id that is not a subject token."""
    validate_token(workflow, what="workflow id")
    if not record.agents:
        raise ValueError(f"a start record must name the agents taking part: {record.agents!r}")
    for agent in record.agents:
        validate_token(agent, what="agent id")


async def record_start(
    bus: Bus, workflow: str, agents: Iterable[str], *, timeout: float = 10.0, trace: str = ""
) -> None:
    """Have governance record that ``workflow`` was started with ``agents`` taking part,
    and return once every governance actor of the tenant decides its intents.

    ``bus`` is the coordinator's; recording the same start again is harmless. ``trace`` is
    the workflow's trace context, so the start shows in the workflow's trace.

    Raises:
        ValueError: ``workflow`` or an agent id is not a subject token, or no agent is named.
        BusError: no governance actor answered within ``timeout`` seconds (the start may
            have been recorded; record it again).
        SecurityError: the answer did not come from governance, or is about another workflow.
    """
    record = StartRecord(agents=tuple(agents))
    checked_start(workflow, record)
    reply = await bus.request(
        bus.subjects.ctl(GOVERNANCE_SERVICE),
        record,
        accepts=StartRecorded,
        timeout=timeout,
        workflow=workflow,
        trace=trace,
    )
    answered: StartRecorded = reply.body
    if reply.claims.role != GOVERNANCE_ROLE or answered.workflow != workflow:
        raise SecurityError(
            "bad_reply",
            f"{reply.claims.sub!r} (role {reply.claims.role!r}) answered the start of "
            f"{workflow!r} for {answered.workflow!r}",
        )
