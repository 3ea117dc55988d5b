"""ATFM: the expected cost of agent work, calibrated from recorded usage, with bounds.

``expected cost = iterations * tokens per iteration * cost per 1K tokens / 1000 * REF`` and
``REF = 1 + error probability * retry multiplier``: an agent needs ``iterations`` useful
model answers, and each unusable one costs ``retry multiplier`` more iterations' worth.

Two ways in: `AtfmParams` from given figures (with a P95 that only models the retries), or
`calibrate` on recorded `WorkflowUsage` and `forecast`, which bounds totals by resampling
the recorded workflows. The forecaster learns from the records alone: it never sees how a
scenario's (simulated) model is configured.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Final, Literal

import msgspec

from govmesh.errors import ConfigError
from govmesh.forecasting._history import WorkflowUsage

__all__ = [
    "FORECAST_METHOD",
    "P95_METHOD",
    "AtfmParams",
    "Calibration",
    "Forecast",
    "ForecastCheck",
    "ParamErrors",
    "RoleFit",
    "ScenarioFit",
    "WorkflowSample",
    "calibrate",
    "check_forecast",
    "forecast",
    "workflow_costs",
]

_PARAMS: Final = (
    "iterations",
    "tokens_per_iteration",
    "cost_per_1k",
    "error_probability",
    "retry_multiplier",
)
_MIN_DRAWS: Final = 100
# Beyond this many resampled workflows (workflows x draws), the total's bounds come from
# the central limit theorem instead: resampling would take over a second, and by then each
# draw sums thousands of workflows (10,000 at the default 2,000 draws), whose total is
# normal to within the Monte Carlo noise.
_MAX_PICKS: Final = 20_000_000

P95_METHOD: Final = (
    "P95 of the cost when the number of unusable answers is Poisson with mean iterations x "
    "error_probability and each one costs retry_multiplier iterations; iterations and "
    "tokens per iteration are taken as given, so only retries vary. Never below the "
    "expected cost."
)
FORECAST_METHOD: Final = (
    "expected: per role, ATFM with parameters fitted to the recorded workflows, times the "
    "workflows forecast. P5/P95 of the total: each draw first resamples the recorded "
    "workflows (so the bounds also carry the uncertainty of a calibration fitted on a "
    "finite record), then sums that many whole workflows (all roles together) drawn from "
    "the resample; `draws` draws (normal approximation with the recorded mean and spread, "
    "and the mean's standard error, when (workflows + recorded) x draws exceeds "
    f"{_MAX_PICKS:,}). Per-workflow P90: the 90th percentile of the recorded per-workflow "
    "costs summed over roles."
)


def _tidy(x: float) -> float:
    """``x`` to 12 significant digits, so float noise of products does not show.

    The seed's example must read 1.36 and 2.6112, not 2.6111999999999997; relative
    rounding keeps fractions of a cent and large totals alike.
    """
    return float(f"{x:.12g}")


class AtfmParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The five ATFM parameters of one agent role, per workflow.

    Attributes:
        iterations: useful model answers a workflow needs (a mean; need not be whole).
        tokens_per_iteration: input plus output tokens of one call.
        cost_per_1k: USD per 1,000 tokens.
        error_probability: chance that an answer is unusable, 0 to 1.
        retry_multiplier: iterations' worth of calls one unusable answer costs.

    Raises:
        ConfigError: a value is negative, not finite, or a probability above 1; the
            message names the parameter and quotes the value.
    """

    iterations: float
    tokens_per_iteration: float
    cost_per_1k: float
    error_probability: float
    retry_multiplier: float

    def __post_init__(self) -> None:
        for name in _PARAMS:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.error_probability > 1:
            raise ConfigError(
                f"error_probability must be between 0 and 1, got {self.error_probability!r}"
            )

    @property
    def ref(self) -> float:
        """The retry expansion factor, ``1 + error_probability * retry_multiplier``."""
        return _tidy(1 + self.error_probability * self.retry_multiplier)

    @property
    def expected_cost_usd(self) -> float:
        """Expected USD per workflow: iterations * tokens * cost per 1K / 1000 * REF."""
        return _tidy(
            self.iterations
            * self._iteration_cost()
            * (1 + self.error_probability * self.retry_multiplier)
        )

    @property
    def p95_cost_usd(self) -> float:
        """An upper bound per workflow from the parameters alone (see `P95_METHOD`).

        The unusable answers ``K`` are taken as Poisson with mean ``λ = iterations *
        error_probability`` (independent rare errors; wider than a binomial, so the bound
        errs high). With ``q`` the smallest integer for which ``P(K ≤ q) ≥ 0.95``, the
        bound is ``(iterations + retry_multiplier * q) * tokens_per_iteration *
        cost_per_1k / 1000``, raised to `expected_cost_usd` when errors are so rare that
        ``q`` falls below ``λ``. Iterations and tokens per iteration do not vary here;
        calibrated forecasts (`forecast`) bound those from recorded runs.
        """
        q = _poisson_quantile(self.iterations * self.error_probability, 0.95)
        bound = self._iteration_cost() * (self.iterations + self.retry_multiplier * q)
        return max(_tidy(bound), self.expected_cost_usd)

    def _iteration_cost(self) -> float:
        return self.tokens_per_iteration * self.cost_per_1k / 1000


