"""The scenario file: which agents (any classes), tools, policies, models and workload a run
has, and how its approver, clock and budget behave.

Validation errors name the file and the field path (``agents[1].class``) and quote the bad
value. Classes, tools and workload generators are named here; `scenario_app` loads them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec

from govmesh.agents._base import RetryPolicy
from govmesh.config import read_yaml_mapping
from govmesh.errors import ConfigError, ScenarioError
from govmesh.forecasting import BudgetCaps, Price
from govmesh.forecasting._prices import load_price_file
from govmesh.llm import ModelSettings, priced_name

__all__ = [
    "AgentSpec",
    "Approvals",
    "ClockSpec",
    "ModelFactory",
    "Scenario",
    "WorkloadSpec",
    "load_scenario",
    "quoted_at",
]


class ModelFactory(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A model provider of the user's own (a client govmesh has no provider for), made by a
    factory called inside the agent's actor, so keys and clients never travel through Ray.

    Attributes:
        factory: ``package.module:function`` returning a `govmesh.ModelProvider`; its
            model's name must be priced.
        options: the factory's keyword arguments (no secrets: read those in the factory).
    """

    factory: str
    options: dict[str, Any] = {}


class AgentSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One agent of the scenario.

    Attributes:
        id: the agent's id, unique in the scenario.
        cls: its class (``class:`` in the file): ``package.module:Class``, or the name an
            installed plugin gives it.
        role: its role; the class's ``role`` when empty.
        entry: workflows start at this agent (exactly one agent is the entry).
        capabilities: the tools its token lets it ask for; the class's tools when None.
        budget_usd: its token's budget authority: what governance may allow it to spend in
            one UTC day, across its workflows.
        options: keyword arguments of the class.
        model: its model (``provider:`` ``simulated``, the default, ``openai`` or
            ``anthropic``); the scenario's model when neither this nor ``model_factory``
            is given.
        model_factory: its model made by a factory of the user's, instead of ``model``.
        tool_retry, model_retry: how it retries a tool call or a model call that failed
            retryably (``initial_s``, ``backoff``, ``maximum_s``, ``maximum_attempts``);
            the scenario's when absent.
    """

    id: str
    cls: str = msgspec.field(name="class")
    role: str = ""
    entry: bool = False
    capabilities: tuple[str, ...] | None = None
    budget_usd: float = 0.0
    options: dict[str, Any] = {}
    model: ModelSettings | None = None
    model_factory: ModelFactory | None = None
    tool_retry: RetryPolicy | None = None
    model_retry: RetryPolicy | None = None


class WorkloadSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the workflows start with: exactly one of ``generator``, ``starts`` and
    ``starts_file``.

    Attributes:
        generator: a class ``(**options)`` whose ``starts(count, seed)`` gives the entry
            handler's payloads (the same for the same seed).
        options: the generator's keyword arguments.
        starts: payloads inline, each a mapping of the entry handler's argument type;
            workflow ``i`` starts with ``starts[i % len(starts)]``.
        starts_file: the same as JSON lines, relative to the scenario file.
        kind: which of the entry agent's handlers ``starts`` and ``starts_file`` are for;
            needed only when it has several.
    """

    generator: str = ""
    options: dict[str, Any] = {}
    starts: tuple[dict[str, Any], ...] | None = None
    starts_file: str = ""
    kind: str = ""


