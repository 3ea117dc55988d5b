"""`App`: a deployment composed of agents, tools, policies, models and a workload.

An app is what ``govmesh run`` runs: built in Python (``govmesh.App(...)``, run with
``app.run()`` or ``govmesh run --app package.module:app``) or loaded from a scenario file
(`scenario_app`), which names the same things by path.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypedDict, Unpack

import msgspec

from govmesh._load import load_object
from govmesh.agents._base import RetryPolicy
from govmesh.agents._sdk import Agent
from govmesh.agents.messages import Outcome, WorkflowStart
from govmesh.errors import ConfigError, GovmeshError, ScenarioError
from govmesh.forecasting import BudgetCaps, Price
from govmesh.forecasting._prices import load_price_file
from govmesh.llm import (
    ModelProvider,
    ModelSettings,
    SimulatedModelSettings,
    model_of,
    priced_name,
    provider_of,
)
from govmesh.scenarios._plugins import load_agent, load_tool, main_module, path_of
from govmesh.scenarios._schema import (
    AgentSpec,
    Approvals,
    ClockSpec,
    ModelFactory,
    Scenario,
    load_scenario,
    quoted_at,
)
from govmesh.tools._spec import ToolSpec

__all__ = [
    "AgentDef",
    "App",
    "Model",
    "ResolvedAgent",
    "RunOptions",
    "Workload",
    "load_app",
    "scenario_app",
]

Model: TypeAlias = ModelSettings | Callable[[], ModelProvider]
"""An agent's model: settings (`govmesh.llm.OpenAISettings`, `AnthropicSettings`, or
simulated ones, seeded with the run's seed), or a factory of the user's; either way the
provider is made inside the agent's actor, so API keys and clients never travel through
Ray."""


class RunOptions(TypedDict, total=False):
    """How `App.run` runs the app.

    Attributes:
        workflows: how many workflows (20).
        seed: the run's seed: workload, simulated models and approver (1).
        concurrency: workflows in flight at once (64).
        simulated_approver: answer escalations with the simulated approver (True); False
            leaves them to ``govmesh approvals`` in another terminal.
        on_done: called with each workflow's id and `Outcome` as it ends.
        insecure_bus: run on an external NATS without mutual TLS, which is refused
            otherwise (False); the report says so.
        prometheus_port: serve the deployment's metrics for Prometheus on this port while
            it runs (0: a free one); the app's own setting when not given.
        prometheus_host: the address the metrics are served on (127.0.0.1).
        prometheus_linger_s: once the workflows end, serve their final metrics until
            scraped once, for at most this many seconds; the app's own setting when not
            given.
    """

    workflows: int
    seed: int
    concurrency: int
    simulated_approver: bool
    on_done: Callable[[str, Outcome], None]
    insecure_bus: bool
    prometheus_port: int | None
    prometheus_host: str
    prometheus_linger_s: float | None


class Workload(Protocol):
    """Makes the entry agent's payloads: a class ``(**options)`` with this method."""

    def starts(self, count: int, seed: int) -> Sequence[Any]:
        """The payloads of ``count`` workflows, the same for the same seed."""
        ...


