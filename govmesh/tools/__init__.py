"""Tools: the gateway (policy enforcement point) and the tools it runs."""

from govmesh.tools._erp import ERP_CREATE_PO, PurchaseOrder, SimulatedErp
from govmesh.tools._gateway import GatewayService
from govmesh.tools._registry import Tool, ToolContext
from govmesh.tools.messages import ToolCall, ToolResult

__all__ = [
    "ERP_CREATE_PO",
    "GatewayService",
    "PurchaseOrder",
    "SimulatedErp",
    "Tool",
    "ToolCall",
    "ToolContext",
    "ToolResult",
]