def _poisson_quantile(lam: float, q: float) -> int:
    """The smallest ``k`` with ``P(Poisson(lam) ≤ k) ≥ q``."""
    if lam <= 0:
        return 0
    # The mass below lam - 10·sqrt(lam) - 10 is under e^-50 (Chernoff), so the walk starts
    # there: a few dozen sqrt(lam) steps instead of lam, and no underflow of e^-lam.
    k = max(0, math.floor(lam - 10 * math.sqrt(lam) - 10))
    log_lam = math.log(lam)
    log_pmf = -lam + k * log_lam - math.lgamma(k + 1)
    cdf = math.exp(log_pmf)
    while cdf < q:
        k += 1
        log_pmf += log_lam - math.log(k)
        cdf += math.exp(log_pmf)
    return k


class ParamErrors(msgspec.Struct, frozen=True, kw_only=True):
    """Standard errors of fitted `AtfmParams`: how far the fit may be off the role's true
    parameters, from the spread between recorded workflows.

    Each parameter is a mean or a ratio of sums over workflows; its error is the usual
    one of a ratio estimator, ``sqrt(Σ(y_i - R·x_i)² / (W(W-1))) / mean(x)``, so calls
    of one workflow are not taken as independent.
    """

    iterations: float
    tokens_per_iteration: float
    cost_per_1k: float
    error_probability: float
    retry_multiplier: float


class RoleFit(msgspec.Struct, frozen=True, kw_only=True):
    """ATFM parameters of one role, fitted to a scenario's recorded workflows.

    Attributes:
        role: the agent role.
        models: the models the role called.
        params: the fitted parameters; ``params.expected_cost_usd`` equals the mean
            recorded cost per workflow.
        ref: ``params.ref``.
        expected_cost_usd: ``params.expected_cost_usd``, per workflow.
        calls_mean: mean calls per workflow, ``iterations * REF``.
        iterations_sd: spread of iterations between workflows.
        cost_sd_usd: spread of the role's cost between workflows.
        stderr: standard errors of ``params``; None with fewer than 2 workflows.
    """

    role: str
    models: tuple[str, ...]
    params: AtfmParams
    ref: float
    expected_cost_usd: float
    calls_mean: float
    iterations_sd: float
    cost_sd_usd: float
    stderr: ParamErrors | None


class WorkflowSample(msgspec.Struct, frozen=True, kw_only=True):
    """What one role used in one recorded workflow (zeros when it made no call there)."""

    run_id: str
    workflow: str
    role: str
    calls: int
    errors: int
    tokens: int
    cost_usd: float


