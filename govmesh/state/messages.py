"""Message bodies of state persistence."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Snapshot", "SnapshotQuery", "SnapshotReply"]


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
