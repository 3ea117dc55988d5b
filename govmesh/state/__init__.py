"""State: snapshots of agent state and the state actor."""

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
    encode_sealed,
    seal,
    unseal,
)
from govmesh.state.messages import Snapshot, SnapshotQuery, SnapshotReply

__all__ = [
    "ENV_STATE_KEYS",
    "GOAL_LIMIT_BYTES",
    "REFLECTIONS_LIMIT_BYTES",
    "Keyring",
    "SealedSnapshot",
    "SealedTool",
    "Snapshot",
    "SnapshotQuery",
    "SnapshotReply",
    "SnapshotState",
    "StateService",
    "decode_sealed",
    "encode_sealed",
    "seal",
    "unseal",
]