class Approvals(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The simulated approver standing in for a human operator."""

    approve_probability: float = 0.7
    delay_ms: float = 10.0
    by: str = "sim-approver"


class ClockSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The scenario's workflow clock: ``speed`` simulated seconds per real second (1: real
    time). Timers and waits run on it; security checks always use real time."""

    speed: float = 1.0


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole scenario file; paths in it are relative to the file.

    Attributes:
        path: folders put on ``sys.path`` here and in every actor, so the classes, tools
            and generators the file names import.
        model: the agents' model, unless an agent names its own: ``provider: openai``
            (any OpenAI-compatible server) or ``anthropic`` with ``model:``, ``base_url:``
            and ``api_key_env:`` (the variable of the agents' environment that holds the
            key; never the key itself), or a simulated one (no ``provider:``).
        model_factory: the agents' model made by a factory of the user's, instead of
            ``model``.
        tools: the tools the gateway runs: ``package.module:tool`` or a plugin's tool name.
        tool_retry, model_retry: how the agents retry a tool call or a model call that
            failed retryably (``initial_s``, ``backoff``, ``maximum_s``,
            ``maximum_attempts``); `govmesh.RetryPolicy`'s defaults when absent.
        prometheus_port: serve the deployment's metrics for Prometheus on this port of
            127.0.0.1 while it runs (``govmesh run --prometheus-port`` wins); none: not
            served.
        prometheus_linger_s: once the workflows end, serve their final metrics until
            scraped once, for at most this many seconds (``govmesh run
            --prometheus-linger`` wins); 0: the endpoint stops with the run.
    """

    name: str
    description: str = ""
    tenant: str = "acme"
    policies: tuple[str, ...]
    path: tuple[str, ...] = ()
    model: ModelSettings | None = None
    model_factory: ModelFactory | None = None
    prices: dict[str, Price]
    agents: tuple[AgentSpec, ...]
    tools: tuple[str, ...] = ()
    workload: WorkloadSpec
    approvals: Approvals = Approvals()
    clock: ClockSpec = ClockSpec()
    budget: BudgetCaps | None = None
    max_reflections: int = 40
    keep_thoughts: bool = False
    tool_retry: RetryPolicy | None = None
    model_retry: RetryPolicy | None = None
    prometheus_port: int | None = None
    prometheus_linger_s: float = 0.0
    source: str = ""

    def _resolved(self, paths: tuple[str, ...]) -> list[str]:
        base = Path(self.source).parent
        return [str((base / p).resolve()) for p in paths]

    def policy_paths(self) -> list[str]:
        """Policy files, resolved against the scenario file's folder."""
        return self._resolved(self.policies)

    def search_path(self) -> list[str]:
        """The ``path`` folders, resolved against the scenario file's folder."""
        return self._resolved(self.path)

    def starts_path(self) -> Path:
        """The workload's ``starts_file``, resolved against the scenario file's folder."""
        return Path(self._resolved((self.workload.starts_file,))[0])


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario file (its shape; `scenario_app` loads what it names).

    Raises:
        ScenarioError: naming the file and the field path of anything wrong.
    """
    path = Path(path)
    data = read_yaml_mapping(path, what="scenario", error=ScenarioError)
    if "purchases" in data or isinstance(data.get("agents"), dict):
        raise ScenarioError(
            f"{path}: agents: a mapping of requester and procurement (with purchases:) is "
            "the scenario format before apps; list the agents with their class: and entry:, "
            "and give a workload: (scenarios/procurement.yaml shows the procurement example "
            "in the new format)"
        )
    prices = data.get("prices")
    if isinstance(prices, str):
        # A price table file, named relative to the scenario.
        try:
            data = {**data, "prices": msgspec.to_builtins(load_price_file(path.parent / prices))}
        except ConfigError as exc:
            raise ScenarioError(f"{path}: prices: {exc}") from None
    data = _simulated_by_default(data)
    try:
        scenario = msgspec.convert({**data, "source": str(path)}, Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{path}: {quoted_at(str(exc), data)}") from None
    _check(scenario, path)
    return scenario


def _simulated_by_default(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``provider: simulated`` in each ``model:`` that names no provider."""

    def with_provider(model: Any) -> Any:
        if isinstance(model, dict) and "provider" not in model:
            return {"provider": "simulated", **model}
        return model

    data = {**data, "model": with_provider(data.get("model"))}
    if data["model"] is None:
        del data["model"]
    agents = data.get("agents")
    if isinstance(agents, list):
        data["agents"] = [
            {**a, "model": with_provider(a["model"])} if isinstance(a, dict) and "model" in a else a
            for a in agents
        ]
    return data


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_STEP = re.compile(r"\.(?P<key>[^.\[]+)|\[(?P<index>\d+)\]")


def quoted_at(message: str, data: Any) -> str:
    """A msgspec validation message turned around to name the field path first and quote
    the value found there: ``agents[1].budget_usd: Expected `float`, got `str` (got 'x')``.
    """
    found = _AT.search(message)
    if found is None:
        return message
    path = found.group("path")
    head = message[: found.start()]
    if not path:
        return head
    value: Any = data
    for step in _STEP.finditer(path):
        key, index = step.group("key"), step.group("index")
        if key is not None and isinstance(value, dict) and key in value:
            value = value[key]
        elif index is not None and isinstance(value, list | tuple) and int(index) < len(value):
            value = value[int(index)]
        else:
            return f"{path.lstrip('.')}: {head}"
    return f"{path.lstrip('.')}: {head} (got {value!r})"


def _check(s: Scenario, path: Path) -> None:
    def fail(field: str, message: str) -> None:
        raise ScenarioError(f"{path}: {field}: {message}")

    owners: list[tuple[str, AgentSpec | Scenario]] = [("", s)]
    owners += [(f"agents[{i}].", a) for i, a in enumerate(s.agents)]
    for at, owner in owners:
        if owner.model is not None and owner.model_factory is not None:
            fail(f"{at}model_factory", "give model or model_factory, not both")
        if owner.model is not None and priced_name(owner.model) not in s.prices:
            fail(
                f"{at}model",
                f"{priced_name(owner.model)!r} has no entry under prices; a model is never free",
            )
    if s.model is None and s.model_factory is None:
        for i, a in enumerate(s.agents):
            if a.model is None and a.model_factory is None:
                fail(f"agents[{i}].model", "no model here and no model or model_factory above")
    if not s.agents:
        fail("agents", "a scenario needs at least one agent")
    seen: dict[str, int] = {}
    for i, agent in enumerate(s.agents):
        if agent.id in seen:
            fail(f"agents[{i}].id", f"{agent.id!r} is also agents[{seen[agent.id]}].id")
        seen[agent.id] = i
        if not agent.budget_usd >= 0:
            fail(f"agents[{i}].budget_usd", f"must be 0 or more, got {agent.budget_usd!r}")
    entries = [i for i, a in enumerate(s.agents) if a.entry]
    if len(entries) != 1:
        fail(
            "agents",
            "exactly one agent must have entry: true (where workflows start), found "
            + (", ".join(f"agents[{i}] ({s.agents[i].id!r})" for i in entries) or "none"),
        )
    w = s.workload
    given = [
        k
        for k, v in (
            ("generator", w.generator),
            ("starts", w.starts is not None),
            ("starts_file", w.starts_file),
        )
        if v
    ]
    if len(given) != 1:
        fail("workload", f"give exactly one of generator, starts, starts_file; got {given!r}")
    if w.options and not w.generator:
        fail("workload.options", "options are a generator's; there is no generator")
    if w.starts is not None and not w.starts:
        fail("workload.starts", "is empty")
    if w.starts_file and not s.starts_path().is_file():
        fail("workload.starts_file", f"file not found: {str(s.starts_path())!r}")
    if not 0 <= s.approvals.approve_probability <= 1:
        fail(
            "approvals.approve_probability",
            f"must be in [0, 1], got {s.approvals.approve_probability!r}",
        )
    if not s.clock.speed > 0:
        fail("clock.speed", f"must be positive, got {s.clock.speed!r}")
    if s.max_reflections < 0:
        fail("max_reflections", f"must be 0 or more, got {s.max_reflections!r}")
    for i, policy in enumerate(s.policy_paths()):
        if not Path(policy).is_file():
            fail(f"policies[{i}]", f"file not found: {policy!r}")
    for i, folder in enumerate(s.search_path()):
        if not Path(folder).is_dir():
            fail(f"path[{i}]", f"folder not found: {folder!r}")
