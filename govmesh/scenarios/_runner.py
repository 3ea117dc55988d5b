"""Runs a scenario: draws the workflows, drives them through the swarm, reports."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from govmesh.agents import PurchaseOutcome, WorkflowDone, WorkflowStart
from govmesh.bus import Bus, Delivery, ensure_event_stream
from govmesh.config import Deployment
from govmesh.errors import BusError
from govmesh.forecasting import BudgetQuery, BudgetReport
from govmesh.governance._replay import ReplayReport, replay_url
from govmesh.identity import Issuer
from govmesh.identity._permissions import OPERATOR_ROLE
from govmesh.identity.authority import TokenAuthority
from govmesh.observability import summarize
from govmesh.runtime import OPERATOR_MEMBER, Transport
from govmesh.scenarios._schema import Scenario, load_scenario
from govmesh.scenarios._swarm import Swarm, seeded_rng

__all__ = ["draw_workflows", "new_issuer", "run_scenario", "run_workflows"]

COORDINATOR_ROLE = "coordinator"


def new_issuer(tenant: str) -> Issuer:
    """A fresh token issuer for one deployment of ``tenant``."""
    return Issuer(name=f"govmesh:{tenant}:issuer", audience=f"govmesh:{tenant}")


def draw_workflows(scenario: Scenario, count: int, *, seed: int) -> list[WorkflowStart]:
    """The purchases of ``count`` workflows, the same for the same seed."""
    p = scenario.purchases
    vendors = list(p.vendors)
    weights = [p.vendors[v] for v in vendors]
    starts = []
    for i in range(count):
        rng = seeded_rng(seed, f"workflow:{i}")
        starts.append(
            WorkflowStart(
                item=rng.choice(p.items),
                vendor=rng.choices(vendors, weights)[0],
                amount_usd=round(rng.uniform(p.amount_usd.min, p.amount_usd.max), 2),
            )
        )
    return starts


async def run_workflows(
    scenario: Scenario,
    deployment: Deployment,
    issuer: Issuer,
    *,
    workflows: int,
    seed: int,
    concurrency: int = 64,
    timeout_s: float | None = 600.0,
    in_process: bool = False,
    transport: Transport | None = None,
    simulated_approver: bool = True,
    on_done: Callable[[str, PurchaseOutcome], None] | None = None,
) -> dict[str, Any]:
    """Start the swarm, run ``workflows`` workflows through it, and return the report.

    Args:
        scenario: the scenario.
        deployment: services to use (already running).
        issuer: issues every member's token.
        workflows: how many workflows.
        seed: the run's seed.
        concurrency: workflows in flight at once.
        timeout_s: give up on workflows not finished by then (they count as unfinished);
            None waits for every one.
        in_process: run services in this process instead of Ray actors.
        transport: mutual TLS; every member is admitted and gets its certificate, and the
            operator member (`OPERATOR_MEMBER`) is admitted for ``govmesh approvals``.
        simulated_approver: answer escalations with the scenario's simulated approver;
            False leaves them to operators (``govmesh approvals``) or to their expiry.
        on_done: called as each workflow finishes (progress bars).
    """
    started = time.perf_counter()
    run_id = uuid.uuid4().hex[:8]
    swarm = Swarm(scenario, deployment, issuer, seed=seed, in_process=in_process)
    authority = TokenAuthority(
        deployment, issuer, ca=transport.ca if transport is not None else None
    )
    approver = swarm.approver() if simulated_approver else None
    me = issuer.identity(f"coordinator-{run_id}", COORDINATOR_ROLE)
    if transport is not None:
        transport.admit(OPERATOR_MEMBER, OPERATOR_ROLE, tenant=deployment.tenant)
        transport.enrol(
            [
                *swarm.identities(),
                *([approver.identity] if approver else []),
                authority.identity,
                me,
            ],
            tenant=deployment.tenant,
        )
    coordinator = await Bus.connect(deployment, me)
    await ensure_event_stream(coordinator.nc)
    outcomes: dict[str, WorkflowDone] = {}
    waiting: dict[str, asyncio.Future[WorkflowDone]] = {}

    async def on_message(d: Delivery) -> None:
        future = waiting.get(d.envelope.workflow)
        if future is not None and not future.done():
            future.set_result(d.body)

    try:
        await authority.start()
        await swarm.start()
        if approver is not None:
            await approver.start()
        await coordinator.subscribe(
            coordinator.subjects.msg(coordinator.identity.agent_id),
            on_message,
            accepts=WorkflowDone,
        )
        await coordinator.flush()
        ready = time.perf_counter()
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, start: WorkflowStart) -> None:
            workflow = f"{run_id}-{i:05d}"
            async with gate:
                future = waiting[workflow] = asyncio.get_running_loop().create_future()
                await coordinator.publish(
                    coordinator.subjects.msg(swarm.requester_id),
                    start,
                    workflow=workflow,
                    trace=_traceparent(),
                )
                done = await future
            outcomes[workflow] = done
            if on_done is not None:
                on_done(workflow, done.outcome)

        tasks = [
            asyncio.create_task(one(i, s))
            for i, s in enumerate(draw_workflows(scenario, workflows, seed=seed))
        ]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        finished_at = time.perf_counter()
        expected_calls = sum(done.model_calls for done in outcomes.values())
        budget = await _settled_budget(coordinator, tuple(outcomes), expected_calls)
        # Every recorded decision of the tenant, decided again (there must be no difference).
        replayed = await replay_url(deployment.redis_url, prefix=deployment.key_prefix)
        stats = await swarm.stats()
        if approver is not None:
            stats["approver"] = {
                "answered": approver.answered,
                "rejected": dict(approver.bus.rejected),
            }
        stats["coordinator"] = {"rejected": dict(coordinator.rejected)}
    finally:
        await coordinator.close()
        if approver is not None:
            await approver.close()
        await swarm.close()
        await authority.close()
    return _report(
        scenario,
        seed=seed,
        total=workflows,
        outcomes=outcomes,
        budget=budget,
        expected_calls=expected_calls,
        stats=stats,
        replayed=replayed,
        simulated_approver=approver is not None,
        timings={
            "start_s": ready - started,
            "workflows_s": finished_at - ready,
            "total_s": time.perf_counter() - started,
        },
    )


def _traceparent() -> str:
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


async def _settled_budget(
    bus: Bus, workflows: tuple[str, ...], expected_calls: int, *, wait_s: float = 10.0
) -> BudgetReport:
    """The budget actor's totals once it has counted every model call the agents reported.

    Usage events are asynchronous, so the last few may still be in flight when the last
    workflow ends; waiting for the count to match makes the report exact, not approximate.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            reply = await bus.request(
                bus.subjects.ctl("budget"),
                BudgetQuery(workflows=workflows),
                accepts=BudgetReport,
                timeout=5.0,
            )
        except BusError:
            return BudgetReport()
        report: BudgetReport = reply.body
        if report.calls >= expected_calls or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.05)


