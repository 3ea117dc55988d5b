"""The actors of one run: platform actors and the app's agents, each a Ray actor."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from typing import Any

import msgspec
import ray

from govmesh.agents._host import AgentHost
from govmesh.bus import Delivery
from govmesh.config import Clock, Deployment
from govmesh.errors import ConfigError, SecurityError
from govmesh.forecasting import BudgetService
from govmesh.governance._actor import GovernanceService
from govmesh.governance.messages import ApprovalAnswer, ApprovalRequest
from govmesh.identity import EnrolRequest, Grant, Identity, Issuer, MemberKeys, certify
from govmesh.llm import ModelSettings
from govmesh.observability._service import AuditService
from govmesh.roles import AUDITOR_ROLE, GOVERNANCE_ROLE, OPERATOR_ROLE
from govmesh.runtime import Member, Transport
from govmesh.scenarios._app import App
from govmesh.service import Service, ServiceActor, being_cancelled
from govmesh.state import Keyring, StateService
from govmesh.tools import GatewayService

__all__ = ["SimulatedApprover", "Swarm"]

log = logging.getLogger(__name__)


def seeded_rng(seed: int, key: str) -> random.Random:
    """A random stream that depends only on (seed, key), the same in every process."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class SimulatedApprover(Service):
    """Stands in for a human operator: answers each approval request after a delay.

    Labelled simulated in every report. Its answers are signed with an operator identity
    exactly as `govmesh approvals approve` would sign a person's.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        approve_probability: float,
        delay_ms: float,
        by: str,
        seed: int,
    ) -> None:
        super().__init__(deployment, identity)
        self._p = approve_probability
        self._delay_s = delay_ms / 1000
        self._by = by
        self._seed = seed
        self.answered = {"approved": 0, "rejected": 0}

    async def on_start(self) -> None:
        """Subscribe to approval requests."""
        await self.bus.subscribe(
            self.subjects.all("approval"),
            self._on_approval,
            accepts=ApprovalRequest | ApprovalAnswer,
        )

    async def _on_approval(self, d: Delivery) -> None:
        match d.body:
            case ApprovalRequest() as request:
                await asyncio.sleep(self._delay_s)
                approved = seeded_rng(self._seed, f"approve:{request.workflow}").random() < self._p
                self.answered["approved" if approved else "rejected"] += 1
                await self.bus.publish(
                    self.subjects.approval(request.workflow),
                    ApprovalAnswer(
                        approval_id=request.approval_id,
                        approved=approved,
                        by=self._by,
                        reason="simulated approver",
                    ),
                    workflow=request.workflow,
                    causation=d.envelope.id,
                    trace=d.envelope.trace,
                )
            case ApprovalAnswer():
                return


class Swarm:
    """Starts and stops the services of one app, as Ray actors or in this process: the
    platform actors, and one `AgentHost` per agent of the app.

    Args:
        app: the app (agents, tools, policies, models).
        deployment: where the services are and whom to trust.
        issuer: issues every member's token.
        seed: the run's seed (simulated model, approver).
        governance_actors: how many governance actors share the intents.
        in_process: run the services in this event loop instead of Ray actors (tests of
            pure message flow; the CLI always uses Ray).
        keyring: the state actor's snapshot keys; by default ``$GOVMESH_STATE_KEYS``, else
            a fresh key for this run (its snapshots are unreadable to a later one).
        transport: the mutual-TLS member registry and CA, which admits every member and
            certifies the TLS key each makes; needed when the deployment is mutual TLS.
        clock_origin: for a scenario with a simulated clock, when the run's clock started
            (the same when a run resumes); now if None. A deployment whose clock is
            already simulated keeps it.
    """

    def __init__(
        self,
        app: App,
        deployment: Deployment,
        issuer: Issuer,
        *,
        seed: int,
        governance_actors: int = 1,
        in_process: bool = False,
        keyring: Keyring | None = None,
        clock_origin: float | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.app = app
        if app.clock.speed != 1.0 and not deployment.clock.simulated:
            origin = clock_origin or time.time()
            clock = Clock(origin=origin, speed=app.clock.speed)
            deployment = msgspec.structs.replace(deployment, clock=clock)
        self.deployment = deployment
        self.issuer = issuer
        self.seed = seed
        self.in_process = in_process
        self.keyring = keyring or Keyring.from_env() or Keyring.generate(f"run-{seed}")
        if deployment.tls and transport is None:
            raise ConfigError(
                "the deployment's bus is mutual TLS: the swarm needs its transport to "
                "certify its members"
            )
        self.transport = transport
        self._members: dict[str, tuple[str, dict[str, Any]]] = {}
        self._user_factories: set[str] = set()
        self._specs = self._plan(governance_actors)
        self._actors: dict[str, Any] = {}
        self._local: dict[str, Service] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts: dict[str, int] = {}

    @property
    def entry_id(self) -> str:
        """The entry agent's id: where workflows start."""
        return self.app.entry.id

    @property
    def agent_ids(self) -> tuple[str, ...]:
        """The agents that take part in each of the app's workflows."""
        return self.app.agent_ids

    def _plan(self, governance_actors: int) -> list[tuple[str, type[Service], dict[str, Any]]]:
        app, dep = self.app, self.deployment

        def member(agent_id: str, role: str, **token: Any) -> str:
            # Each member makes its own keys where it runs; only what its token grants is
            # decided here.
            self._members[agent_id] = (role, token)
            return agent_id

        specs: list[tuple[str, type[Service], dict[str, Any]]] = [
            (
                member(f"governance-{i}", GOVERNANCE_ROLE),
                GovernanceService,
                {"policy_paths": list(app.policies), "tools": [t.terms for t in app.tools]},
            )
            for i in range(1, governance_actors + 1)
        ]
        specs += [
            (
                member("gateway-1", "gateway"),
                GatewayService,
                {"tools": app.tool_refs(), "search_path": list(app.search_path)},
            ),
            (member("audit-1", AUDITOR_ROLE), AuditService, {}),
            (
                member("budget-1", "budget"),
                BudgetService,
                {"prices": dict(app.prices), "caps": app.budget},
            ),
            (
                member("state-1", "state"),
                StateService,
                # One keyring per run, shared by every state actor (and by a restarted one).
                {"keyring": self.keyring},
            ),
        ]
        specs += [
            (
                member(
                    agent.id,
                    agent.role,
                    capabilities=agent.capabilities,
                    budget_usd=agent.budget_usd,
                ),
                AgentHost,
                {
                    "agent": agent.ref,
                    "options": dict(agent.options),
                    "model": agent.model_factory(self.seed),
                    "search_path": list(app.search_path),
                    "max_reflections": app.max_reflections,
                    "prices": dict(app.prices),
                    "budget": app.budget,
                    "keep_thoughts": app.keep_thoughts,
                    "tool_retry": agent.tool_retry,
                    "model_retry": agent.model_retry,
                },
            )
            for agent in app.agents
        ]
        self._user_factories = {m.id for m in app.agents if not isinstance(m.model, ModelSettings)}
        for _, _, kwargs in specs:
            kwargs["deployment"] = dep
        return specs

    def identities(self) -> list[Identity]:
        """The identities of the services this process runs (``in_process``, once started);
        a Ray actor's identity and keys stay in its own process."""
        return [service.identity for service in self._local.values()]

    def approver(self) -> SimulatedApprover:
        """The simulated human operator, run by the coordinator's process."""
        a = self.app.approvals
        return SimulatedApprover(
            self.deployment,
            self.issuer.identity(f"operator-{a.by}", OPERATOR_ROLE),
            approve_probability=a.approve_probability,
            delay_ms=a.delay_ms,
            by=a.by,
            seed=self.seed,
        )

    async def start(self) -> None:
        """Start every service and wait until each is subscribed.

        Each member makes its own keys where it runs and sends their public halves; the
        swarm admits every member with one reload of the server and certifies those keys.
        """
        if self.transport is not None:
            tenant = self.deployment.tenant
            self.transport.register(
                Member.for_role(name, role, tenant=tenant)
                for name, (role, _) in self._members.items()
            )
        if self.in_process:
            for name, service_type, kwargs in self._specs:
                keys = MemberKeys(name, self._members[name][0])
                self._local[name] = service_type(identity=keys.identity, **kwargs)
                keys.accept(self._grant(name, keys.request()), self.deployment)
            await asyncio.gather(*(svc.start() for svc in self._local.values()))
            return
        # Agent classes and tools travel by path and are imported in their actor, after
        # it puts the app's folders on its path. A model factory of the user's travels by
        # reference to its module, which must import before the actor's arguments are
        # unpickled: that actor's worker gets the folders on PYTHONPATH (a worker of its
        # own, which costs a second or so to start, so only where it is needed).
        path = [*self.app.search_path, os.environ.get("PYTHONPATH", "")]
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, path))}}
        for name, service_type, kwargs in self._specs:
            options: dict[str, Any] = {"name": None}
            if self.app.search_path and name in self._user_factories:
                options["runtime_env"] = env
            self._actors[name] = ServiceActor.options(**options).remote(  # type: ignore[attr-defined]
                service_type, kwargs, member_id=name, role=self._members[name][0]
            )
        names = list(self._actors)
        asked = await asyncio.gather(*(self._actors[n].enrolment_request.remote() for n in names))
        await asyncio.gather(
            *(
                self._actors[n].start.remote(self._grant(n, request))
                for n, request in zip(names, asked, strict=True)
            )
        )
        self._supervisor = asyncio.create_task(self._supervise(), name="swarm-supervisor")

    async def _supervise(self, interval_s: float = 0.5) -> None:
        """Bring restarted actors back onto the bus: Ray restarts a dead actor's process,
        which makes new keys, and the supervisor enrols them and starts its service again."""
        while True:
            await asyncio.sleep(interval_s)
            names = list(self._actors)
            started = await asyncio.gather(
                *(self._actors[n].is_started.remote() for n in names), return_exceptions=True
            )
            for name, result in zip(names, started, strict=True):
                if result is False:
                    actor = self._actors[name]
                    try:
                        request = await actor.enrolment_request.remote()
                        await actor.ensure_started.remote(self._grant(name, request))
                    except Exception as exc:  # a Ray actor error: it died again meanwhile
                        log.warning("%s did not start again yet: %s", name, exc)
                        continue
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    log.warning("%s restarted and rejoined the bus", name)
                elif isinstance(result, Exception) and not being_cancelled():
                    log.warning("%s is not reachable yet: %s", name, result)

    def _grant(self, name: str, request: EnrolRequest) -> Grant:
        """A token and, on a mutual-TLS bus, a certificate for the keys the member `name`
        made, with what the scenario grants that member.

        Raises:
            SecurityError: the request is for another member or role than `name`'s.
        """
        role, token = self._members[name]
        if (request.member_id, request.role) != (name, role):
            raise SecurityError(
                "bad_enrolment",
                f"{name!r} asked to enrol as {request.member_id!r} in role {request.role!r}",
            )
        return certify(
            request,
            issuer=self.issuer,
            ca=self.transport.ca if self.transport is not None else None,
            tenant=self.deployment.tenant,
            **token,
        )

    async def pids(self) -> dict[str, int]:
        """Each actor's process id, by name."""
        names = list(self._actors)
        found = await asyncio.gather(*(self._actors[n].pid.remote() for n in names))
        return dict(zip(names, found, strict=True))

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Each service's counters, by name."""
        if self.in_process:
            return {name: svc.stats() for name, svc in self._local.items()}
        names = list(self._actors)
        results = await asyncio.gather(*(self._actors[n].stats.remote() for n in names))
        return dict(zip(names, results, strict=True))

    async def close(self, *, grace_s: float = 10.0) -> None:
        """Stop every service and its actor. Safe to call twice.

        Each service gets `grace_s` to close (leave the bus, finish its writes); an actor
        still closing then is killed anyway, so an interrupt always ends the run.
        """
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        local, self._local = self._local, {}
        await asyncio.gather(*(svc.close() for svc in local.values()), return_exceptions=True)
        actors, self._actors = self._actors, {}
        if not actors:
            return
        closing = {
            asyncio.ensure_future(actor.close.remote()): name for name, actor in actors.items()
        }
        _, late = await asyncio.wait(closing, timeout=grace_s)
        if late:
            log.warning(
                "killing actors that did not close within %.0f s: %s",
                grace_s,
                ", ".join(sorted(closing[f] for f in late)),
            )
            for future in late:
                future.cancel()
        for actor in actors.values():
            ray.kill(actor)