class ScenarioFit(msgspec.Struct, frozen=True, kw_only=True):
    """Calibration of one scenario.

    Attributes:
        scenario: its name.
        workflows: recorded workflows, each ``(run_id, workflow)`` once.
        roles: one fit per role, by role name.
        samples: one per recorded workflow and role, in workflow order, for resampling.
    """

    scenario: str
    workflows: int
    roles: tuple[RoleFit, ...]
    samples: tuple[WorkflowSample, ...]

    def workflow_costs(self) -> list[float]:
        """Recorded cost of each workflow, all roles together, in workflow order."""
        totals: dict[tuple[str, str], float] = {}
        for s in self.samples:
            key = (s.run_id, s.workflow)
            totals[key] = totals.get(key, 0.0) + s.cost_usd
        return list(totals.values())


class Calibration(msgspec.Struct, frozen=True, kw_only=True):
    """Fitted ATFM parameters and recorded samples, by scenario."""

    scenarios: dict[str, ScenarioFit]

    def scenario(self, name: str) -> ScenarioFit:
        """The calibration of scenario ``name``.

        Raises:
            ConfigError: no usage of it was recorded.
        """
        try:
            return self.scenarios[name]
        except KeyError:
            raise ConfigError(
                f"no recorded usage of scenario {name!r}; calibrated: {sorted(self.scenarios)}"
            ) from None


