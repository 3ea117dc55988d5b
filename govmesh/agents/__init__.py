"""Agents: the agent actors and the messages between them."""

from govmesh.agents._base import AgentService, RetryPolicy
from govmesh.agents._procurement import ProcurementAgent
from govmesh.agents._requester import RequesterAgent
from govmesh.agents.messages import PurchaseOutcome, PurchaseRequest, WorkflowDone, WorkflowStart

__all__ = [
    "AgentService",
    "ProcurementAgent",
    "PurchaseOutcome",
    "PurchaseRequest",
    "RequesterAgent",
    "RetryPolicy",
    "WorkflowDone",
    "WorkflowStart",
]
