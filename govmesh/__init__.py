"""govmesh: governed multi-agent workflow automation.

The public API: what user code (agents, tools, workflows, apps) imports. Names load on
first use, so ``import govmesh`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from govmesh.errors import ConfigError, GovmeshError, ModelError, ToolError

if TYPE_CHECKING:
    from govmesh.agents._base import RetryPolicy
    from govmesh.agents._sdk import (
        Agent,
        Denied,
        Halted,
        ToolFailed,
        TurnsExhausted,
        Workflow,
        handler,
    )
    from govmesh.agents.messages import Outcome, WorkflowStart
    from govmesh.bus import SecurityEvent
    from govmesh.forecasting.messages import Usage
    from govmesh.governance.messages import ApprovalAnswer, ApprovalRequest, Decision
    from govmesh.llm import (
        AnthropicSettings,
        Message,
        ModelProvider,
        ModelRequest,
        ModelResponse,
        OpenAISettings,
        SimulatedModel,
        SimulatedModelSettings,
        TokenSpread,
        ToolCall,
    )
    from govmesh.observability import (
        Event,
        EventError,
        EventStart,
        EventStream,
        RefusedMessage,
    )
    from govmesh.observability._prometheus import PrometheusEndpoint
    from govmesh.reservations import BudgetError
    from govmesh.scenarios._app import AgentDef, App
    from govmesh.tools._registry import ToolContext
    from govmesh.tools._spec import Effect, ToolSpec, tool
    from govmesh.tools.messages import ToolResult

try:
    __version__ = version("govmesh")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "Agent": "govmesh.agents._sdk",
    "Denied": "govmesh.agents._sdk",
    "Halted": "govmesh.agents._sdk",
    "ToolFailed": "govmesh.agents._sdk",
    "TurnsExhausted": "govmesh.agents._sdk",
    "Workflow": "govmesh.agents._sdk",
    "handler": "govmesh.agents._sdk",
    "RetryPolicy": "govmesh.agents._base",
    "AnthropicSettings": "govmesh.llm",
    "Message": "govmesh.llm",
    "OpenAISettings": "govmesh.llm",
    "ToolCall": "govmesh.llm",
    "ModelProvider": "govmesh.llm",
    "ModelRequest": "govmesh.llm",
    "ModelResponse": "govmesh.llm",
    "SimulatedModel": "govmesh.llm",
    "SimulatedModelSettings": "govmesh.llm",
    "TokenSpread": "govmesh.llm",
    "BudgetError": "govmesh.reservations",
    "AgentDef": "govmesh.scenarios._app",
    "Outcome": "govmesh.agents.messages",
    "WorkflowStart": "govmesh.agents.messages",
    "SecurityEvent": "govmesh.bus",
    "Usage": "govmesh.forecasting.messages",
    "ApprovalAnswer": "govmesh.governance.messages",
    "ApprovalRequest": "govmesh.governance.messages",
    "Decision": "govmesh.governance.messages",
    "Event": "govmesh.observability",
    "EventError": "govmesh.observability",
    "EventStart": "govmesh.observability",
    "EventStream": "govmesh.observability",
    "RefusedMessage": "govmesh.observability",
    "PrometheusEndpoint": "govmesh.observability._prometheus",
    "ToolResult": "govmesh.tools.messages",
    "App": "govmesh.scenarios._app",
    "ToolContext": "govmesh.tools._registry",
    "Effect": "govmesh.tools._spec",
    "ToolSpec": "govmesh.tools._spec",
    "tool": "govmesh.tools._spec",
}

__all__ = [
    "Agent",
    "AgentDef",
    "AnthropicSettings",
    "App",
    "ApprovalAnswer",
    "ApprovalRequest",
    "BudgetError",
    "ConfigError",
    "Decision",
    "Denied",
    "Effect",
    "Event",
    "EventError",
    "EventStart",
    "EventStream",
    "GovmeshError",
    "Halted",
    "Message",
    "ModelError",
    "ModelProvider",
    "ModelRequest",
    "ModelResponse",
    "OpenAISettings",
    "Outcome",
    "PrometheusEndpoint",
    "RefusedMessage",
    "RetryPolicy",
    "SecurityEvent",
    "SimulatedModel",
    "SimulatedModelSettings",
    "TokenSpread",
    "ToolCall",
    "ToolContext",
    "ToolError",
    "ToolFailed",
    "ToolResult",
    "ToolSpec",
    "TurnsExhausted",
    "Usage",
    "Workflow",
    "WorkflowStart",
    "__version__",
    "handler",
    "tool",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'govmesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
