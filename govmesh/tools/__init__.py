"""Tools: the gateway (policy enforcement point), the tools it runs, and the idempotency
ledger that keeps a retried step from repeating a tool's effect."""

from govmesh.tools._erp import ERP_CREATE_PO, PurchaseOrder, SimulatedErp
from govmesh.tools._gateway import STEP_IN_PROGRESS, GatewayService
from govmesh.tools._ledger import LEASE_S, ClaimStatus, Entry, EntryState, Ledger
from govmesh.tools._registry import RegisteredTool, Tool, ToolContext, ToolRegistry
from govmesh.tools.messages import ToolCall, ToolResult

__all__ = [
    "ERP_CREATE_PO",
    "LEASE_S",
    "STEP_IN_PROGRESS",
    "ClaimStatus",
    "Entry",
    "EntryState",
    "GatewayService",
    "Ledger",
    "PurchaseOrder",
    "RegisteredTool",
    "SimulatedErp",
    "Tool",
    "ToolCall",
    "ToolContext",
    "ToolRegistry",
    "ToolResult",
]