def _report(
    scenario: Scenario,
    *,
    seed: int,
    total: int,
    outcomes: dict[str, WorkflowDone],
    budget: BudgetReport,
    expected_calls: int,
    stats: dict[str, Any],
    replayed: ReplayReport,
    simulated_approver: bool,
    timings: dict[str, float],
) -> dict[str, Any]:
    results = Counter(done.outcome.result for done in outcomes.values())
    first = Counter(done.outcome.first_decision for done in outcomes.values())
    latencies = [
        done.outcome.governance_ms for done in outcomes.values() if done.outcome.first_decision
    ]
    rejected: Counter[str] = Counter()
    for service in stats.values():
        rejected.update(service.get("rejected", {}))
    return {
        "scenario": scenario.name,
        "seed": seed,
        "model": {"name": scenario.model.name, "simulated": True},
        "approver": (
            {"name": scenario.approvals.by, "simulated": True}
            if simulated_approver
            else {"name": "operators", "simulated": False}
        ),
        "workflows": {
            "total": total,
            "finished": len(outcomes),
            "executed": results["executed"],
            "denied": results["denied"],
            "rejected": results["rejected"],
            "failed": results["failed"],
        },
        "decisions": {
            **{k: first[k] for k in ("allow", "deny", "escalate")},
            "replayed": replayed.decisions,
            "replay_differences": len(replayed.mismatches),
        },
        "approvals": {
            "approved": sum(1 for d in outcomes.values() if d.outcome.approved_by),
            "rejected": results["rejected"],
        },
        "model_calls": {"reported_by_agents": expected_calls, "counted_by_budget": budget.calls},
        "tokens": budget.tokens,
        "input_tokens": budget.input_tokens,
        "output_tokens": budget.output_tokens,
        "cost_usd": round(budget.cost_usd, 6),
        "governance_latency_ms": summarize(latencies),
        "security_rejections": dict(rejected),
        "timings_s": timings,
        "actors": stats,
    }


async def run_scenario(
    path: str | Path,
    *,
    workflows: int,
    seed: int,
    concurrency: int = 64,
    simulated_approver: bool = True,
    on_done: Callable[[str, PurchaseOutcome], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load a scenario, bring up the runtime (embedded or external services), run, report.

    While it runs, the deployment is advertised under ``$GOVMESH_HOME`` (see
    `govmesh.runtime.advertise`) so ``govmesh approvals`` can answer its escalations from
    another terminal. With ``simulated_approver=False`` only operators (or the approvals'
    expiry) answer them, and the run waits for every workflow.
    """
    from govmesh.runtime import Runtime, advertise

    scenario = load_scenario(path)
    phase = on_phase or (lambda _: None)
    phase("starting nats-server, Redis-protocol server and Ray")
    async with Runtime() as runtime:
        issuer = new_issuer(scenario.tenant)
        deployment = issuer.deployment(
            tenant=scenario.tenant,
            nats_url=runtime.nats_url,
            redis_url=runtime.redis_url,
            tls=runtime.transport is not None,
        )
        transport = runtime.transport
        with advertise(
            deployment,
            issuer,
            ca=transport.ca if transport is not None else None,
            what=f"govmesh run {path}",
        ):
            phase("starting agent and platform actors")
            report = await run_workflows(
                scenario,
                deployment,
                issuer,
                workflows=workflows,
                seed=seed,
                concurrency=concurrency,
                timeout_s=600.0 if simulated_approver else None,
                transport=transport,
                simulated_approver=simulated_approver,
                on_done=on_done,
            )
        report["runtime"] = {"embedded": runtime.embedded, "mutual_tls": deployment.tls}
        phase("stopping")
        return report
