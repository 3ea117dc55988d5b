"""A model as a scenario or an app names it: simulated, OpenAI-compatible or Anthropic."""

from __future__ import annotations

from typing import TypeAlias

from govmesh.llm._anthropic import AnthropicModel, AnthropicSettings
from govmesh.llm._openai import OpenAIModel, OpenAISettings
from govmesh.llm._provider import ModelProvider
from govmesh.llm._simulated import SimulatedModel, SimulatedModelSettings

__all__ = ["ModelSettings", "model_of", "priced_name", "provider_of"]

ModelSettings: TypeAlias = SimulatedModelSettings | OpenAISettings | AnthropicSettings
"""A model's settings, told apart by ``provider:`` (``simulated`` when it is absent)."""


def model_of(settings: ModelSettings, *, seed: int) -> ModelProvider:
    """The provider ``settings`` describe; call it in the agent's actor, whose environment
    holds the API key. ``seed`` seeds a simulated model.

    Raises:
        ConfigError: the API key's variable is not set here.
    """
    match settings:
        case OpenAISettings():
            return OpenAIModel(settings)
        case AnthropicSettings():
            return AnthropicModel(settings)
        case _:
            return SimulatedModel(settings, seed=seed)


def priced_name(settings: ModelSettings) -> str:
    """The model's name as priced and reported."""
    if isinstance(settings, SimulatedModelSettings):
        return settings.name
    return settings.priced_as


def provider_of(settings: ModelSettings) -> str:
    """The provider's name as reports show it: ``openai``, ``anthropic`` or ``simulated``."""
    match settings:
        case OpenAISettings():
            return OpenAIModel.provider
        case AnthropicSettings():
            return AnthropicModel.provider
        case _:
            return "simulated"
