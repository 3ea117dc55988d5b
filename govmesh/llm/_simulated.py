"""A seeded simulated model for swarms, load tests and CI; always reported as simulated."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from collections.abc import Mapping
from typing import Any

import msgspec

from govmesh.llm._provider import ModelRequest, ModelResponse

__all__ = ["SimulatedModel", "SimulatedModelSettings"]


class TokenSpread(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A normal distribution of token counts, clipped to at least 1."""

    mean: float
    sd: float = 0.0


class SimulatedModelSettings(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    tag_field="provider",
    tag="simulated",
):
    """How the simulated model behaves; comes from the scenario file (``provider:
    simulated``, or no ``provider:``).

    Attributes:
        name: model name, as priced.
        input_tokens: prompt tokens per call.
        output_tokens: completion tokens per call.
        error_probability: chance that an answer is unusable and must be retried.
        latency_ms: simulated time per call.
    """

    name: str = "simulated-small"
    input_tokens: TokenSpread = TokenSpread(mean=1200, sd=200)
    output_tokens: TokenSpread = TokenSpread(mean=400, sd=80)
    error_probability: float = 0.1
    latency_ms: float = 0.0


class SimulatedModel:
    """Answers from a seeded random stream: the same (seed, request key) gives the same answer.

    Args:
        settings: behaviour from the scenario.
        seed: the run's seed.
    """

    provider = "govmesh.simulated"
    """The provider name spans report (``gen_ai.provider.name``)."""

    def __init__(self, settings: SimulatedModelSettings, *, seed: int) -> None:
        if not 0.0 <= settings.error_probability <= 1.0:
            raise ValueError(
                f"error_probability must be within [0, 1], got {settings.error_probability!r}"
            )
        self._settings = settings
        self._seed = seed

    @property
    def model(self) -> str:
        """The simulated model's name."""
        return self._settings.name

    def max_input_tokens(self, request: ModelRequest) -> int:
        """Four standard deviations above the mean: the simulated prompt is clipped there,
        as a real prompt is bounded by its length."""
        spread = self._settings.input_tokens
        return max(1, math.ceil(spread.mean + 4 * spread.sd))

    def _rng(self, key: str) -> random.Random:
        digest = hashlib.sha256(f"{self._seed}:{key}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Answer one call with seeded token counts and error."""
        rng = self._rng(request.key)
        s = self._settings
        input_tokens = max(1, round(rng.gauss(s.input_tokens.mean, s.input_tokens.sd)))
        input_tokens = min(input_tokens, self.max_input_tokens(request))
        output_tokens = max(1, round(rng.gauss(s.output_tokens.mean, s.output_tokens.sd)))
        output_tokens = min(output_tokens, request.max_tokens)
        error = rng.random() < s.error_probability
        if s.latency_ms > 0:
            await asyncio.sleep(s.latency_ms / 1000)
        if error:
            text = "(unusable answer)"
        elif request.schema is not None:
            # A usable answer to a call with a schema follows it, as a real model's
            # constrained answer does; the seeded draws above stay as they were.
            text = json.dumps(_least_instance(request.schema, request.schema))
        else:
            text = f"(simulated answer to {request.key})"
        return ModelResponse(
            text=text,
            model=s.name,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            error=error,
        )


def _least_instance(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    """The plainest value that follows ``schema``: required properties only, the first of
    an enum or a choice, the least number and the shortest string allowed. Covers what
    msgspec writes for Structs (local ``$ref``s into ``$defs`` of ``root``), not patterns
    or formats."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        return _least_instance(target, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for choice in ("anyOf", "oneOf", "allOf"):
        if choice in schema:
            return _least_instance(schema[choice][0], root)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = kind[0]
    match kind:
        case "object":
            properties = schema.get("properties", {})
            return {
                name: _least_instance(properties.get(name, {}), root)
                for name in schema.get("required", ())
            }
        case "array":
            return [_least_instance(schema.get("items", {}), root)] * schema.get("minItems", 0)
        case "string":
            return "x" * schema.get("minLength", 0)
        case "integer" | "number":
            least = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
            return math.ceil(least) if kind == "integer" else least
        case "boolean":
            return False
        case _:
            return None
