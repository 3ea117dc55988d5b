"""Tools: ``@tool`` (a typed tool, its schema and its effects), the gateway (policy
enforcement point) that runs them, and the idempotency ledger that keeps a retried step from
repeating a tool's effect."""

from govmesh.errors import ToolArgumentError
from govmesh.tools._gateway import STEP_IN_PROGRESS, GatewayService
from govmesh.tools._ledger import LEASE_S, ClaimStatus, Entry, EntryState, Ledger
from govmesh.tools._registry import ToolContext
from govmesh.tools._spec import Effect, EffectLister, ToolSpec, load_tools, tool
from govmesh.tools.messages import ToolCall, ToolResult

__all__ = [
    "LEASE_S",
    "STEP_IN_PROGRESS",
    "ClaimStatus",
    "Effect",
    "EffectLister",
    "Entry",
    "EntryState",
    "GatewayService",
    "Ledger",
    "ToolArgumentError",
    "ToolCall",
    "ToolContext",
    "ToolResult",
    "ToolSpec",
    "load_tools",
    "tool",
]