def _group(
    records: Iterable[WorkflowUsage],
) -> dict[str, dict[tuple[str, str], dict[str, list[WorkflowUsage]]]]:
    """Records by scenario, then workflow ``(run_id, workflow)``, then role."""
    grouped: dict[str, dict[tuple[str, str], dict[str, list[WorkflowUsage]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in records:
        grouped[r.scenario][(r.run_id, r.workflow)][r.role].append(r)
    return grouped


def workflow_costs(records: Iterable[WorkflowUsage], scenario: str) -> list[float]:
    """Cost of each workflow of ``scenario`` in ``records``, all roles and models together,
    in order of first appearance: the actuals to hold a `Forecast` against."""
    by_workflow = _group(records).get(scenario, {})
    return [
        math.fsum(r.cost_usd for rs in roles.values() for r in rs) for roles in by_workflow.values()
    ]


def calibrate(records: Iterable[WorkflowUsage]) -> Calibration:
    """Fit ATFM parameters per scenario and role to recorded usage.

    A scenario's workflows are all the ``(run_id, workflow)`` pairs in its records; a
    role with no record in one of them made no call there. Per role, over ``W``
    workflows with ``C`` calls, ``E`` errors, ``I = C - E`` useful answers, ``T`` tokens
    and ``U`` USD in all:

    - iterations = ``I / W``; tokens per iteration = ``T / C``;
      cost per 1K = ``U / T * 1000``; error probability = ``E / C``;
    - retry multiplier such that iterations * REF = ``C / W``, the mean calls:
      ``(C / I - 1) / p``, which is ``C / I`` (0 without errors). Since every unusable
      answer is retried, that is ``1 / (1 - p)``: retries of retries.

    So a role's expected cost equals its mean recorded cost per workflow.

    Raises:
        ConfigError: a role called its model and no answer was usable, so no multiplier
            fits.
    """
    fits: dict[str, ScenarioFit] = {}
    for scenario, by_workflow in sorted(_group(records).items()):
        role_names = sorted({role for roles in by_workflow.values() for role in roles})
        samples = [
            _sample(run_id, workflow, role, roles.get(role, []))
            for (run_id, workflow), roles in by_workflow.items()
            for role in role_names
        ]
        role_fits = tuple(
            _fit(
                scenario,
                role,
                [s for s in samples if s.role == role],
                sorted({r.model for roles in by_workflow.values() for r in roles.get(role, [])}),
            )
            for role in role_names
        )
        fits[scenario] = ScenarioFit(
            scenario=scenario,
            workflows=len(by_workflow),
            roles=role_fits,
            samples=tuple(samples),
        )
    return Calibration(scenarios=fits)


def _sample(run_id: str, workflow: str, role: str, rs: list[WorkflowUsage]) -> WorkflowSample:
    return WorkflowSample(
        run_id=run_id,
        workflow=workflow,
        role=role,
        calls=sum(r.calls for r in rs),
        errors=sum(r.errors for r in rs),
        tokens=sum(r.tokens for r in rs),
        cost_usd=math.fsum(r.cost_usd for r in rs),
    )


def _ratio_se(ys: Sequence[float], xs: Sequence[float]) -> float:
    """Standard error of ``Σy / Σx`` over workflows (0 when ``Σx`` is 0)."""
    n, sx = len(xs), math.fsum(xs)
    if sx == 0:
        return 0.0
    r = math.fsum(ys) / sx
    residual = math.fsum((y - r * x) ** 2 for y, x in zip(ys, xs, strict=True))
    return math.sqrt(residual / (n * (n - 1))) / (sx / n)


def _fit(scenario: str, role: str, samples: list[WorkflowSample], models: list[str]) -> RoleFit:
    w = len(samples)
    calls = [float(s.calls) for s in samples]
    errors = [float(s.errors) for s in samples]
    useful = [float(s.calls - s.errors) for s in samples]
    tokens = [float(s.tokens) for s in samples]
    costs = [s.cost_usd for s in samples]
    c, e, t, u = math.fsum(calls), math.fsum(errors), math.fsum(tokens), math.fsum(costs)
    i = c - e
    if c > 0 and i == 0:
        raise ConfigError(
            f"scenario {scenario!r}, role {role!r}: none of its {c:.0f} recorded calls gave a "
            "usable answer, so no retry multiplier fits"
        )
    p = e / c if c else 0.0
    params = AtfmParams(
        iterations=_tidy(i / w),
        tokens_per_iteration=_tidy(t / c) if c else 0.0,
        cost_per_1k=_tidy(u / t * 1000) if t else 0.0,
        error_probability=_tidy(p),
        # (C/I - 1)/p reduces to C/I exactly; computed so it carries no rounding of p.
        retry_multiplier=_tidy(c / i) if e else 0.0,
    )
    stderr = None
    if w >= 2:
        stderr = ParamErrors(
            iterations=_tidy(statistics.stdev(useful) / math.sqrt(w)),
            tokens_per_iteration=_tidy(_ratio_se(tokens, calls)),
            cost_per_1k=_tidy(_ratio_se(costs, tokens) * 1000),
            error_probability=_tidy(_ratio_se(errors, calls)),
            retry_multiplier=_tidy(_ratio_se(calls, useful)) if e else 0.0,
        )
    return RoleFit(
        role=role,
        models=tuple(models),
        params=params,
        ref=params.ref,
        expected_cost_usd=params.expected_cost_usd,
        calls_mean=_tidy(c / w),
        iterations_sd=_tidy(statistics.stdev(useful)) if w >= 2 else 0.0,
        cost_sd_usd=_tidy(statistics.stdev(costs)) if w >= 2 else 0.0,
        stderr=stderr,
    )


class Forecast(msgspec.Struct, frozen=True, kw_only=True):
    """The forecast cost of a number of workflows of one scenario (see `FORECAST_METHOD`).

    Attributes:
        scenario: the scenario.
        workflows: workflows forecast.
        seed: seed of the resampling.
        draws: resampled totals behind the P5/P95.
        recorded_workflows: workflows the calibration saw.
        expected_cost_usd: expected total, the roles' ATFM costs * ``workflows``.
        p5_cost_usd: 5th percentile of the total.
        p95_cost_usd: 95th percentile of the total.
        per_workflow_expected_usd: expected cost of one workflow, all roles.
        per_workflow_p90_usd: 90th percentile of the cost of one workflow, all roles.
        total_method: ``"bootstrap"``, or ``"normal"`` when there were too many
            workflows to resample.
        roles: the fitted parameters of each role.
    """

    scenario: str
    workflows: int
    seed: int
    draws: int
    recorded_workflows: int
    expected_cost_usd: float
    p5_cost_usd: float
    p95_cost_usd: float
    per_workflow_expected_usd: float
    per_workflow_p90_usd: float
    total_method: Literal["bootstrap", "normal"]
    roles: tuple[RoleFit, ...]


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Quantile ``q`` of sorted values, interpolated between neighbours (numpy's default)."""
    h = (len(ordered) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def forecast(
    calibration: Calibration,
    scenario: str,
    workflows: int,
    *,
    seed: int = 0,
    draws: int = 2000,
) -> Forecast:
    """Forecast the cost of ``workflows`` more workflows of ``scenario``.

    The same calibration, seed and arguments give the same forecast.

    Args:
        calibration: from `calibrate`.
        scenario: the scenario's name.
        workflows: how many workflows to forecast, at least 1.
        seed: seed of the resampling.
        draws: resampled totals, at least 100.

    Raises:
        ConfigError: the scenario has no calibration, or an argument is out of range.
    """
    if isinstance(workflows, bool) or not isinstance(workflows, int) or workflows < 1:
        raise ConfigError(f"workflows must be a whole number >= 1, got {workflows!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < _MIN_DRAWS:
        raise ConfigError(f"draws must be a whole number >= {_MIN_DRAWS}, got {draws!r}")
    fit = calibration.scenario(scenario)
    per_workflow = fit.workflow_costs()
    expected_one = math.fsum(r.params.expected_cost_usd for r in fit.roles)
    method: Literal["bootstrap", "normal"]
    if (workflows + len(per_workflow)) * draws <= _MAX_PICKS:
        method = "bootstrap"
        rng = random.Random(seed)
        recorded = len(per_workflow)
        totals = sorted(
            math.fsum(rng.choices(rng.choices(per_workflow, k=recorded), k=workflows))
            for _ in range(draws)
        )
        p5, p95 = _quantile(totals, 0.05), _quantile(totals, 0.95)
    else:
        method = "normal"
        # The resampled total's own mean and spread: the recorded ones, times workflows.
        mean = statistics.fmean(per_workflow) * workflows
        sd = statistics.pstdev(per_workflow)
        spread = sd * math.sqrt(workflows + workflows**2 / len(per_workflow))
        z = statistics.NormalDist().inv_cdf(0.95)
        p5, p95 = max(0.0, mean - z * spread), mean + z * spread
    return Forecast(
        scenario=scenario,
        workflows=workflows,
        seed=seed,
        draws=draws,
        recorded_workflows=fit.workflows,
        expected_cost_usd=_tidy(expected_one * workflows),
        p5_cost_usd=_tidy(p5),
        p95_cost_usd=_tidy(p95),
        per_workflow_expected_usd=_tidy(expected_one),
        per_workflow_p90_usd=_tidy(_quantile(sorted(per_workflow), 0.9)),
        total_method=method,
        roles=fit.roles,
    )


class ForecastCheck(msgspec.Struct, frozen=True, kw_only=True):
    """A forecast held against what the workflows actually cost.

    Attributes:
        workflows: workflows compared.
        forecast_usd: the forecast's expected total.
        actual_usd: the actual total.
        total_error: ``(forecast - actual) / actual``; None when nothing was spent.
        within_p5_p95: whether the actual total lies within the forecast's P5-P95.
        p90_coverage: share of workflows that cost no more than the per-workflow P90.
    """

    workflows: int
    forecast_usd: float
    actual_usd: float
    total_error: float | None
    within_p5_p95: bool
    p90_coverage: float


def check_forecast(forecast: Forecast, actual_costs: Sequence[float]) -> ForecastCheck:
    """Compare ``forecast`` with the actual cost of each workflow it was made for (e.g.
    from `workflow_costs`).

    Raises:
        ConfigError: the number of actual costs is not the number of workflows forecast.
    """
    if len(actual_costs) != forecast.workflows:
        raise ConfigError(
            f"the forecast is for {forecast.workflows} workflows, got the costs of "
            f"{len(actual_costs)}"
        )
    actual = math.fsum(actual_costs)
    covered = sum(1 for c in actual_costs if c <= forecast.per_workflow_p90_usd)
    return ForecastCheck(
        workflows=forecast.workflows,
        forecast_usd=forecast.expected_cost_usd,
        actual_usd=_tidy(actual),
        total_error=_tidy((forecast.expected_cost_usd - actual) / actual) if actual else None,
        within_p5_p95=forecast.p5_cost_usd <= actual <= forecast.p95_cost_usd,
        p90_coverage=_tidy(covered / forecast.workflows),
    )
