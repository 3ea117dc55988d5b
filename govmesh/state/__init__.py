"""State: hierarchical snapshots of agent state, durable timers, and the state actor."""

from govmesh.state._actor import StateService
from govmesh.state._tiers import (
    ENV_STATE_KEYS,
    GOAL_LIMIT_BYTES,
    REFLECTIONS_LIMIT_BYTES,
    Keyring,
    SealedSnapshot,
    SealedTool,
    SnapshotState,
    decode_sealed,
    encode_goal,
    encode_sealed,
    seal,
    unseal,
)
from govmesh.state._timers import Timer, TimerStore
from govmesh.state.messages import (
    Snapshot,
    SnapshotQuery,
    SnapshotRecorded,
    SnapshotReply,
    TimerCancel,
    TimerFired,
    TimerSet,
)

__all__ = [
    "ENV_STATE_KEYS",
    "GOAL_LIMIT_BYTES",
    "REFLECTIONS_LIMIT_BYTES",
    "Keyring",
    "SealedSnapshot",
    "SealedTool",
    "Snapshot",
    "SnapshotQuery",
    "SnapshotRecorded",
    "SnapshotReply",
    "SnapshotState",
    "StateService",
    "Timer",
    "TimerCancel",
    "TimerFired",
    "TimerSet",
    "TimerStore",
    "decode_sealed",
    "encode_goal",
    "encode_sealed",
    "seal",
    "unseal",
]
