"""A deployment on the session's real servers for tests of agents written on the SDK:
governance, the gateway with the test's tools, the state and budget actors, `AgentHost`s,
a coordinator that starts workflows and hears their outcomes, and an operator who answers
approvals as the test says."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from govmesh.agents import AgentHost, Outcome, WorkflowStart
from govmesh.bus import Bus, Delivery, ensure_event_stream
from govmesh.config import Clock, Deployment
from govmesh.forecasting import BudgetService, Price
from govmesh.governance._actor import GovernanceService
from govmesh.governance._starts import record_start
from govmesh.governance.messages import ApprovalAnswer, ApprovalRequest
from govmesh.identity import Issuer
from govmesh.llm import ModelRequest, ModelResponse, SimulatedModel, SimulatedModelSettings
from govmesh.state import Keyring, StateService
from govmesh.tools import GatewayService
from govmesh.tools._spec import ToolSpec

from _deploy import deployment

HANG_GUARD_S = 120.0
"""Far above what any workflow of these tests takes; only stops a hung test."""

MODEL = SimulatedModelSettings(name="simulated-small", error_probability=0.0, latency_ms=1)
PRICES = {"simulated-small": Price(input_per_1k=0.003, output_per_1k=0.015)}


class CountingModel(SimulatedModel):
    """The simulated model, counting the calls made to it."""

    def __init__(self, settings: SimulatedModelSettings, *, seed: int) -> None:
        super().__init__(settings, seed=seed)
        self.calls = 0

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        return await super().complete(request)


def model(settings: SimulatedModelSettings = MODEL) -> functools.partial[CountingModel]:
    """A picklable factory of a counting simulated model."""
    return functools.partial(CountingModel, settings, seed=1)


@dataclass
class Mesh:
    """The services of one test's tenant, and the coordinator's and operator's view."""

    dep: Deployment
    issuer: Issuer
    keyring: Keyring
    coordinator: Bus
    operator: Bus
    services: list[Any]
    hosts: dict[str, AgentHost] = field(default_factory=dict)
    outcomes: dict[str, asyncio.Future[Outcome]] = field(default_factory=dict)
    approve: dict[str, bool] = field(default_factory=dict)
    """Workflow -> the operator's answer to its approvals (approved by default)."""
    held: dict[str, ApprovalRequest] = field(default_factory=dict)
    """Approval requests of workflows in `hold`, not answered until `answer`."""
    hold: set[str] = field(default_factory=set)
    requests: asyncio.Queue[ApprovalRequest] = field(default_factory=asyncio.Queue)

    def service(self, kind: type[Any]) -> Any:
        """The (first) running service of type ``kind``."""
        return next(s for s in self.services if isinstance(s, kind))

    async def host(
        self,
        agent_id: str,
        agent: str,
        *,
        role: str,
        capabilities: tuple[str, ...] = (),
        budget_usd: float = 25_000.0,
        **options: Any,
    ) -> AgentHost:
        """Start an `AgentHost` of ``agent`` (a class path) as ``agent_id``."""
        options.setdefault("model", model())
        identity = self.issuer.identity(
            agent_id, role, capabilities=capabilities, budget_usd=budget_usd
        )
        host = AgentHost(self.dep, identity, agent=agent, **options)
        await host.start()
        self.hosts[agent_id] = host
        return host

    async def start(
        self,
        workflow: str,
        agent: str,
        payload: msgspec.Struct,
        *,
        agents: tuple[str, ...] = (),
        trace: str = "",
        kind: str = "",
    ) -> asyncio.Future[Outcome]:
        """Start ``workflow`` at ``agent`` with ``payload`` (``agents`` take part too, and
        ``trace`` is its trace context; ``kind`` is the payload type's name unless given);
        returns the future of its outcome."""
        future = self.outcomes.setdefault(workflow, asyncio.get_running_loop().create_future())
        await record_start(self.coordinator, workflow, (agent, *agents))
        await self.coordinator.publish(
            self.coordinator.subjects.msg(agent),
            WorkflowStart(
                kind=kind or type(payload).__qualname__, body=msgspec.msgpack.encode(payload)
            ),
            workflow=workflow,
            trace=trace,
        )
        return future

    async def run(self, workflow: str, agent: str, payload: msgspec.Struct, **kw: Any) -> Outcome:
        """Start ``workflow`` and wait for its outcome."""
        started = await self.start(workflow, agent, payload, **kw)
        return await asyncio.wait_for(started, HANG_GUARD_S)

    async def answer(self, workflow: str, approved: bool) -> None:
        """Answer the held approval of ``workflow``."""
        request = self.held.pop(workflow)
        self.hold.discard(workflow)
        await self._answer(request, approved)

    async def _answer(self, request: ApprovalRequest, approved: bool) -> None:
        await self.operator.publish(
            self.operator.subjects.approval(request.workflow),
            ApprovalAnswer(approval_id=request.approval_id, approved=approved, by="test-operator"),
            workflow=request.workflow,
        )

    async def _on_approval(self, d: Delivery) -> None:
        match d.body:
            case ApprovalRequest() as request:
                await self.requests.put(request)
                if request.workflow in self.hold:
                    self.held[request.workflow] = request
                else:
                    await self._answer(request, self.approve.get(request.workflow, True))

    async def _on_outcome(self, d: Delivery) -> None:
        future = self.outcomes.setdefault(
            d.envelope.workflow, asyncio.get_running_loop().create_future()
        )
        if not future.done():
            future.set_result(d.body)


@contextlib.asynccontextmanager
async def mesh(
    secure_nats: Any,
    redis_server: Any,
    prefix: str,
    tmp_path: Path,
    *,
    policy: str,
    tools: Sequence[ToolSpec[Any, Any]],
    clock: Clock | None = None,
    prices: Mapping[str, Price] = PRICES,
) -> AsyncIterator[Mesh]:
    """Governance on ``policy`` (a policy text), a gateway running ``tools``, the state and
    budget actors (pricing models at ``prices``), a coordinator and an operator, on
    ``clock`` if given; agents are added with `Mesh.host`."""
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    if clock is not None:
        dep = msgspec.structs.replace(dep, clock=clock)
    keyring = Keyring.generate("test")
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    services: list[Any] = [
        GovernanceService(
            dep,
            issuer.identity("governance-1", "governance"),
            policy_paths=[str(path)],
            tools=[t.terms for t in tools],
        ),
        GatewayService(dep, issuer.identity("gateway-1", "gateway"), tools=tools),
        StateService(dep, issuer.identity("state-1", "state"), keyring=keyring),
        BudgetService(dep, issuer.identity("budget-1", "budget"), prices=dict(prices)),
    ]
    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    operator = await Bus.connect(dep, issuer.identity("operator-1", "operator"))
    m = Mesh(
        dep=dep,
        issuer=issuer,
        keyring=keyring,
        coordinator=coordinator,
        operator=operator,
        services=services,
    )
    try:
        # The audit of events reads the stream; only a coordinator may create it.
        await ensure_event_stream(coordinator.nc, dep.tenant)
        for service in services:
            await service.start()
        await coordinator.subscribe(
            coordinator.subjects.msg("coordinator-1"), m._on_outcome, accepts=Outcome
        )
        await operator.subscribe(
            operator.subjects.all("approval"),
            m._on_approval,
            accepts=ApprovalRequest | ApprovalAnswer,
        )
        await coordinator.flush()
        await operator.flush()
        yield m
    finally:
        for host in m.hosts.values():
            await host.close()
        await operator.close()
        await coordinator.close()
        for service in reversed(services):
            await service.close()
