"""Message bodies of state persistence."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "Snapshot",
    "SnapshotQuery",
    "SnapshotRecorded",
    "SnapshotReply",
    "SnapshotStored",
    "TimerCancel",
    "TimerFired",
    "TimerSet",
]


class Snapshot(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """One version of an agent's state for one workflow, in its four tiers.

    The state actor stores it sealed (see `govmesh.state.seal`): the goal as canonical JSON
    of at most 10 KB, the tool snapshot encrypted, the reflection log compressed.

    Attributes:
        goal: tier 1, the goal state (JSON values).
        tool: tier 2, the tool snapshot (opaque bytes; empty for none).
        reflections: tier 3, the reflection log.
        policy_hash: tier 4, the hash of the policy set in force.
    """

    workflow: str
    version: int
    goal: dict[str, Any]
    policy_hash: str = ""
    tool: bytes = b""
    reflections: tuple[str, ...] = ()


class SnapshotStored(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The state actor's answer to a snapshot sent as a request: it is durable in Redis
    (``stored``), or refused with the reason (``error``)."""

    workflow: str
    version: int
    stored: bool
    error: str = ""


class SnapshotRecorded(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """What the state actor stored of one snapshot, for the event stream and the audit
    index, which never see the snapshot itself (its tool tier travels in the clear).

    Attributes:
        agent: the agent whose snapshot it is.
        version: its version.
        stored: whether it is durable; if not, ``error`` says why it was refused.
        policy_hash: tier 4, the hash of the policy set in force.
        key_id: the key that encrypted the tool tier ("" for none).
        sealed_sha256: sha256 hex of the sealed record as stored, to match against the
            store; a hash of ciphertext, so it tells nothing about the content.
    """

    agent: str
    version: int
    stored: bool
    error: str = ""
    policy_hash: str = ""
    key_id: str = ""
    sealed_sha256: str = ""


class SnapshotQuery(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Ask for the latest (``version`` 0) or one version of an agent's snapshot.

    Only the agent itself may ask (the verified sender must be ``agent``); any other
    sender is refused, reported as a security event and answered with the reason.
    """

    workflow: str
    agent: str
    version: int = 0


class SnapshotReply(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The snapshot asked for, if any.

    Attributes:
        error: why a stored snapshot could not be opened (tampered, or its key is gone), or
            why the query was refused (another agent's snapshot); then `found` is False
            and nothing of it is returned.
    """

    found: bool
    snapshot: Snapshot | None = None
    error: str = ""


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
