"""Message bodies of state persistence."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "Snapshot",
    "SnapshotQuery",
    "SnapshotReply",
    "TimerCancel",
    "TimerFired",
    "TimerSet",
]


class Snapshot(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """One version of an agent's state for one workflow."""

    workflow: str
    version: int
    goal: dict[str, Any]
    policy_hash: str = ""


class SnapshotQuery(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Ask for the latest (``version`` 0) or one version of an agent's snapshot."""

    workflow: str
    agent: str
    version: int = 0


class SnapshotReply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The snapshot asked for, if any."""

    found: bool
    snapshot: Snapshot | None = None


class TimerSet(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Wake the sending agent for its workflow at `due_at` on the deployment's clock.

    Setting a timer of the same name for the same workflow again moves it, so an agent
    that retries a step after a crash never gets two.

    Attributes:
        name: the timer's name within the workflow, e.g. ``"vendor-reply"``.
        due_at: when it fires, on the deployment's clock (Unix seconds).
        payload: handed back in `TimerFired`.
    """

    name: str
    due_at: float
    payload: dict[str, Any] = {}


class TimerCancel(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Drop the sending agent's timer `name` for its workflow, if it has not fired."""

    name: str


class TimerFired(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A timer fell due; sent by the state actor to the agent that set it.

    Delivered at least once (again if the state actor died before it finished firing),
    so an agent acts on each (workflow, name) once.

    Attributes:
        due_at: when it was due, on the deployment's clock.
        fired_at: when it fired, on the same clock.
    """

    name: str
    due_at: float
    fired_at: float
    payload: dict[str, Any] = {}
