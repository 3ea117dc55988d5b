"""State: snapshots of agent state, durable timers, and the state actor."""

from govmesh.state._actor import StateService
from govmesh.state._timers import Timer, TimerStore
from govmesh.state.messages import (
    Snapshot,
    SnapshotQuery,
    SnapshotReply,
    TimerCancel,
    TimerFired,
    TimerSet,
)

__all__ = [
    "Snapshot",
    "SnapshotQuery",
    "SnapshotReply",
    "StateService",
    "Timer",
    "TimerCancel",
    "TimerFired",
    "TimerSet",
    "TimerStore",
]
