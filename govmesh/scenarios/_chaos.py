"""``govmesh chaos``: a scenario run while its parts are killed and restarted.

A `ChaosMonkey` runs beside the workflows (`run_workflows(during=...)`). It SIGKILLs agent
actor processes, the state actor, a governance actor and the gateway, and restarts the
Redis-protocol server and nats-server, spread over the run: the i-th of K strikes comes once
0.8 (i - 1) / K of the workflows have finished (the first at the start), so every strike
lands on a busy deployment, and each waits until the actor struck before it is back. The
first strikes take each kind once, the rest are drawn at random; all of it is seeded.

What the run must show afterwards is counted from what the parts themselves recorded, never
from the ledger that is under test: `duplicate_effects` from each tool's own record of its
effects (the lister it declares with ``@tool.effects``), and `lost_approvals` from
governance's approvals against the end each workflow reported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis

from govmesh.agents.messages import Outcome
from govmesh.governance._approvals import ApprovalStore
from govmesh.scenarios._app import App
from govmesh.scenarios._runner import deploy, finish_run, planned_run, run_workflows
from govmesh.scenarios._runs import RunRecords, new_run_id
from govmesh.scenarios._swarm import Swarm, seeded_rng
from govmesh.tools._spec import Effect, ToolSpec

if TYPE_CHECKING:
    from govmesh.runtime import NatsServer, RedisServer

__all__ = ["ChaosMonkey", "Strike", "effects_and_approvals", "run_chaos"]

log = logging.getLogger(__name__)

_SPREAD = 0.8
"""Strikes are spread over the first 80% of the workflows, so the last lands in a busy run."""
_MIN_GAP_S = 1.0
_RECOVERY_WAIT_S = 30.0

_PLATFORM = ("state", "governance", "gateway")
"""Platform actors struck, by the prefix of their names."""
_DONE = ("completed", "executed")
"""Results of a workflow that went on past its governed calls."""


class Strike(msgspec.Struct, frozen=True, kw_only=True):
    """One kill or restart.

    Attributes:
        at_s: seconds since the monkey started.
        kind: ``agent`` (one of the app's), ``state``, ``governance``, ``gateway``,
            ``redis`` or ``nats``.
        target: the actor's name, or the server's.
        how: ``SIGKILL`` (an actor's process) or ``restart`` (a server).
        pid: the process killed or restarted.
        finished_before: workflows finished when it struck.
    """

    at_s: float
    kind: str
    target: str
    how: str
    pid: int
    finished_before: int


class ChaosMonkey:
    """Kills and restarts parts of a running deployment (see the module docs).

    Args:
        kills: how many strikes.
        total: the run's workflow count, to spread the strikes over.
        seed: the run's seed.
        redis_server: the embedded Redis-protocol server to restart; None skips it.
        nats_server: the embedded nats-server to restart; None skips it.
    """

    def __init__(
        self,
        *,
        kills: int,
        total: int,
        seed: int,
        redis_server: RedisServer | None,
        nats_server: NatsServer | None,
    ) -> None:
        self.kills = kills
        self.total = total
        self.seed = seed
        self._servers = {"redis": redis_server, "nats": nats_server}
        self.strikes: list[Strike] = []
        self._started = 0.0

    def _plan(self, names: list[str], agents: tuple[str, ...]) -> list[tuple[str, str]]:
        """(kind, target) for each strike: every agent and every other kind once first (in
        a seeded order), then drawn at random."""
        rng = seeded_rng(self.seed, "chaos")
        groups: list[tuple[str, list[str]]] = [("agent", [a]) for a in agents]
        groups += [(kind, [n for n in names if n.startswith(kind)]) for kind in _PLATFORM]
        groups += [(k, [k]) for k, server in self._servers.items() if server is not None]
        groups = [(kind, found) for kind, found in groups if found]
        first = groups[:]
        rng.shuffle(first)
        order = (first + [rng.choice(groups) for _ in range(self.kills)])[: self.kills]
        return [(kind, rng.choice(targets)) for kind, targets in order]

    async def __call__(self, swarm: Swarm, finished: Callable[[], int]) -> None:
        """Strike `kills` times over the run (`run_workflows` cancels it at the end)."""
        self._started = time.monotonic()
        names = list(await swarm.pids())
        for i, (kind, target) in enumerate(self._plan(names, swarm.agent_ids), start=1):
            due = self.total * _SPREAD * (i - 1) / self.kills
            while finished() < due:
                await asyncio.sleep(0.05)
            await self._strike(swarm, kind, target, finished())
            await self._recovered(swarm, kind, target)

    async def _recovered(self, swarm: Swarm, kind: str, target: str) -> None:
        """Wait (at most `_RECOVERY_WAIT_S`) until a killed actor is back on the bus, and
        at least `_MIN_GAP_S`: the next strike should hit a whole deployment."""
        await asyncio.sleep(_MIN_GAP_S)
        if kind in self._servers:
            return
        before = sum(s.target == target for s in self.strikes)
        deadline = time.monotonic() + _RECOVERY_WAIT_S
        while swarm.restarts.get(target, 0) < before and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def _strike(self, swarm: Swarm, kind: str, target: str, done: int) -> None:
        at = time.monotonic() - self._started
        server = self._servers.get(kind)
        if server is not None:
            pid = server.pid or 0
            # On this thread on purpose: the servers die with the thread that spawned them.
            server.restart()
            how = "restart"
        else:
            pid = await self._pid(swarm, target)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                log.warning("%s (pid %d) was already gone", target, pid)
            how = "SIGKILL"
        self.strikes.append(
            Strike(
                at_s=round(at, 3), kind=kind, target=target, how=how, pid=pid, finished_before=done
            )
        )
        log.warning("chaos: %s %s (pid %d) after %d workflows", how, target, pid, done)

    @staticmethod
    async def _pid(swarm: Swarm, name: str) -> int:
        """The actor's process id, waiting while it is still restarting from a strike."""
        while True:
            try:
                return (await asyncio.wait_for(swarm.pids(), 30.0))[name]
            except Exception as exc:  # a timeout, or a Ray actor error while it restarts
                log.info("pid of %s not known yet (%s)", name, exc)
                await asyncio.sleep(0.5)


async def effects_and_approvals(
    redis_url: str,
    prefix: str,
    outcomes: dict[str, Outcome],
    tools: Sequence[ToolSpec[Any, Any]],
) -> dict[str, Any]:
    """Count what a run did twice or lost, from the parts' own records.

    - ``duplicate_effects``: effects beyond one per (workflow, step), from the record of
      every tool that declares an effects lister (``@tool.effects``).
    - ``lost_approvals``: approvals of the run's workflows that are still pending; or whose
      settlement is not the end their workflow reported (the workflow's approval allowed,
      the workflow not done; rejected or expired, the workflow neither rejected nor done
      unapproved); or that a workflow reported and governance does not know.
    """
    redis = aioredis.Redis.from_url(redis_url)
    try:
        effects: dict[str, list[Effect]] = {}
        for spec in tools:
            if spec.effects_lister is not None:
                effects[spec.name] = await spec.effects_lister(redis, prefix)
        store = ApprovalStore(redis, prefix)
        pending = [r for r in await store.pending() if r.workflow in outcomes]
        settled = {r.approval_id: r for r in await store.settled() if r.workflow in outcomes}
    finally:
        await redis.aclose()
    per_step = Counter(
        (tool, e.workflow, e.step)
        for tool, listed in effects.items()
        for e in listed
        if e.workflow in outcomes
    )
    lost: list[dict[str, str]] = [
        {"approval_id": r.approval_id, "workflow": r.workflow, "why": "still pending"}
        for r in pending
    ]
    for record in settled.values():
        outcome = outcomes[record.workflow]
        if outcome.approval_id != record.approval_id:
            continue  # a later call's approval: the outcome tells the first call's only
        if record.outcome == "allow":
            kept = outcome.result in _DONE
        else:
            # Rejected, or done without it: a handler may catch the rejection and go on.
            kept = outcome.result == "rejected" or (
                outcome.result in _DONE and not outcome.approved_by
            )
        if not kept:
            lost.append(
                {
                    "approval_id": record.approval_id,
                    "workflow": record.workflow,
                    "why": f"settled {record.outcome}, workflow {outcome.result}",
                }
            )
    pending_ids = {r.approval_id for r in pending}
    for workflow, outcome in outcomes.items():
        approval = outcome.approval_id
        if approval and approval not in settled and approval not in pending_ids:
            lost.append({"approval_id": approval, "workflow": workflow, "why": "unknown"})
    return {
        "effects": {
            tool: sum(1 for e in listed if e.workflow in outcomes)
            for tool, listed in effects.items()
        },
        "duplicate_effects": sum(n - 1 for n in per_step.values()),
        "duplicates": [
            {"tool": tool, "workflow": workflow, "step": step, "times": n}
            for (tool, workflow, step), n in sorted(per_step.items())
            if n > 1
        ][:20],
        "lost_approvals": len(lost),
        "lost": lost,
        "approvals_settled": len(settled),
    }


async def run_chaos(
    path: str | Path | None,
    *,
    workflows: int,
    kills: int,
    seed: int = 1,
    concurrency: int = 64,
    governance_actors: int = 2,
    resend_s: float = 5.0,
    timeout_s: float = 900.0,
    on_done: Callable[[str, Outcome], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    app: App | str | None = None,
    app_dir: str | Path = ".",
) -> dict[str, Any]:
    """Run a scenario file (or an app) on its own embedded (or external) services while a
    `ChaosMonkey` strikes ``kills`` times, then count what was finished, done twice or lost.

    Args:
        path: the scenario file; None with ``app``.
        app: instead of ``path``, an `App` or its name ``package.module:app``.

    Returns:
        ``total``, ``finished``, ``effects`` (per tool), ``duplicate_effects``,
        ``lost_approvals``, ``kills`` (strikes made), ``kills_asked``, ``strikes`` (each),
        ``actor_restarts``, and the run's whole report (``run``).
    """
    phase = on_phase or (lambda _: None)
    loaded, manifest = planned_run(
        path,
        app=app,
        app_dir=app_dir,
        run_id=new_run_id(),
        seed=seed,
        workflows=workflows,
        concurrency=concurrency,
    )
    what = f"govmesh chaos {path or manifest.app or loaded.name}"
    async with deploy(manifest, app=loaded, resume=False, what=what, phase=phase) as up:
        monkey = ChaosMonkey(
            kills=kills,
            total=workflows,
            seed=seed,
            redis_server=up.runtime.redis_server,
            nats_server=up.runtime.nats_server,
        )
        phase("starting agent and platform actors")
        report = await run_workflows(
            loaded,
            up.deployment,
            up.issuer,
            workflows=workflows,
            seed=seed,
            concurrency=concurrency,
            timeout_s=timeout_s,
            transport=up.runtime.transport,
            on_done=on_done,
            run_id=manifest.run_id,
            resend_s=resend_s,
            governance_actors=governance_actors,
            keyring=up.keyring,
            clock_origin=up.manifest.started_at or None,
            during=monkey,
        )
        phase("counting effects and approvals")
        records = RunRecords(up.deployment.redis_url, up.deployment.key_prefix, manifest.run_id)
        try:
            finished = await records.finished()
        finally:
            await records.close()
        counted = await effects_and_approvals(
            up.deployment.redis_url, up.deployment.key_prefix, finished, loaded.tools
        )
        report["runtime"] = up.describe()
        phase("stopping")
    finish_run(report)
    return {
        "scenario": loaded.name,
        "seed": seed,
        "total": workflows,
        "finished": report["workflows"]["finished"],
        **counted,
        "kills": len(monkey.strikes),
        # Fewer strikes than asked land when the workflows all finish first.
        "kills_asked": kills,
        "strikes": [msgspec.to_builtins(s) for s in monkey.strikes],
        "actor_restarts": report.get("actor_restarts", {}),
        "run": report,
    }
