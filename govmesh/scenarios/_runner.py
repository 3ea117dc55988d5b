"""Runs an app: starts its workflows at its entry agent, drives them through the swarm,
reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis
from nats.errors import Error as NatsError

from govmesh.agents._base import TRANSIENT
from govmesh.agents.messages import Outcome, WorkflowStart
from govmesh.authority import TokenAuthority
from govmesh.bus import Bus, Delivery, ensure_event_stream
from govmesh.config import Deployment
from govmesh.errors import BusError, ConfigError
from govmesh.forecasting import (
    FORECAST_METHOD,
    BudgetQuery,
    BudgetReport,
    Forecast,
    UsageHistory,
    WorkflowBurn,
    WorkflowUsage,
    calibrate,
    check_forecast,
    forecast,
)
from govmesh.governance._replay import ReplayReport, replay_url
from govmesh.governance._starts import record_start
from govmesh.identity import SOCKET_MEMBERS, Issuer
from govmesh.llm import SimulatedModelSettings
from govmesh.observability import AuditIndex, summarize
from govmesh.observability._sentinel import SENTINEL_MEMBER, ServerSentinel
from govmesh.roles import COORDINATOR_ROLE, SENTINEL_ROLE
from govmesh.runtime import Member, Transport
from govmesh.runtime._home import home_dir, write_private
from govmesh.scenarios._app import App, load_app, scenario_app
from govmesh.scenarios._records import keep_run, load_resumable
from govmesh.scenarios._runs import (
    RunManifest,
    RunRecords,
    load_manifest,
    new_run_id,
    save_manifest,
)
from govmesh.scenarios._swarm import Swarm
from govmesh.state import Keyring

if TYPE_CHECKING:
    from govmesh.observability._prometheus import PrometheusEndpoint
    from govmesh.runtime import Runtime

__all__ = [
    "Deployed",
    "deploy",
    "finish_run",
    "load_app_of",
    "new_issuer",
    "planned_run",
    "run_dir",
    "run_scenario",
    "run_workflows",
    "why_not_completed",
    "workflow_id",
]

_MAX_RESEND_S = 120.0
_BURN_VIEW_MAX = 500
"""Workflows in flight whose burn the live view asks for at once."""
_BURN_CHUNK = 500
"""Workflows one budget request names, so it and its answer stay within a bus message."""

log = logging.getLogger(__name__)


def new_issuer(tenant: str) -> Issuer:
    """A fresh token issuer for one deployment of ``tenant``."""
    return Issuer(name=f"govmesh:{tenant}:issuer", audience=f"govmesh:{tenant}")


def workflow_id(run_id: str, index: int) -> str:
    """The id of the run's workflow number ``index`` (from 0)."""
    return f"{run_id}-{index:05d}"


