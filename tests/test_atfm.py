"""ATFM cost forecasting: the formula, calibration from recorded usage, forecasts held
against runs they never saw, the usage history, and `govmesh forecast`.

Synthetic usage comes from a seeded generator with known parameters. Every tolerance is
four standard errors of the quantity checked, worked out from the sample size and the
generator's parameters, so a check would fail by chance about once in 16,000 seeds.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from govmesh.cli import cli
from govmesh.errors import ConfigError
from govmesh.forecasting import (
    AtfmParams,
    UsageHistory,
    WorkflowUsage,
    calibrate,
    check_forecast,
    forecast,
    workflow_costs,
)

ROOT = Path(__file__).parent.parent
SCENARIO_FILE = ROOT / "scenarios" / "procurement.yaml"
SCENARIO = "procurement"  # the name inside SCENARIO_FILE
PRICE_IN, PRICE_OUT = 0.003, 0.015  # USD per 1K tokens
TRAIN, HELD_OUT = 2000, 1000  # workflows
Z: float = 4.0  # standard errors allowed in every statistical check

WORKED = {
    "iterations": 80,
    "tokens_per_iteration": 6000,
    "cost_per_1k": 0.004,
    "error_probability": 0.12,
    "retry_multiplier": 3,
}


@dataclass(frozen=True)
class Truth:
    """How the generator makes one role's usage: a uniform number of useful answers, and
    every call unusable with probability ``p`` and then retried."""

    iter_lo: int
    iter_hi: int
    p: float
    in_mean: float
    in_sd: float
    out_mean: float
    out_sd: float

    @property
    def iterations(self) -> float:
        return (self.iter_lo + self.iter_hi) / 2

    @property
    def iterations_sd(self) -> float:
        k = self.iter_hi - self.iter_lo + 1
        return math.sqrt((k * k - 1) / 12)

    @property
    def tokens_per_call(self) -> float:
        return self.in_mean + self.out_mean

    @property
    def cost_per_token(self) -> float:
        return (self.in_mean * PRICE_IN + self.out_mean * PRICE_OUT) / 1000 / self.tokens_per_call


ROLES = {
    "Requester": Truth(1, 3, 0.05, 400, 80, 120, 30),
    "Procurement-Agent-v2": Truth(5, 15, 0.12, 1200, 250, 350, 90),
}


def synthetic(seed: int, workflows: int, *, run_id: str | None = None) -> list[WorkflowUsage]:
    """Recorded usage of ``workflows`` workflows of `SCENARIO`, drawn from `ROLES`."""
    rng = random.Random(seed)
    run_id = run_id or f"run-{seed}"
    records = []
    for w in range(workflows):
        for role, truth in ROLES.items():
            needed = rng.randint(truth.iter_lo, truth.iter_hi)
            calls = errors = tokens_in = tokens_out = 0
            while calls - errors < needed:
                calls += 1
                tokens_in += max(1, round(rng.gauss(truth.in_mean, truth.in_sd)))
                tokens_out += max(1, round(rng.gauss(truth.out_mean, truth.out_sd)))
                errors += rng.random() < truth.p
            records.append(
                WorkflowUsage(
                    scenario=SCENARIO,
                    run_id=run_id,
                    seed=seed,
                    workflow=f"wf-{w}",
                    role=role,
                    model="simulated-small",
                    calls=calls,
                    errors=errors,
                    input_tokens=tokens_in,
                    output_tokens=tokens_out,
                    cost_usd=(tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1000,
                )
            )
    return records


@pytest.fixture(scope="module")
def train() -> list[WorkflowUsage]:
    return synthetic(1, TRAIN)


def usage(
    workflow: str, role: str, cost: float, *, calls: int = 1, errors: int = 0
) -> WorkflowUsage:
    return WorkflowUsage(
        scenario=SCENARIO,
        run_id="r",
        seed=0,
        workflow=workflow,
        role=role,
        model="m",
        calls=calls,
        errors=errors,
        input_tokens=1000 * calls,
        output_tokens=0,
        cost_usd=cost,
    )


# The formula


def test_worked_example_gives_ref_1_36_and_2_6112_usd() -> None:
    params = AtfmParams(**WORKED)
    assert params.ref == 1.36
    assert params.expected_cost_usd == 2.6112


def test_worked_example_p95_is_the_poisson_quantile_of_retries() -> None:
    params = AtfmParams(**WORKED)
    lam = 80 * 0.12
    # (80 + 3q) * 6000 * 0.004 / 1000 = p95, so q is:
    q = round((params.p95_cost_usd / 0.024 - 80) / 3)
    cdf = [
        math.fsum(math.exp(-lam) * lam**k / math.factorial(k) for k in range(n + 1))
        for n in (q - 1, q)
    ]
    assert cdf[0] < 0.95 <= cdf[1]
    assert params.p95_cost_usd == 3.0


def test_p95_of_rare_errors_is_not_below_the_expected_cost() -> None:
    params = AtfmParams(
        iterations=10,
        tokens_per_iteration=1000,
        cost_per_1k=0.01,
        error_probability=0.001,
        retry_multiplier=5,
    )
    assert params.p95_cost_usd == params.expected_cost_usd


def test_p95_of_a_huge_workload_is_computed_without_underflow() -> None:
    params = AtfmParams(
        iterations=1e7,
        tokens_per_iteration=1000,
        cost_per_1k=0.01,
        error_probability=0.1,
        retry_multiplier=2,
    )
    lam = 1e6
    excess = (params.p95_cost_usd / 0.01 - 1e7) / 2  # the Poisson quantile q
    assert excess == pytest.approx(lam + 1.645 * math.sqrt(lam), abs=3)


@pytest.mark.parametrize(
    ("name", "value", "quoted"),
    [
        ("iterations", -1, "-1"),
        ("tokens_per_iteration", float("nan"), "nan"),
        ("cost_per_1k", float("inf"), "inf"),
        ("error_probability", 1.5, "1.5"),
        ("retry_multiplier", -0.25, "-0.25"),
        ("iterations", "80", "'80'"),
    ],
)
def test_invalid_parameter_is_refused_quoting_it(name: str, value: object, quoted: str) -> None:
    with pytest.raises(ConfigError, match=name) as caught:
        AtfmParams(**{**WORKED, name: value})
    assert quoted in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(
    iterations=st.floats(0, 1e4),
    tokens=st.floats(0, 1e5),
    price=st.floats(0, 1),
    p=st.floats(0, 1),
    q=st.floats(0, 1),
    multiplier=st.floats(0, 20),
)
def test_cost_grows_with_error_probability_and_p95_bounds_it(
    iterations: float, tokens: float, price: float, p: float, q: float, multiplier: float
) -> None:
    low, high = sorted((p, q))
    a, b = (
        AtfmParams(
            iterations=iterations,
            tokens_per_iteration=tokens,
            cost_per_1k=price,
            error_probability=e,
            retry_multiplier=multiplier,
        )
        for e in (low, high)
    )
    assert a.ref >= 1
    assert a.expected_cost_usd <= b.expected_cost_usd
    assert a.p95_cost_usd >= a.expected_cost_usd


# Calibration


def test_calibration_recovers_the_generators_parameters(train: list[WorkflowUsage]) -> None:
    fit = calibrate(train).scenario(SCENARIO)
    assert fit.workflows == TRAIN
    assert [r.role for r in fit.roles] == sorted(ROLES)
    for r in fit.roles:
        truth, p, se = ROLES[r.role], r.params, r.stderr
        assert se is not None
        calls = sum(s.calls for s in fit.samples if s.role == r.role)
        # Calls are independent given the generator, so the textbook errors apply.
        expected_se = {
            "iterations": truth.iterations_sd / math.sqrt(TRAIN),
            "error_probability": math.sqrt(truth.p * (1 - truth.p) / calls),
            "retry_multiplier": math.sqrt(truth.p * (1 - truth.p) / calls) / (1 - truth.p) ** 2,
            "tokens_per_iteration": math.hypot(truth.in_sd, truth.out_sd) / math.sqrt(calls),
            "cost_per_1k": 1000
            * math.sqrt(
                (
                    (truth.in_sd * (PRICE_IN / 1000 - truth.cost_per_token)) ** 2
                    + (truth.out_sd * (PRICE_OUT / 1000 - truth.cost_per_token)) ** 2
                )
                / calls
            )
            / truth.tokens_per_call,
        }
        true_value = {
            "iterations": truth.iterations,
            "error_probability": truth.p,
            "retry_multiplier": 1 / (1 - truth.p),  # every unusable answer retried
            "tokens_per_iteration": truth.tokens_per_call,
            "cost_per_1k": truth.cost_per_token * 1000,
        }
        for name, value in true_value.items():
            fitted = getattr(p, name)
            assert abs(fitted - value) <= Z * expected_se[name], (r.role, name, fitted, value)
            # The fit's own standard error agrees with the textbook one; it is estimated
            # from 2,000 workflows, so to within a few per cent, well inside 25%.
            assert getattr(se, name) == pytest.approx(expected_se[name], rel=0.25), (r.role, name)
        # iterations * REF is the mean number of calls, by construction of the multiplier.
        assert p.iterations * p.ref == pytest.approx(calls / TRAIN, rel=1e-9)
        assert r.iterations_sd == pytest.approx(truth.iterations_sd, rel=0.1)


def test_expected_cost_of_a_role_is_its_mean_recorded_cost(train: list[WorkflowUsage]) -> None:
    fit = calibrate(train).scenario(SCENARIO)
    for r in fit.roles:
        costs = [s.cost_usd for s in fit.samples if s.role == r.role]
        assert r.expected_cost_usd == pytest.approx(statistics.fmean(costs), rel=1e-9)


def test_a_role_missing_from_a_workflow_made_no_calls_there() -> None:
    records = [usage(f"w{i}", "a", 1.0) for i in range(4)] + [usage("w0", "b", 2.0)]
    fit = calibrate(records).scenario(SCENARIO)
    b = next(r for r in fit.roles if r.role == "b")
    assert b.params.iterations == 0.25
    assert b.expected_cost_usd == 0.5
    assert len(fit.samples) == 8


def test_a_role_with_no_usable_answer_cannot_be_calibrated() -> None:
    with pytest.raises(ConfigError, match="no retry multiplier"):
        calibrate([usage("w0", "a", 1.0, calls=3, errors=3)])


def test_unknown_scenario_is_named() -> None:
    with pytest.raises(ConfigError, match="'elsewhere'"):
        calibrate([usage("w0", "a", 1.0)]).scenario("elsewhere")


# Forecasts


def test_forecast_of_held_out_runs_lands_within_its_error(train: list[WorkflowUsage]) -> None:
    calibration = calibrate(train)
    result = forecast(calibration, SCENARIO, HELD_OUT, seed=3)
    held_out = synthetic(2, HELD_OUT)
    actual = workflow_costs(held_out, SCENARIO)
    check = check_forecast(result, actual)

    recorded = calibration.scenario(SCENARIO).workflow_costs()
    cv = statistics.stdev(recorded) / statistics.fmean(recorded)
    # Noise of the held-out total plus that of the mean learnt from the records.
    total_tolerance = Z * cv * math.sqrt(1 / HELD_OUT + 1 / TRAIN)
    assert total_tolerance < 0.05  # a few per cent at these sample sizes
    assert check.total_error is not None
    assert abs(check.total_error) <= total_tolerance

    # Binomial noise of the held-out share, plus that of the recorded P90's own coverage.
    coverage_tolerance = Z * math.sqrt(0.9 * 0.1 * (1 / HELD_OUT + 1 / TRAIN))
    assert abs(check.p90_coverage - 0.9) <= coverage_tolerance


def test_total_bounds_have_the_spread_of_a_sum_of_workflows(train: list[WorkflowUsage]) -> None:
    calibration = calibrate(train)
    result = forecast(calibration, SCENARIO, 500, seed=5)
    assert result.total_method == "bootstrap"
    recorded = calibration.scenario(SCENARIO).workflow_costs()
    assert result.expected_cost_usd == pytest.approx(500 * statistics.fmean(recorded), rel=1e-9)
    assert result.p5_cost_usd < result.expected_cost_usd < result.p95_cost_usd
    # A sum of 500 workflows is close to normal, with the spread of the sum plus that of the
    # mean learnt from the records; 2,000 draws pin its P5-P95 width to about 2%, so 10% is
    # far outside the noise.
    variance = 500 + 500**2 / len(recorded)
    normal_width = 2 * 1.645 * statistics.pstdev(recorded) * math.sqrt(variance)
    assert result.p95_cost_usd - result.p5_cost_usd == pytest.approx(normal_width, rel=0.1)


def test_forecast_is_deterministic_for_a_seed(train: list[WorkflowUsage]) -> None:
    calibration = calibrate(train)
    first = forecast(calibration, SCENARIO, 50, seed=9, draws=300)
    assert forecast(calibration, SCENARIO, 50, seed=9, draws=300) == first
    assert forecast(calibrate(list(train)), SCENARIO, 50, seed=9, draws=300) == first


def test_many_workflows_use_the_normal_approximation(train: list[WorkflowUsage]) -> None:
    calibration = calibrate(train)
    result = forecast(calibration, SCENARIO, 100_000)
    assert result.total_method == "normal"
    mid = (result.p5_cost_usd + result.p95_cost_usd) / 2
    assert mid == pytest.approx(result.expected_cost_usd, rel=1e-9)


def test_per_workflow_p90_resamples_whole_workflows() -> None:
    # Both roles cost k in workflow k: drawn together the totals are 2, 4, ..., 20.
    records = [usage(f"w{k}", role, float(k)) for k in range(1, 11) for role in ("a", "b")]
    result = forecast(calibrate(records), SCENARIO, 1, draws=100)
    assert result.per_workflow_p90_usd == pytest.approx(18.2)
    assert result.per_workflow_expected_usd == 11.0
    assert [r.role for r in result.roles] == ["a", "b"]


@pytest.mark.parametrize(("workflows", "draws"), [(0, 2000), (10, 5)])
def test_forecast_arguments_out_of_range_are_quoted(workflows: int, draws: int) -> None:
    calibration = calibrate([usage("w0", "a", 1.0)])
    with pytest.raises(ConfigError, match=f"got {min(workflows, draws)}"):
        forecast(calibration, SCENARIO, workflows, draws=draws)


def test_check_needs_one_actual_cost_per_forecast_workflow() -> None:
    result = forecast(calibrate([usage("w0", "a", 1.0)]), SCENARIO, 3, draws=100)
    with pytest.raises(ConfigError, match="3 workflows, got the costs of 2"):
        check_forecast(result, [1.0, 1.0])


# The usage history


def test_history_round_trips_and_is_private(tmp_path: Path) -> None:
    history = UsageHistory(tmp_path)
    records = synthetic(4, 3)
    assert history.read(SCENARIO) == []
    assert history.append(records[:2]) == 2
    assert history.append(records[2:]) == len(records) - 2
    assert history.read(SCENARIO) == records
    assert history.path(SCENARIO) == tmp_path / "usage" / f"{SCENARIO}.jsonl"
    assert (tmp_path / "usage").stat().st_mode & 0o777 == 0o700
    assert history.path(SCENARIO).stat().st_mode & 0o777 == 0o600


def test_history_lives_under_govmesh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(tmp_path))
    UsageHistory().append(synthetic(4, 1))
    assert (tmp_path / "usage" / f"{SCENARIO}.jsonl").exists()


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"{not json", "not a usage record"),
        (b'{"scenario": "procurement"}', "missing required field"),
        (b"", ""),  # replaced below by a record whose errors exceed its calls
    ],
)
def test_malformed_history_line_is_named(tmp_path: Path, line: bytes, why: str) -> None:
    history = UsageHistory(tmp_path)
    history.append(synthetic(4, 1)[:1])
    if not line:
        bad = msgspec.to_builtins(synthetic(4, 1)[0])
        line, why = json.dumps({**bad, "errors": bad["calls"] + 1}).encode(), "exceed calls"
    with history.path(SCENARIO).open("ab") as f:
        f.write(b"\n" + line + b"\n")
    with pytest.raises(ConfigError, match=why) as caught:
        history.read(SCENARIO)
    assert f"{history.path(SCENARIO)}:3" in str(caught.value)


def test_scenario_name_that_is_a_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'\.\./x'"):
        UsageHistory(tmp_path).read("../x")


# govmesh forecast


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GOVMESH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _flags(**overrides: object) -> list[str]:
    values = {**WORKED, **overrides}
    return [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def test_cli_worked_example_writes_ref_and_cost(tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    result = CliRunner().invoke(cli, ["forecast", *_flags(), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["ref"] == 1.36
    assert report["expected_cost_usd"] == 2.6112
    assert report["p95_cost_usd"] == 3.0
    assert {k: report[k] for k in WORKED} == WORKED
    assert "Poisson" in report["p95_method"]
    assert "2.6112" in result.stdout


def test_cli_invalid_parameter_is_quoted() -> None:
    result = CliRunner().invoke(cli, ["forecast", *_flags(error_probability=1.5)])
    assert result.exit_code == 2
    assert "error_probability must be between 0 and 1, got 1.5" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a SCENARIO"),
        ([str(SCENARIO_FILE), "--workflows", "5", "--iterations", "3"], "not both"),
        (["--iterations", "3"], "missing --tokens-per-iteration"),
        ([*_flags(), "--workflows", "5"], "go with a SCENARIO"),
        ([str(SCENARIO_FILE)], "give --workflows N"),
    ],
)
def test_cli_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["forecast", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_scenario_without_history_says_to_run_it_first(home: Path) -> None:
    result = CliRunner().invoke(cli, ["forecast", str(SCENARIO_FILE), "--workflows", "10"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert f"no usage of scenario '{SCENARIO}' is recorded yet" in text
    assert f"run `govmesh run {SCENARIO_FILE}` first" in text
    assert len(result.output.strip().splitlines()) == 1


def test_cli_scenario_forecast_reports_roles_and_bounds(
    home: Path, tmp_path: Path, train: list[WorkflowUsage]
) -> None:
    UsageHistory().append(train[:400])  # 200 workflows
    out = tmp_path / "f.json"
    args = ["forecast", str(SCENARIO_FILE), "-n", "50", "--seed", "2", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == {
        "scenario",
        "workflows",
        "seed",
        "draws",
        "recorded_workflows",
        "expected_cost_usd",
        "p5_cost_usd",
        "p95_cost_usd",
        "per_workflow_expected_usd",
        "per_workflow_p90_usd",
        "total_method",
        "roles",
        "method",
    }
    assert (report["scenario"], report["workflows"], report["recorded_workflows"]) == (
        SCENARIO,
        50,
        200,
    )
    assert report["p5_cost_usd"] < report["expected_cost_usd"] < report["p95_cost_usd"]
    assert [r["role"] for r in report["roles"]] == sorted(ROLES)
    assert set(report["roles"][0]["params"]) == set(WORKED)
    again = forecast(calibrate(train[:400]), SCENARIO, 50, seed=2)
    assert report["expected_cost_usd"] == again.expected_cost_usd
    assert report["p95_cost_usd"] == again.p95_cost_usd
    assert "Procurement-Agent-v2" in result.stdout


def test_cli_scenario_with_a_broken_history_line_names_it(home: Path) -> None:
    path = UsageHistory().path(SCENARIO)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"oops\n")
    result = CliRunner().invoke(cli, ["forecast", str(SCENARIO_FILE), "-n", "5"])
    assert result.exit_code == 2
    assert f"{path}:1" in " ".join(result.output.split())
