"""State: snapshots of agent state and the state actor."""

from govmesh.state._actor import StateService
from govmesh.state.messages import Snapshot, SnapshotQuery, SnapshotReply

__all__ = ["Snapshot", "SnapshotQuery", "SnapshotReply", "StateService"]