async def run_workflows(
    app: App,
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
    on_done: Callable[[str, Outcome], None] | None = None,
    run_id: str | None = None,
    resend_s: float = 20.0,
    governance_actors: int = 1,
    keyring: Keyring | None = None,
    during: Callable[[Swarm, Callable[[], int]], Coroutine[Any, Any, Any]] | None = None,
    clock_origin: float | None = None,
    history: UsageHistory | None = None,
    on_burn: Callable[[list[WorkflowBurn]], None] | None = None,
) -> dict[str, Any]:
    """Start the swarm, run ``workflows`` workflows through it, and return the report.

    Each workflow is a `WorkflowStart` of the app's workload sent to its entry agent, and
    ends with the `Outcome` that agent answers. Each workflow's end is recorded in Redis
    under the run's id as it arrives, and a workflow not heard of within ``resend_s``
    (doubling up to two minutes) is started again: every agent answers a start or request
    it has seen with what it did, or goes on with it, so a start sent again never makes a
    second workflow. Given the ``run_id`` of an earlier run of the same app, seed and
    count, the workflows it finished are taken from Redis and the rest started again: that
    is how a stopped run resumes.

    Args:
        app: the app.
        deployment: services to use (already running).
        issuer: issues every member's token.
        workflows: how many workflows.
        seed: the run's seed.
        concurrency: workflows in flight at once.
        timeout_s: give up on workflows not finished by then (they count as unfinished);
            None waits for every one.
        in_process: run services in this process instead of Ray actors.
        transport: mutual TLS; every member is admitted and gets its certificate. With an
            embedded server, a sentinel (`ServerSentinel`) reports what the server refused
            as security events, counted in the report's security rejections.
        simulated_approver: answer escalations with the app's simulated approver;
            False leaves them to operators (``govmesh approvals``) or to their expiry.
        on_done: called as each workflow finishes (progress bars), and at the start for
            each one an earlier run of ``run_id`` finished.
        run_id: the run's id (a new one if None); workflows are ``<run_id>-<index>``.
        resend_s: how long to wait for a workflow's end before starting it again.
        governance_actors: governance actors sharing the intents.
        keyring: the state actor's snapshot keys (see `Swarm`).
        during: run beside the workflows with the swarm and a count of the workflows
            finished so far, and cancelled once they all are (``govmesh chaos``).
        clock_origin: for an app with a simulated clock, when the run's clock started
            (the same when it resumes); now if None. A deployment whose clock is already
            simulated keeps it.
        history: recorded usage of earlier runs: the run's cost is forecast from it first
            and compared with what it cost after (``forecast`` in the report), and the run's
            own usage is added to it once every workflow finished. None does neither.
        on_burn: called about once a second with the model use so far of the workflows
            in flight, costliest first (a live view).
    """
    started = time.perf_counter()
    app.check_files()
    run_id = run_id or new_run_id()
    prior = _prior_forecast(history, app.name, workflows, seed=seed)
    starts = app.starts(workflows, seed=seed)
    swarm = Swarm(
        app,
        deployment,
        issuer,
        seed=seed,
        in_process=in_process,
        governance_actors=governance_actors,
        keyring=keyring,
        clock_origin=clock_origin,
        transport=transport,
    )
    deployment = swarm.deployment
    authority = TokenAuthority(
        deployment, issuer, ca=transport.ca if transport is not None else None
    )
    approver = swarm.approver() if simulated_approver else None
    me = issuer.identity(f"coordinator-{run_id}", COORDINATOR_ROLE)
    sentinel = (
        ServerSentinel(
            deployment, issuer.identity(SENTINEL_MEMBER, SENTINEL_ROLE), transport=transport
        )
        if transport is not None and transport.server is not None
        else None
    )
    if transport is not None:
        # These run in this process; the swarm's members enrol their own keys.
        transport.enrol(
            [
                *([approver.identity] if approver else []),
                authority.identity,
                me,
                *([sentinel.identity] if sentinel else []),
            ],
            tenant=deployment.tenant,
        )
    coordinator = await Bus.connect(deployment, me)
    await ensure_event_stream(coordinator.nc, deployment.tenant, replicas=deployment.replicas)
    records = RunRecords(deployment.redis_url, deployment.key_prefix, run_id)
    outcomes: dict[str, Outcome] = await records.finished()
    waiting: dict[str, asyncio.Future[Outcome]] = {}
    background: set[asyncio.Task[None]] = set()

    async def on_message(d: Delivery) -> None:
        future = waiting.get(d.envelope.workflow)
        if future is not None and not future.done():
            future.set_result(d.body)
            task = asyncio.create_task(records.finish(d.envelope.workflow, d.body))
            background.add(task)
            task.add_done_callback(background.discard)

    chaos: asyncio.Task[Any] | None = None
    watch: asyncio.Task[Any] | None = None
    try:
        if sentinel is not None:
            await sentinel.start()
        await authority.start()
        await swarm.start()
        if approver is not None:
            await approver.start()
        await coordinator.subscribe(
            coordinator.subjects.msg(coordinator.identity.agent_id),
            on_message,
            accepts=Outcome,
        )
        await coordinator.flush()
        ready = time.perf_counter()
        gate = asyncio.Semaphore(concurrency)
        if on_done is not None:
            for workflow, ended in sorted(outcomes.items()):
                on_done(workflow, ended)

        async def one(i: int, start: WorkflowStart) -> None:
            workflow = workflow_id(run_id, i)
            if workflow in outcomes:
                return
            trace = _traceparent()
            async with gate:
                future = waiting[workflow] = asyncio.get_running_loop().create_future()
                wait = resend_s
                while not future.done():
                    try:
                        # Recorded with every start sent: a start is decided on only once
                        # governance holds its record, even one lost to a Redis restart.
                        await record_start(coordinator, workflow, swarm.agent_ids, trace=trace)
                        await coordinator.publish(
                            coordinator.subjects.msg(swarm.entry_id),
                            start,
                            workflow=workflow,
                            trace=trace,
                        )
                    except TRANSIENT as exc:
                        log.info("start of %s not sent (%s); sending again", workflow, exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(future), wait)
                    wait = min(wait * 2, _MAX_RESEND_S)
                ended = future.result()
            outcomes[workflow] = ended
            if on_done is not None:
                on_done(workflow, ended)

        tasks = [asyncio.create_task(one(i, s)) for i, s in enumerate(starts)]
        if during is not None:
            chaos = asyncio.create_task(during(swarm, lambda: len(outcomes)))
        if on_burn is not None:
            watch = asyncio.create_task(_watch_burn(coordinator, waiting, on_burn))
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for side in (chaos, watch):
            if side is not None:
                side.cancel()
                await asyncio.gather(side, return_exceptions=True)
        finished_at = time.perf_counter()
        expected_calls = sum(ended.model_calls for ended in outcomes.values())
        budget = await _settled_budget(coordinator, tuple(outcomes), expected_calls)
        burns = await _burns(coordinator, tuple(outcomes))
        forecast_report = _forecast_vs_actual(prior, burns, workflows)
        if history is not None and len(outcomes) == workflows and burns:
            history.append(_usage_records(app, run_id, seed, burns))
        # Every recorded decision of the tenant, decided again (there must be no difference).
        replayed = await replay_url(deployment.redis_url, prefix=deployment.key_prefix)
        audit = await _audited(coordinator, deployment, tuple(outcomes))
        stats = await swarm.stats()
        if approver is not None:
            stats["approver"] = {
                "answered": approver.answered,
                "rejected": dict(approver.bus.rejected),
            }
        stats["coordinator"] = {"rejected": dict(coordinator.rejected)}
        if sentinel is not None:
            await sentinel.poll()
            stats["sentinel"] = sentinel.stats()
        await asyncio.gather(*background, return_exceptions=True)
    finally:
        for side in (chaos, watch):
            if side is not None and not side.done():
                side.cancel()
                await asyncio.gather(side, return_exceptions=True)
        await records.close()
        if sentinel is not None:
            await sentinel.close()
        await coordinator.close()
        if approver is not None:
            await approver.close()
        await swarm.close()
        await authority.close()
    report = _report(
        app,
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
            # After the last workflow ended: the budget's settling, the replay, the audit's
            # catch-up and verification, and stopping the actors.
            "after_s": time.perf_counter() - finished_at,
            "total_s": time.perf_counter() - started,
        },
    )
    report["run_id"] = run_id
    report["forecast"] = forecast_report
    report["audit"] = audit
    report["actor_restarts"] = dict(swarm.restarts)
    return report