@dataclass(frozen=True, kw_only=True)
class AgentDef:
    """One agent of an app, when the class's defaults are not enough.

    Attributes:
        agent: the agent's class, or its name (``package.module:Class``, or a plugin's).
        id: the agent's id; ``<class name in kebab case>-1`` when empty.
        role: its role; the class's ``role`` when empty.
        entry: workflows start at this agent (the app's first agent when none says so).
        options: keyword arguments of the class.
        model: its model; the app's when None.
        capabilities: the tools its token lets it ask for; the class's tools when None.
        budget_usd: its token's budget authority: what governance may allow it to spend in
            one UTC day.
        tool_retry, model_retry: how it retries a tool call or a model call that failed
            retryably; the app's when None.
    """

    agent: type[Agent] | str
    id: str = ""
    role: str = ""
    entry: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    model: Model | None = None
    capabilities: Sequence[str] | None = None
    budget_usd: float = 0.0
    tool_retry: RetryPolicy | Mapping[str, Any] | None = None
    model_retry: RetryPolicy | Mapping[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class ResolvedAgent:
    """An agent of an app, resolved: everything its actor and its token need.

    Attributes:
        ref: the class's path (``package.module:Class``), which its actor imports.
    """

    id: str
    role: str
    cls: type[Agent]
    ref: str
    entry: bool
    options: Mapping[str, Any]
    model: Model
    capabilities: tuple[str, ...]
    budget_usd: float
    tool_retry: RetryPolicy
    model_retry: RetryPolicy

    def model_factory(self, seed: int) -> Callable[[], ModelProvider]:
        """The factory the actor calls for its model; a simulated one is seeded with the
        run's ``seed``."""
        if isinstance(self.model, ModelSettings):
            return functools.partial(model_of, self.model, seed=seed)
        return self.model

    def model_name(self) -> str:
        """The model's name as reports show it; a factory's is known only in its actor."""
        if isinstance(self.model, ModelSettings):
            return priced_name(self.model)
        factory = getattr(self.model, "func", self.model)  # a partial: its function
        return getattr(factory, "__name__", type(factory).__name__)

    def model_provider(self) -> str:
        """The model's provider as reports show it (``openai``, ``anthropic``,
        ``simulated``); ``factory`` for a factory of the user's."""
        if isinstance(self.model, ModelSettings):
            return provider_of(self.model)
        return "factory"


class App:
    """A govmesh deployment: agents, the tools they call, the policies that govern them,
    their models and the workload that starts their workflows.

    Args:
        name: the app's name, as reports and recorded usage name it.
        agents: agent classes, or `AgentDef` for ids, options and models of their own.
            Workflows start at the one marked ``entry`` (the first if none is).
        tools: the tools the gateway runs (``@govmesh.tool`` declarations or their names).
        policies: policy files.
        model: the agents' model, unless an `AgentDef` names its own; simulated by default.
        workload: the entry agent's payloads: a `Workload` (``starts(count, seed)``), or a
            sequence of payloads (workflow ``i`` gets the ``i % len``-th).
        prices: USD per 1,000 tokens per model name (a mapping, or a price file's path);
            every model in use needs one.
        tenant: the tenant the deployment serves.
        path: folders put on ``sys.path`` here and in every actor, so user modules import.
        approvals: the simulated approver: ``approve_probability``, ``delay_ms``, ``by``.
        clock_speed: simulated seconds per real second of the workflow clock (1: real time).
        budget: model-spend caps (``workflow_usd``, ``agent_daily_usd``,
            ``tenant_daily_usd``, ``soft_threshold``); None: uncapped.
        max_reflections: unusable model answers a workflow may reflect on.
        keep_thoughts: keep model answers in the snapshots' reflection tier.
        prometheus_port: serve the deployment's metrics for Prometheus on this port while
            it runs (see `govmesh.PrometheusEndpoint`); None: not served.
        prometheus_linger_s: once the workflows end, serve their final metrics until
            scraped once, for at most this many seconds; 0: the endpoint stops with the run.
        description: one line on what the app does.
        source: where the app was defined (a scenario file), for error messages.

    Attributes:
        agents: the agents, resolved (`ResolvedAgent`), in the order given.
        entry: the agent where workflows start.
        tools: the tools, resolved.
        search_path: ``path``, and a script's own folder when the script defines agents or
            tools (its actors import it by its file name).

    Raises:
        ConfigError: anything inconsistent, naming the field and quoting the bad value.
    """

    def __init__(
        self,
        name: str,
        *,
        agents: Sequence[AgentDef | type[Agent] | str],
        tools: Sequence[ToolSpec[Any, Any] | str] = (),
        policies: Sequence[str | Path] = (),
        model: Model | None = None,
        workload: Workload | Sequence[Any] | None = None,
        prices: Mapping[str, Price | Mapping[str, float]] | str | Path | None = None,
        tenant: str = "acme",
        path: Sequence[str | Path] = (),
        approvals: Approvals | Mapping[str, Any] | None = None,
        clock_speed: float = 1.0,
        budget: BudgetCaps | Mapping[str, Any] | None = None,
        max_reflections: int = 40,
        keep_thoughts: bool = False,
        prometheus_port: int | None = None,
        prometheus_linger_s: float = 0.0,
        tool_retry: RetryPolicy | Mapping[str, Any] | None = None,
        model_retry: RetryPolicy | Mapping[str, Any] | None = None,
        description: str = "",
        source: str = "",
    ) -> None:
        self.name = name
        self.description = description
        self.source = source
        self.tenant = tenant
        where = f"{source}: " if source else f"app {name!r}: "
        self._where = where
        self.search_path = tuple(str(Path(p).resolve()) for p in path)
        # Resolved against the working directory now, checked when the app runs: the actors
        # import the module that makes the app, in directories of their own.
        self.policies = tuple(str(Path(p).resolve()) for p in policies)
        self.prices = _prices(prices, where)
        self.approvals = _convert(approvals or {}, Approvals, where + "approvals")
        self.clock = ClockSpec(speed=clock_speed)
        if not clock_speed > 0:
            raise ConfigError(f"{where}clock_speed: must be positive, got {clock_speed!r}")
        self.budget = None if budget is None else _convert(budget, BudgetCaps, where + "budget")
        self.max_reflections = max_reflections
        self.keep_thoughts = keep_thoughts
        self.prometheus_port = prometheus_port
        if not prometheus_linger_s >= 0:
            raise ConfigError(
                f"{where}prometheus_linger_s: must be 0 or more seconds, got "
                f"{prometheus_linger_s!r}"
            )
        self.prometheus_linger_s = float(prometheus_linger_s)
        self.tool_retry = _convert(tool_retry or {}, RetryPolicy, where + "tool_retry")
        self.model_retry = _convert(model_retry or {}, RetryPolicy, where + "model_retry")
        default_model = SimulatedModelSettings() if model is None else model
        self.tools = tuple(
            _field(where, f"tools[{i}]", load_tool, t, search_path=self.search_path)
            if isinstance(t, str)
            else t
            for i, t in enumerate(tools)
        )
        self._tool_refs = [_importable(t, f"{where}tools[{i}]") for i, t in enumerate(self.tools)]
        self.agents = self._resolve(agents, default_model)
        self._check_tools()
        main = main_module()
        defined_in_main = [m.cls for m in self.agents] + [t.run for t in self.tools]
        if main is not None and any(d.__module__ == "__main__" for d in defined_in_main):
            # The actors import the script again, by name, to find what it defines.
            self.search_path = (*self.search_path, str(main[1]))
        self.entry = next(m for m in self.agents if m.entry)
        self._workload = workload
        self._kinds = _handlers(self.entry.cls)

    def check_files(self) -> None:
        """Check that the policy files are there, before anything starts.

        Raises:
            ConfigError: one is not, named by its index and path.
        """
        if not self.policies:
            raise ConfigError(f"{self._where}policies: an app needs a policy file")
        for i, policy in enumerate(self.policies):
            if not Path(policy).is_file():
                raise ConfigError(f"{self._where}policies[{i}]: file not found: {policy!r}")

    @property
    def agent_ids(self) -> tuple[str, ...]:
        """Every agent's id: the agents each workflow's start record names."""
        return tuple(m.id for m in self.agents)

    def tool_refs(self) -> list[str]:
        """The tools as the gateway's actor loads them, by path (``package.module:tool``)."""
        return list(self._tool_refs)

    def _resolve(
        self, agents: Sequence[AgentDef | type[Agent] | str], default_model: Model
    ) -> tuple[ResolvedAgent, ...]:
        where = self._where
        if not agents:
            raise ConfigError(f"{where}agents: an app needs at least one agent")
        defs = [a if isinstance(a, AgentDef) else AgentDef(agent=a) for a in agents]
        entries = [i for i, d in enumerate(defs) if d.entry]
        if len(entries) > 1:
            raise ConfigError(
                f"{where}agents: only one agent can be the entry, got agents{entries!r}"
            )
        entry = entries[0] if entries else 0
        resolved: list[ResolvedAgent] = []
        seen: dict[str, int] = {}
        for i, d in enumerate(defs):
            cls = (
                _field(
                    where, f"agents[{i}].class", load_agent, d.agent, search_path=self.search_path
                )
                if isinstance(d.agent, str)
                else d.agent
            )
            if not (isinstance(cls, type) and issubclass(cls, Agent)):
                raise ConfigError(f"{where}agents[{i}]: {cls!r} is not a govmesh.Agent class")
            agent_id = d.id or f"{_kebab(cls.__name__)}-1"
            if agent_id in seen:
                raise ConfigError(
                    f"{where}agents[{i}].id: {agent_id!r} is also agents[{seen[agent_id]}]'s id"
                )
            seen[agent_id] = i
            role = d.role or getattr(cls, "role", "")
            if not role:
                raise ConfigError(
                    f"{where}agents[{i}].role: {cls.__qualname__} has no role; give one"
                )
            model = d.model if d.model is not None else default_model
            if isinstance(model, ModelSettings) and priced_name(model) not in self.prices:
                raise ConfigError(
                    f"{where}agents[{i}].model: {priced_name(model)!r} has no entry under "
                    "prices; a model is never free"
                )
            capabilities = (
                tuple(t.name for t in getattr(cls, "tools", ()))
                if d.capabilities is None
                else tuple(d.capabilities)
            )
            resolved.append(
                ResolvedAgent(
                    id=agent_id,
                    role=role,
                    cls=cls,
                    ref=_importable(cls, f"{where}agents[{i}]"),
                    entry=i == entry,
                    options=dict(d.options),
                    model=model,
                    capabilities=capabilities,
                    budget_usd=d.budget_usd,
                    tool_retry=_convert(
                        d.tool_retry or self.tool_retry,
                        RetryPolicy,
                        f"{where}agents[{i}].tool_retry",
                    ),
                    model_retry=_convert(
                        d.model_retry or self.model_retry,
                        RetryPolicy,
                        f"{where}agents[{i}].model_retry",
                    ),
                )
            )
            _check_options(cls, d.options, f"{where}agents[{i}].options")
        return tuple(resolved)

    def _check_tools(self) -> None:
        """Every tool an agent may ask for must be one the gateway runs."""
        names = {t.name for t in self.tools}
        for i, m in enumerate(self.agents):
            for tool_name in m.capabilities:
                if tool_name not in names:
                    raise ConfigError(
                        f"{self._where}agents[{i}].capabilities: {tool_name!r} is not one of "
                        f"the app's tools {sorted(names)!r}"
                    )

    def starts(self, count: int, *, seed: int) -> list[WorkflowStart]:
        """The starts of ``count`` workflows at the entry agent, the same for the same seed.

        Raises:
            ConfigError: the app has no workload, or a payload is not of a type one of the
                entry agent's handlers takes.
        """
        workload = self._workload
        if workload is None:
            raise ConfigError(f"{self._where}workload: the app has none; give workload=...")
        if isinstance(workload, Sequence):
            if not workload:
                raise ConfigError(f"{self._where}workload: is empty")
            payloads = [workload[i % len(workload)] for i in range(count)]
        else:
            payloads = list(workload.starts(count, seed))
        return [self._start(p, f"workload: payload {i}") for i, p in enumerate(payloads)]

    def _start(self, payload: Any, what: str) -> WorkflowStart:
        for kind, payload_type in self._kinds.items():
            if type(payload) is payload_type:
                return WorkflowStart(kind=kind, body=msgspec.msgpack.encode(payload))
        raise ConfigError(
            f"{self._where}{what} is a {type(payload).__qualname__}; "
            f"{self.entry.cls.__qualname__} ({self.entry.id!r}) has handlers for "
            f"{sorted(t.__qualname__ for t in self._kinds.values())!r}"
        )

    def run(self, **options: Unpack[RunOptions]) -> dict[str, Any]:
        """Run the app's workflows on embedded services (a nats-server, a Redis-protocol
        server and Ray, as ``govmesh run`` does, or those that ``GOVMESH_NATS_URL``,
        ``GOVMESH_REDIS_URL`` and ``RAY_ADDRESS`` name) and return the run's report (what
        ``govmesh run --json`` writes). Blocks; from async code use `run_async`.

        Every actor imports the modules that define the app's agents and tools: a script
        that defines them runs its app under ``if __name__ == "__main__":``.

        Args:
            options: see `RunOptions` (``workflows=20``, ``seed=1`` by default).

        Raises:
            GovmeshError: the app or its deployment is misconfigured (a `ConfigError`
                naming the field), or a service did not start.
        """
        return asyncio.run(self.run_async(**options))

    async def run_async(self, **options: Unpack[RunOptions]) -> dict[str, Any]:
        """`run`, awaitable."""
        from govmesh.scenarios._runner import run_scenario

        return await run_scenario(None, app=self, **options)

    def __repr__(self) -> str:
        return f"<govmesh.App {self.name!r}: {', '.join(self.agent_ids)}>"


def scenario_app(source: str | Path | Scenario) -> App:
    """The app a scenario file (or a loaded `Scenario`) describes, with its classes, tools
    and workload loaded.

    Raises:
        ScenarioError: naming the file and the field path of anything wrong.
    """
    scenario = source if isinstance(source, Scenario) else load_scenario(source)
    try:
        return _from_scenario(scenario)
    except ScenarioError:
        raise
    except GovmeshError as exc:
        raise ScenarioError(str(exc)) from None


def load_app(ref: str, *, app_dir: str | Path = ".") -> App:
    """The `App` that ``ref`` (``package.module:app``) names, ``app_dir`` first on the
    path (as ``uvicorn main:app`` does); ``app_dir`` joins the app's own path, so its
    actors import the same modules.

    Raises:
        ConfigError: no such object, or not a `govmesh.App`; the message quotes ``ref``.
    """
    folder = str(Path(app_dir).resolve())
    found = load_object(ref, search_path=[folder], what="app")
    if not isinstance(found, App):
        raise ConfigError(f"app {ref!r} is {found!r}, not a govmesh.App")
    if folder not in found.search_path:
        found.search_path = (*found.search_path, folder)
    return found


def _from_scenario(s: Scenario) -> App:
    where = f"{s.source}: "
    search_path = s.search_path()
    workload: Workload | list[Any]
    at, entry = next((i, a) for i, a in enumerate(s.agents) if a.entry)
    if s.workload.generator:
        factory = _field(
            where,
            "workload.generator",
            load_object,
            s.workload.generator,
            search_path=search_path,
            what="workload generator",
        )
        try:
            workload = factory(**s.workload.options)
        except (TypeError, ValueError) as exc:
            raise ScenarioError(f"{where}workload.options: {exc}") from None
        if not callable(getattr(workload, "starts", None)):
            raise ScenarioError(
                f"{where}workload.generator: {s.workload.generator!r} makes no starts(count, seed)"
            )
    else:
        cls = _field(where, f"agents[{at}].class", load_agent, entry.cls, search_path=search_path)
        payload_type = _payload_type(cls, s.workload.kind, where)
        workload = (
            [
                _convert(start, payload_type, f"{where}workload.starts[{i}]")
                for i, start in enumerate(s.workload.starts)
            ]
            if s.workload.starts is not None
            else _read_starts(s.starts_path(), payload_type)
        )
    return App(
        s.name,
        agents=[_agent_def(a, f"{where}agents[{i}].", search_path) for i, a in enumerate(s.agents)],
        tools=list(s.tools),
        policies=s.policy_paths(),
        model=_model(s.model, s.model_factory, where, search_path),
        workload=workload,
        prices=s.prices,
        tenant=s.tenant,
        path=search_path,
        approvals=s.approvals,
        clock_speed=s.clock.speed,
        budget=s.budget,
        prometheus_port=s.prometheus_port,
        prometheus_linger_s=s.prometheus_linger_s,
        max_reflections=s.max_reflections,
        keep_thoughts=s.keep_thoughts,
        tool_retry=s.tool_retry,
        model_retry=s.model_retry,
        description=s.description,
        source=s.source,
    )


def _agent_def(a: AgentSpec, where: str, search_path: Sequence[str]) -> AgentDef:
    return AgentDef(
        agent=a.cls,
        id=a.id,
        role=a.role,
        entry=a.entry,
        options=a.options,
        model=_model(a.model, a.model_factory, where, search_path),
        capabilities=a.capabilities,
        budget_usd=a.budget_usd,
        tool_retry=a.tool_retry,
        model_retry=a.model_retry,
    )


def _model(
    settings: ModelSettings | None,
    made: ModelFactory | None,
    where: str,
    search_path: Sequence[str],
) -> Model | None:
    """A scenario's model: its settings, or a factory of the user's with its options bound."""
    if made is None:
        return settings
    factory = _field(
        where,
        "model_factory.factory",
        load_object,
        made.factory,
        search_path=search_path,
        what="model factory",
    )
    if not callable(factory):
        raise ConfigError(f"{where}model_factory.factory: {made.factory!r} is not callable")
    try:
        inspect.signature(factory).bind(**made.options)
    except TypeError as exc:
        raise ConfigError(f"{where}model_factory.options: {exc} (got {made.options!r})") from None
    return functools.partial(factory, **made.options)


def _field(where: str, field_path: str, load: Callable[..., Any], ref: str, **kw: Any) -> Any:
    """``load(ref, **kw)``, its error naming the file (or app) and the field."""
    try:
        return load(ref, **kw)
    except ConfigError as exc:
        raise ConfigError(f"{where}{field_path}: {exc}") from None


def _importable(obj: type[Agent] | ToolSpec[Any, Any], where: str) -> str:
    """The path under which the actors import ``obj``.

    Raises:
        ConfigError: no module names it: it was defined in an interactive session.
    """
    found = path_of(obj)
    if found is None:
        raise ConfigError(
            f"{where}: {obj!r} is defined where no actor can import it (an interactive "
            "session?); define it in a module or a script file"
        )
    return found


def _handlers(cls: type[Agent]) -> dict[str, type[Any]]:
    """The agent class's handlers: payload type by kind."""
    return {kind: h.payload for kind, h in cls.handlers().items()}


def _payload_type(cls: type[Agent], kind: str, where: str) -> type[Any]:
    kinds = _handlers(cls)
    if kind:
        if kind not in kinds:
            raise ScenarioError(
                f"{where}workload.kind: {kind!r} is not one of {cls.__qualname__}'s "
                f"{sorted(kinds)!r}"
            )
        return kinds[kind]
    if len(kinds) != 1:
        raise ScenarioError(
            f"{where}workload.kind: {cls.__qualname__} has handlers for {sorted(kinds)!r}; "
            "say which the starts are for"
        )
    return next(iter(kinds.values()))


def _read_starts(path: Path, payload_type: type[Any]) -> list[Any]:
    """The payloads of a JSON-lines file, one a line; blank lines are skipped.

    Raises:
        ScenarioError: naming the file and line of a payload that is not JSON or not of
            ``payload_type``.
    """
    starts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise ScenarioError(f"{path}:{number}: not JSON: {exc}") from None
        starts.append(_convert(data, payload_type, f"{path}:{number}"))
    if not starts:
        raise ScenarioError(f"{path}: holds no starts")
    return starts


def _convert(data: Any, into: type[Any], where: str) -> Any:
    """``data`` as an ``into``; an error names ``where`` and the field path, and quotes
    the bad value."""
    if isinstance(data, into):
        return data
    try:
        return msgspec.convert(data, into)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {quoted_at(str(exc), data)}") from None


def _prices(
    prices: Mapping[str, Price | Mapping[str, float]] | str | Path | None, where: str
) -> dict[str, Price]:
    if prices is None:
        return {}
    if isinstance(prices, str | Path):
        try:
            return load_price_file(Path(prices))
        except ConfigError as exc:
            raise ConfigError(f"{where}prices: {exc}") from None
    return {name: _convert(price, Price, f"{where}prices.{name}") for name, price in prices.items()}


def _check_options(cls: type[Agent], options: Mapping[str, Any], where: str) -> None:
    """The options must be keyword arguments of the class (checked here, not in its actor)."""
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise ConfigError(f"{where}: {cls.__qualname__}: {exc} (got {dict(options)!r})") from None


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _kebab(name: str) -> str:
    return _CAMEL.sub("-", name).lower()
