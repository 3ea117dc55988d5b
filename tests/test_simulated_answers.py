"""The simulated model's answers to calls with a schema: JSON that follows it, with the same
seeded draws as without one."""

from __future__ import annotations

import pytest

from govmesh.llm import ModelRequest, SimulatedModel, SimulatedModelSettings, schema_problem
from govmesh.tools._spec import standalone_schema

from procurement.agents import Draft, Plan
from procurement.tools import Order

MODEL = SimulatedModel(SimulatedModelSettings(error_probability=0.3), seed=3)


@pytest.mark.parametrize("answer_type", [Plan, Draft, Order])
async def test_a_usable_simulated_answer_follows_the_schema_with_the_same_draws(
    answer_type: type,
) -> None:
    schema = standalone_schema(answer_type)
    usable = 0
    for i in range(40):
        plain = await MODEL.complete(ModelRequest(prompt="plan", max_tokens=500, key=f"k{i}"))
        shaped = await MODEL.complete(
            ModelRequest(prompt="plan", max_tokens=500, key=f"k{i}", schema=schema)
        )
        assert (shaped.input_tokens, shaped.output_tokens, shaped.error) == (
            plain.input_tokens,
            plain.output_tokens,
            plain.error,
        )
        if not shaped.error:
            usable += 1
            assert schema_problem(shaped.text, schema) == "", shaped.text
    assert 0 < usable < 40