def _traceparent() -> str:
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


def _budget_section(app: App, stats: dict[str, Any]) -> dict[str, Any]:
    """The caps in force and what they did: interrupts put to people, released, halted."""
    interrupts: Counter[str] = Counter()
    lapsed = 0
    for service in stats.values():
        interrupts.update(service.get("interrupts", {}))
        lapsed += int(service.get("lapsed", 0))
    return {
        "caps": None if app.budget is None else msgspec.to_builtins(app.budget),
        "interrupts": {k: interrupts[k] for k in ("asked", "released", "halted")},
        "lapsed_reservations": lapsed,
    }


def _timer_counts(stats: dict[str, Any]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for service in stats.values():
        counts.update(service.get("timers", {}))
    return {"fired": counts["fired"], "missed": counts["missed"]}


async def _audited(
    bus: Bus, deployment: Deployment, workflows: tuple[str, ...], *, wait_s: float = 45.0
) -> dict[str, Any]:
    """Once the audit actor has stored every event the stream held when the workflows
    had finished, each of the run's workflows' chains checked (`AuditIndex.verify`).

    Caught up means the audit consumer's acknowledgement floor reached the stream's last
    event of that moment: events keep coming after it (the run's own queries), so "nothing
    pending" may never be seen at one instant. The wait outlasts the consumer's 30 s
    redelivery of events fetched before a nats-server restart and never acknowledged."""
    js = bus.nc.jetstream()
    durable = f"audit-{deployment.tenant}"
    stream = bus.subjects.event_stream
    deadline = time.monotonic() + wait_s
    caught_up = False
    last: int | None = None
    while time.monotonic() < deadline:
        try:
            if last is None:
                last = (await js.stream_info(stream)).state.last_seq
            info = await js.consumer_info(stream, durable)
        except NatsError:
            await asyncio.sleep(0.2)
            continue
        if info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= last:
            caught_up = True
            break
        await asyncio.sleep(0.2)
    client = aioredis.Redis.from_url(deployment.redis_url)
    try:
        index = AuditIndex(client, prefix=deployment.key_prefix)
        checked = await index.verify(workflows)
        records = checked.records
        problems = [msgspec.to_builtins(p) for p in checked.problems]
        refused = Counter(m.reason for m in await index.refused())
    finally:
        await client.aclose()
    return {
        "caught_up": caught_up,
        "workflows_verified": len(workflows),
        "records": records,
        "problems": problems[:20],
        "intact": not problems,
        # Messages of the stream the audit refused (forged, replayed, malformed), kept out of
        # every chain: a chain can be intact while someone attacked the run.
        "refused": sum(refused.values()),
        "refused_reasons": dict(refused.most_common()),
    }


def _prior_forecast(
    history: UsageHistory | None, scenario: str, workflows: int, *, seed: int
) -> Forecast | None:
    """The run's cost forecast from earlier runs' recorded usage, made before it starts."""
    if history is None:
        return None
    records = history.read(scenario)
    if not records:
        return None
    return forecast(calibrate(records), scenario, workflows, seed=seed)


async def _watch_burn(
    bus: Bus,
    waiting: dict[str, asyncio.Future[Outcome]],
    on_burn: Callable[[list[WorkflowBurn]], None],
    *,
    interval_s: float = 1.0,
) -> None:
    """Every ``interval_s``, the burn of the workflows in flight, costliest first."""
    while True:
        await asyncio.sleep(interval_s)
        in_flight = tuple(w for w, f in list(waiting.items()) if not f.done())[:_BURN_VIEW_MAX]
        burns = await _burns(bus, in_flight, timeout=interval_s)
        on_burn(sorted(burns, key=lambda b: b.cost_usd, reverse=True))


async def _budget(
    bus: Bus, workflows: tuple[str, ...], *, detail: bool = False, timeout: float = 10.0
) -> BudgetReport | None:
    """The budget actor's counts for `workflows`, asked for in chunks and summed (with each
    workflow's burn when `detail`): the ids of a 10,000-workflow run, or their detail, in
    one message is more than a bus message may hold. None when it does not answer."""
    total = BudgetReport()
    for start in range(0, len(workflows), _BURN_CHUNK):
        try:
            reply = await bus.request(
                bus.subjects.ctl("budget"),
                BudgetQuery(workflows=workflows[start : start + _BURN_CHUNK], detail=detail),
                accepts=BudgetReport,
                timeout=timeout,
            )
        except BusError:
            return None
        part: BudgetReport = reply.body
        total = BudgetReport(
            calls=total.calls + part.calls,
            input_tokens=total.input_tokens + part.input_tokens,
            output_tokens=total.output_tokens + part.output_tokens,
            cost_usd=total.cost_usd + part.cost_usd,
            burn=total.burn + tuple(b for b in part.burn if b.scope == "workflow"),
        )
    return total


async def _burns(
    bus: Bus, workflows: tuple[str, ...], *, timeout: float = 10.0
) -> list[WorkflowBurn]:
    """Each workflow's model use, by role, from the budget actor."""
    report = await _budget(bus, workflows, detail=True, timeout=timeout)
    return [] if report is None else list(report.burn)


def _usage_records(
    app: App, run_id: str, seed: int, burns: list[WorkflowBurn]
) -> list[WorkflowUsage]:
    return [
        WorkflowUsage(
            scenario=app.name,
            run_id=run_id,
            seed=seed,
            workflow=burn.workflow,
            **msgspec.structs.asdict(role),
        )
        for burn in burns
        for role in burn.roles
    ]


def _forecast_vs_actual(
    prior: Forecast | None, burns: list[WorkflowBurn], workflows: int
) -> dict[str, Any]:
    if prior is None:
        return {"available": False, "why": "no recorded usage of this scenario yet"}
    section: dict[str, Any] = {
        "available": True,
        "method": FORECAST_METHOD,
        "recorded_workflows": prior.recorded_workflows,
        "expected_cost_usd": prior.expected_cost_usd,
        "p5_cost_usd": prior.p5_cost_usd,
        "p95_cost_usd": prior.p95_cost_usd,
        "per_workflow_p90_usd": prior.per_workflow_p90_usd,
    }
    if len(burns) != workflows:
        return {**section, "actual": None, "why": "not every workflow finished"}
    check = check_forecast(prior, [b.cost_usd for b in burns])
    return {**section, "actual": msgspec.to_builtins(check)}


async def _settled_budget(
    bus: Bus, workflows: tuple[str, ...], expected_calls: int, *, wait_s: float = 10.0
) -> BudgetReport:
    """The budget actor's totals once it has counted every model call the agents reported.

    Usage events are asynchronous, so the last few may still be in flight when the last
    workflow ends; waiting for the count to match makes the report exact, not approximate.
    """
    deadline = time.monotonic() + wait_s
    while True:
        report = await _budget(bus, workflows, timeout=5.0)
        if report is None:
            return BudgetReport()
        if report.calls >= expected_calls or time.monotonic() > deadline:
            return report
        await asyncio.sleep(0.05)


def _report(
    app: App,
    *,
    seed: int,
    total: int,
    outcomes: dict[str, Outcome],
    budget: BudgetReport,
    expected_calls: int,
    stats: dict[str, Any],
    replayed: ReplayReport,
    simulated_approver: bool,
    timings: dict[str, float],
) -> dict[str, Any]:
    results = Counter(o.result for o in outcomes.values())
    first = Counter(o.first_decision for o in outcomes.values())
    latencies = [o.governance_ms for o in outcomes.values() if o.first_decision]
    rejected: Counter[str] = Counter()
    for service in stats.values():
        rejected.update(service.get("rejected", {}))
    return {
        "scenario": app.name,
        "seed": seed,
        "agents": {
            m.id: {
                "class": m.cls.__qualname__,
                "role": m.role,
                "entry": m.entry,
                "model": {
                    "name": m.model_name(),
                    "provider": m.model_provider(),
                    "simulated": isinstance(m.model, SimulatedModelSettings),
                },
            }
            for m in app.agents
        },
        "clock": {"speed": app.clock.speed, "simulated": app.clock.speed != 1.0},
        "timers": _timer_counts(stats),
        "approver": (
            {"name": app.approvals.by, "simulated": True}
            if simulated_approver
            else {"name": "operators", "simulated": False}
        ),
        "workflows": {
            "total": total,
            "finished": len(outcomes),
            # Every result the agents reported, by name, most frequent first.
            "results": dict(results.most_common()),
        },
        # Each result but completed with its most frequent reasons, for the summary.
        "why": why_not_completed(outcomes.values()),
        # Why workflows failed, so a run with failures can be looked into (at most 20).
        "failures": [
            {"workflow": workflow, "reasons": list(o.reasons)}
            for workflow, o in sorted(outcomes.items())
            if o.result == "failed"
        ][:20],
        "decisions": {
            **{k: first[k] for k in ("allow", "deny", "escalate")},
            "replayed": replayed.decisions,
            "replay_differences": len(replayed.mismatches),
        },
        "approvals": {
            "approved": sum(1 for o in outcomes.values() if o.approved_by),
            "rejected": results["rejected"],
        },
        "calls": _shown_calls(outcomes),
        "model_calls": {"reported_by_agents": expected_calls, "counted_by_budget": budget.calls},
        "tokens": budget.tokens,
        "input_tokens": budget.input_tokens,
        "output_tokens": budget.output_tokens,
        "cost_usd": round(budget.cost_usd, 6),
        "budget": _budget_section(app, stats),
        "governance_latency_ms": summarize(latencies),
        "security_rejections": dict(rejected),
        "timings_s": timings,
        "actors": stats,
    }


_WHY_SHOWN = 3
"""Reasons a report lists for each result that is not ``completed`` (the most frequent)."""


def why_not_completed(outcomes: Iterable[Outcome]) -> dict[str, dict[str, int]]:
    """For each result but ``completed``, its most frequent reasons with their counts, so
    a run whose workflows fail (a capability its agent lacks, a tool that breaks) says why
    where its outcomes are shown."""
    by_result: dict[str, Counter[str]] = {}
    for o in outcomes:
        if o.result != "completed":
            by_result.setdefault(o.result, Counter()).update(o.reasons or ("no reason given",))
    return {
        result: dict(reasons.most_common(_WHY_SHOWN))
        for result, reasons in sorted(by_result.items())
    }


_SHOWN_VALUES = 5
"""Distinct values of a shown argument a report lists (the most frequent)."""


def _shown_calls(outcomes: dict[str, Outcome]) -> dict[str, Any]:
    """Each workflow's first governed call, by tool, with the arguments the tool declares
    to show: a number as its range and total, anything else as its most frequent values;
    and how the workflows that made it ended."""
    by_tool: dict[str, list[Outcome]] = {}
    for o in outcomes.values():
        tool = o.shown.get("tool")
        if isinstance(tool, str):
            by_tool.setdefault(tool, []).append(o)
    calls: dict[str, Any] = {}
    for tool, made in sorted(by_tool.items()):
        args: dict[str, list[Any]] = {}
        for o in made:
            for name, value in o.shown.items():
                if name != "tool":
                    args.setdefault(name, []).append(value)
        fields: dict[str, Any] = {}
        for name, values in args.items():
            numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if numbers and len(numbers) == len(values):
                fields[name] = {
                    "min": min(numbers),
                    "max": max(numbers),
                    "total": round(sum(numbers), 6),
                }
            else:
                counted = Counter(repr(v) if isinstance(v, dict | list) else v for v in values)
                fields[name] = {"values": dict(counted.most_common(_SHOWN_VALUES))}
        calls[tool] = {
            "workflows": len(made),
            "results": dict(Counter(o.result for o in made).most_common()),
            "shown": fields,
        }
    return calls


def run_dir(run_id: str) -> Path:
    """Where a run keeps its embedded servers' data (Redis append-only file, JetStream) and
    its generated snapshot keys: ``$GOVMESH_HOME/runs/<run_id>``. Kept after an
    interruption, for ``--resume``; once every workflow has finished, its Redis data and
    manifest become the run's record (`keep_run`) and the rest is removed."""
    return home_dir() / "runs" / run_id


@dataclass
class Deployed:
    """A scenario's deployment brought up by `deploy`."""

    runtime: Runtime
    app: App
    deployment: Deployment
    issuer: Issuer
    keyring: Keyring
    manifest: RunManifest

    def describe(self) -> dict[str, Any]:
        """What a run's report says of its runtime: which services it embeds, whether the
        bus is mutual TLS or an insecure one the user accepted (``--insecure-bus``), and
        whether the CPUs were held awake, and what the NATS auth callout answered when
        external nodes admitted the run's members through it."""
        transport = self.runtime.transport
        callout = transport.callout if transport is not None else None
        return {
            "embedded": self.runtime.embedded,
            "mutual_tls": self.deployment.tls,
            "insecure_bus": self.runtime.insecure_bus,
            "low_latency": msgspec.structs.asdict(self.runtime.low_latency),
            "auth_callout": None
            if callout is None
            else {"admitted": dict(callout.admitted), "refused": dict(callout.refused)},
        }


@contextlib.asynccontextmanager
async def deploy(
    manifest: RunManifest,
    *,
    app: App | None,
    resume: bool,
    what: str,
    phase: Callable[[str], None],
    insecure_bus: bool = False,
) -> AsyncIterator[Deployed]:
    """Bring up the runtime of a run of ``app`` (embedded or external services) with its
    data in `run_dir`, advertised under ``$GOVMESH_HOME`` so ``govmesh approvals`` can
    answer its escalations from another terminal. The manifest is kept in the run's
    directory; with ``resume`` it is read back from there (the one given then only names
    the run) and the app is the one it names (`load_app_of`). ``insecure_bus`` accepts
    external NATS without mutual TLS (see `Runtime`).

    Raises:
        ConfigError: ``resume`` of a run that has no directory here, or that finished, or
            that names no scenario file or app; no ``app`` and no ``resume``.
    """
    from govmesh.runtime import Runtime, advertise

    workdir = run_dir(manifest.run_id)
    if resume:
        manifest = load_resumable(workdir)
        app = load_app_of(manifest)
    elif app is None:
        raise ConfigError("a run needs an app or a scenario file, unless it resumes one")
    else:
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tenant = app.tenant
    manifest = msgspec.structs.replace(manifest, tenant=tenant)
    save_manifest(workdir, manifest)
    phase("starting nats-server, Redis-protocol server and Ray")
    async with Runtime(workdir=workdir, insecure_bus=insecure_bus) as runtime:
        issuer = new_issuer(tenant)
        deployment = issuer.deployment(
            tenant=tenant,
            nats_url=runtime.nats_url,
            redis_url=runtime.redis_url,
            tls=runtime.transport is not None,
            replicas=runtime.nats_replicas,
        )
        transport = runtime.transport
        if transport is not None:
            # Whom `govmesh approvals` and `govmesh watch` enrol as (see `advertise`).
            transport.register(
                Member.for_role(member, role, tenant=tenant)
                for member, role in SOCKET_MEMBERS.items()
            )
        async with advertise(
            deployment,
            issuer,
            ca=transport.ca if transport is not None else None,
            what=what,
        ):
            yield Deployed(
                runtime=runtime,
                app=app,
                deployment=deployment,
                issuer=issuer,
                keyring=_run_keyring(workdir),
                manifest=manifest,
            )


def _run_keyring(workdir: Path) -> Keyring:
    """``$GOVMESH_STATE_KEYS``, else the run's own generated keys, kept in its directory
    (0600) so a resumed run reads the snapshots it sealed."""
    configured = Keyring.from_env()
    if configured is not None:
        return configured
    path = workdir / "state-keys"
    if path.exists():
        return Keyring.from_file(path)
    keyring = Keyring.generate(f"run-{workdir.name}")
    write_private(path, keyring.key_file_text().encode())
    return keyring


def finish_run(report: dict[str, Any]) -> None:
    """Once every workflow finished, keep the run's record (`keep_run`) and say how to
    audit it (``record`` in the report); else say how to resume (``resume``), if the run
    names its scenario file or app."""
    run_id = report["run_id"]
    workdir = run_dir(run_id)
    manifest = load_manifest(workdir)
    if report["workflows"]["finished"] == report["workflows"]["total"]:
        refused = report["audit"]["refused"]
        kept = keep_run(workdir, msgspec.structs.replace(manifest, refused=refused))
        report["record"] = {
            "dir": str(kept),
            "show": f"govmesh audit show {workflow_id(run_id, 0)} --run {run_id}",
        }
    elif manifest.scenario or manifest.app:
        report["resume"] = f"govmesh run --resume {run_id}"


def load_app_of(manifest: RunManifest) -> App:
    """The app a run's manifest names: its scenario file, or its ``--app``.

    Raises:
        ConfigError: it names neither (an app run from Python), or what it names is gone.
    """
    if manifest.app:
        return load_app(manifest.app, app_dir=manifest.app_dir or ".")
    if manifest.scenario:
        return scenario_app(manifest.scenario)
    raise ConfigError(
        f"run {manifest.run_id!r} was started from Python with no scenario file or --app; "
        "it cannot be resumed from the command line"
    )


def planned_run(
    path: str | Path | None,
    *,
    app: App | str | None,
    app_dir: str | Path,
    run_id: str,
    seed: int,
    workflows: int,
    concurrency: int,
    manual_approvals: bool = False,
) -> tuple[App, RunManifest]:
    """The app a run is asked to run (a scenario file's, an `App`, or one named
    ``package.module:app`` found from ``app_dir``), checked before anything starts, and the
    run's manifest, which names where it came from so the run can be resumed.

    Raises:
        ConfigError: both or neither of ``path`` and ``app``; anything wrong with the app
            (a `ScenarioError` for a scenario file, naming the file and field).
    """
    if (path is None) == (app is None):
        raise ConfigError("give a scenario file or an app, not both")
    ref = app if isinstance(app, str) else ""
    manifest = RunManifest(
        run_id=run_id,
        scenario=str(Path(path).resolve()) if path is not None else "",
        app=ref,
        app_dir=str(Path(app_dir).resolve()) if ref else "",
        seed=seed,
        workflows=workflows,
        concurrency=concurrency,
        manual_approvals=manual_approvals,
        started_at=time.time(),
    )
    loaded = app if isinstance(app, App) else load_app_of(manifest)
    loaded.check_files()
    return loaded, manifest


async def run_scenario(
    path: str | Path | None,
    *,
    app: App | str | None = None,
    app_dir: str | Path = ".",
    workflows: int = 20,
    seed: int = 1,
    concurrency: int = 64,
    simulated_approver: bool = True,
    on_done: Callable[[str, Outcome], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    run_id: str | None = None,
    resume: bool = False,
    on_burn: Callable[[list[WorkflowBurn]], None] | None = None,
    insecure_bus: bool = False,
    prometheus_port: int | None = None,
    prometheus_host: str = "127.0.0.1",
    prometheus_linger_s: float | None = None,
) -> dict[str, Any]:
    """Load a scenario file or an app, bring up the runtime (embedded or external
    services), run, report.

    While it runs, the deployment is advertised under ``$GOVMESH_HOME`` (see
    `govmesh.runtime.advertise`) so ``govmesh approvals`` can answer its escalations from
    another terminal. With ``simulated_approver=False`` only operators (or the approvals'
    expiry) answer them, and the run waits for every workflow.

    With ``resume``, ``run_id`` names a run that was stopped before its workflows finished:
    its scenario or app, seed, count and approver setting are read back from its records,
    its embedded servers start again on its data, and what was unfinished is finished (see
    `run_workflows`); ``path``, ``app`` and the counts given are not used.

    Args:
        path: a scenario file.
        app: instead of ``path``, an `App`, or its name ``package.module:app`` (with
            ``app_dir`` first on the path).
        insecure_bus: accept external NATS without mutual TLS (see `Runtime`); the
            report says so (``runtime.insecure_bus``).
        prometheus_port: serve the deployment's metrics for Prometheus on this port (0: a
            free one) of ``prometheus_host`` while it runs (`PrometheusEndpoint`; the
            report's ``prometheus`` says where); the app's own setting when None.
        prometheus_linger_s: once the workflows end, count every event of the run into
            the metrics and serve them until they are scraped once, for at most this many
            seconds (`PrometheusEndpoint.serve_final`; the report's ``prometheus`` says
            whether they were): a run shorter than Prometheus' scrape interval still has
            its final figures scraped. 0: the endpoint stops with the run; the app's own
            setting when None.

    Raises:
        ConfigError: ``prometheus_linger_s`` is negative, or given with no port to serve
            on, or another setting is wrong.
    """
    if prometheus_linger_s is not None and not prometheus_linger_s >= 0:
        raise ConfigError(
            f"prometheus linger: seconds from 0 are needed, got {prometheus_linger_s!r}"
        )
    phase = on_phase or (lambda _: None)
    loaded: App | None = None
    if resume:
        if run_id is None:
            raise ConfigError("resuming a run needs its id")
        # Only names the run: the rest is read back from its directory.
        asked = RunManifest(
            run_id=run_id, scenario="", seed=seed, workflows=workflows, concurrency=concurrency
        )
        what = f"govmesh run --resume {run_id}"
    else:
        loaded, asked = planned_run(
            path,
            app=app,
            app_dir=app_dir,
            run_id=run_id or new_run_id(),
            seed=seed,
            workflows=workflows,
            concurrency=concurrency,
            manual_approvals=not simulated_approver,
        )
        what = f"govmesh run {path or asked.app or loaded.name}"
    # The metrics port is held from now, before any service starts: a busy one is an error
    # at once, and none of the run's servers or Ray's processes takes it meanwhile. A resumed
    # run's own setting is known only once its app is read back.
    if prometheus_port is None and loaded is not None:
        prometheus_port = loaded.prometheus_port
    if prometheus_linger_s is None and loaded is not None:
        prometheus_linger_s = loaded.prometheus_linger_s
    if loaded is not None and prometheus_port is None and prometheus_linger_s:
        raise ConfigError(
            "prometheus linger: the metrics are not served; give a prometheus port too"
        )
    held = _hold_port(prometheus_port, prometheus_host)
    try:
        async with (
            deploy(
                asked, app=loaded, resume=resume, what=what, phase=phase, insecure_bus=insecure_bus
            ) as up,
            _metrics(
                up,
                up.app.prometheus_port if prometheus_port is None else prometheus_port,
                prometheus_host,
                held,
            ) as served,
        ):
            m = up.manifest
            phase("starting agent and platform actors")
            report = await run_workflows(
                up.app,
                up.deployment,
                up.issuer,
                workflows=m.workflows,
                seed=m.seed,
                concurrency=m.concurrency,
                timeout_s=None if m.manual_approvals else 600.0,
                transport=up.runtime.transport,
                simulated_approver=not m.manual_approvals,
                on_done=on_done,
                run_id=m.run_id,
                keyring=up.keyring,
                clock_origin=up.manifest.started_at or None,
                history=UsageHistory(),
                on_burn=on_burn,
            )
            report["runtime"] = up.describe()
            if served is not None:
                report["prometheus"] = {"url": served.url}
                linger = (
                    up.app.prometheus_linger_s
                    if prometheus_linger_s is None
                    else prometheus_linger_s
                )
                if linger:
                    phase("serving the final metrics")
                    report["prometheus"] |= await served.serve_final(linger)
            phase("stopping")
    finally:
        if held is not None:
            held.close()  # when the run ended before serving on it
    finish_run(report)
    return report


def _hold_port(port: int | None, host: str) -> socket.socket | None:
    """A socket bound to ``port`` (0: a free one) until the metrics are served on it.

    Raises:
        ConfigError: the port cannot be bound; it names it.
    """
    if port is None:
        return None
    held = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        held.bind((host, port))
    except OSError as exc:
        held.close()
        raise ConfigError(
            f"prometheus port: cannot serve on {host}:{port}: {exc.strerror}"
        ) from None
    return held


@contextlib.asynccontextmanager
async def _metrics(
    up: Deployed, port: int | None, host: str, held: socket.socket | None = None
) -> AsyncIterator[PrometheusEndpoint | None]:
    """While the block runs, the deployment's metrics for Prometheus on ``port`` (see
    `PrometheusEndpoint`), joined as any watcher joins it; yields the endpoint, or None
    when ``port`` is None. A ``held`` socket names the port instead, freed for the
    server."""
    if held is not None:
        port = held.getsockname()[1]
        held.close()
    if port is None:
        yield None
        return
    from govmesh.observability._prometheus import PrometheusEndpoint

    # From the stream's first event: the run makes its stream once the actors start.
    endpoint = PrometheusEndpoint(port=port, host=host, tenant=up.deployment.tenant, start="first")
    async with endpoint as served:
        yield served
