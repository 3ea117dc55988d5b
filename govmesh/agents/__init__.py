"""Agents: the SDK for agents of one's own, the actor that hosts them, and the messages
between agents and the coordinator."""

from govmesh.agents._base import AgentService, RetryPolicy
from govmesh.agents._host import AgentHost
from govmesh.agents._sdk import Agent, Denied, Halted, ToolFailed, TurnsExhausted, Workflow, handler
from govmesh.agents.messages import InFlight, Outcome, WorkflowStart

__all__ = [
    "Agent",
    "AgentHost",
    "AgentService",
    "Denied",
    "Halted",
    "InFlight",
    "Outcome",
    "RetryPolicy",
    "ToolFailed",
    "TurnsExhausted",
    "Workflow",
    "WorkflowStart",
    "handler",
]
