"""Model providers behind one interface."""

from govmesh.llm._provider import ModelProvider, ModelRequest, ModelResponse
from govmesh.llm._simulated import SimulatedModel, SimulatedModelSettings, TokenSpread

__all__ = [
    "ModelProvider",
    "ModelRequest",
    "ModelResponse",
    "SimulatedModel",
    "SimulatedModelSettings",
    "TokenSpread",
]
