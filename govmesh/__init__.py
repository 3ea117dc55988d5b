"""govmesh: governed multi-agent workflow automation.

The public API: what user code (agents, tools, workflows, apps) imports. Names load on
first use, so ``import govmesh`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from govmesh.errors import GovmeshError, ModelError, ToolError

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
    from govmesh.agents.messages import Outcome
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
    from govmesh.reservations import BudgetError
    from govmesh.scenarios._app import AgentDef, App
    from govmesh.tools._registry import ToolContext
    from govmesh.tools._spec import Effect, ToolSpec, tool

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
    "BudgetError",
    "Denied",
    "Effect",
    "GovmeshError",
    "Halted",
    "Message",
    "ModelError",
    "ModelProvider",
    "ModelRequest",
    "ModelResponse",
    "OpenAISettings",
    "Outcome",
    "RetryPolicy",
    "SimulatedModel",
    "SimulatedModelSettings",
    "TokenSpread",
    "ToolCall",
    "ToolContext",
    "ToolError",
    "ToolFailed",
    "ToolSpec",
    "TurnsExhausted",
    "Workflow",
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
