"""Model providers behind one interface: OpenAI-compatible, Anthropic, and simulated."""

from govmesh.llm._anthropic import AnthropicModel, AnthropicSettings
from govmesh.llm._models import ModelSettings, model_of, priced_name, provider_of
from govmesh.llm._openai import OpenAIModel, OpenAISettings
from govmesh.llm._provider import (
    Message,
    ModelProvider,
    ModelRequest,
    ModelResponse,
    ToolCall,
    ToolDef,
    prompt_bytes,
    schema_problem,
)
from govmesh.llm._simulated import SimulatedModel, SimulatedModelSettings, TokenSpread

__all__ = [
    "AnthropicModel",
    "AnthropicSettings",
    "Message",
    "ModelProvider",
    "ModelRequest",
    "ModelResponse",
    "ModelSettings",
    "OpenAIModel",
    "OpenAISettings",
    "SimulatedModel",
    "SimulatedModelSettings",
    "TokenSpread",
    "ToolCall",
    "ToolDef",
    "model_of",
    "priced_name",
    "prompt_bytes",
    "provider_of",
    "schema_problem",
]
