"""Price tables: every token kind a provider reports is priced, a reservation's maximum
covers any split of a call's tokens, and a model with no price fails at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from govmesh.errors import ConfigError, ScenarioError
from govmesh.forecasting import Price
from govmesh.forecasting._prices import load_price_file

ROOT = Path(__file__).parent.parent
FULL = Price(
    input_per_1k=3.0,
    output_per_1k=15.0,
    cache_read_per_1k=0.3,
    cache_write_per_1k=3.75,
    reasoning_per_1k=20.0,
)


def test_every_token_kind_is_priced_and_missing_kinds_take_the_base_price() -> None:
    assert FULL.cost(
        1000, 1000, cache_read_tokens=1000, cache_write_tokens=1000, reasoning_tokens=1000
    ) == pytest.approx(3.0 + 15.0 + 0.3 + 3.75 + 20.0)
    plain = Price(input_per_1k=3.0, output_per_1k=15.0)
    assert plain.cost(0, 0, cache_read_tokens=1000, cache_write_tokens=1000) == pytest.approx(6.0)
    assert plain.cost(0, 0, reasoning_tokens=1000) == pytest.approx(15.0)


@given(
    prompt=st.integers(0, 200_000),
    completion=st.integers(0, 50_000),
    prompt_split=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    reasoning_share=st.floats(0, 1),
)
def test_the_maximum_cost_covers_any_split_of_the_tokens(
    prompt: int, completion: int, prompt_split: tuple[float, float], reasoning_share: float
) -> None:
    read = int(prompt * prompt_split[0])
    write = int((prompt - read) * prompt_split[1])
    reasoning = int(completion * reasoning_share)
    actual = FULL.cost(
        prompt - read - write,
        completion - reasoning,
        cache_read_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=reasoning,
    )
    assert actual <= FULL.max_cost(prompt, completion) + 1e-9


def test_a_price_file_loads_and_a_bad_entry_names_the_file_model_and_field(tmp_path) -> None:
    assert load_price_file(ROOT / "prices" / "models.yaml")["simulated-small"].input_per_1k == 0.003
    bad = tmp_path / "prices.yaml"
    bad.write_text("fast-model:\n  input_per_1k: -1\n  output_per_1k: 0.01\n")
    with pytest.raises(ConfigError) as info:
        load_price_file(bad)
    assert str(bad) in str(info.value) and "input_per_1k" in str(info.value)
    assert "-1" in str(info.value)
    bad.write_text("fast-model:\n  input_per_1k: 0.1\n  output_per_1k: 0.01\n  cache_hit: 1\n")
    with pytest.raises(ConfigError, match="cache_hit"):
        load_price_file(bad)
    with pytest.raises(ConfigError, match="cannot read price table"):
        load_price_file(tmp_path / "missing.yaml")


def test_a_scenario_names_its_price_file_and_a_model_without_a_price_is_refused(
    tmp_path,
) -> None:
    from govmesh.scenarios import load_scenario

    runaway = load_scenario(ROOT / "scenarios" / "runaway.yaml")
    assert runaway.prices["simulated-small"].cache_write_per_1k == 0.00375
    text = (ROOT / "scenarios" / "runaway.yaml").read_text()
    unpriced = tmp_path / "unpriced.yaml"
    unpriced.write_text(
        text.replace("../prices/models.yaml", str(tmp_path / "other.yaml")).replace(
            "../policies/", str(ROOT / "policies") + "/"
        )
    )
    (tmp_path / "other.yaml").write_text("another-model: {input_per_1k: 1, output_per_1k: 1}\n")
    with pytest.raises(ScenarioError, match="has no entry under prices; a model is never free"):
        load_scenario(unpriced)


def test_an_agent_whose_model_has_no_price_cannot_be_built() -> None:
    from govmesh.agents import AgentService
    from govmesh.forecasting import BudgetCaps
    from govmesh.identity import Issuer
    from govmesh.llm import SimulatedModel, SimulatedModelSettings

    issuer = Issuer(name="t", audience="govmesh:t")
    dep = issuer.deployment(tenant="t", nats_url="nats://127.0.0.1:1", redis_url="redis://x")
    model = SimulatedModel(SimulatedModelSettings(name="unpriced"), seed=1)
    with pytest.raises(ConfigError, match="'unpriced' has no price"):
        AgentService(
            dep,
            issuer.identity("p-1", "agent"),
            model=model,
            prices={"simulated-small": Price(input_per_1k=1, output_per_1k=1)},
            budget=BudgetCaps(workflow_usd=1.0),
        )
    with pytest.raises(ConfigError, match="need a price table"):
        AgentService(dep, issuer.identity("p-2", "agent"), model=model, budget=BudgetCaps())
