"""Chaos on real parts: a scenario run on its own embedded nats-server and Valkey, with
Ray actors, while every agent actor, the state actor, a governance actor and the gateway are
SIGKILLed and both servers restarted; and the counts that judge such a run, from each tool's
own record of its effects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

import govmesh
from govmesh.agents.messages import Outcome
from govmesh.governance._approvals import Answer, ApprovalRecord, ApprovalStore
from govmesh.governance.messages import ApprovalRequest
from govmesh.scenarios._chaos import effects_and_approvals, run_chaos
from govmesh.scenarios._runner import run_dir

ROOT = Path(__file__).parent.parent
SCENARIO = ROOT / "scenarios" / "procurement.yaml"
KINDS = {"agent", "state", "governance", "gateway", "redis", "nats"}
AGENTS = {"requester-1", "procurement-1"}
STRIKES = len(KINDS) - 1 + len(AGENTS)
"""Enough for every agent and every other kind once."""


async def test_a_run_struck_by_every_kind_of_failure_finishes_every_workflow_once(
    ray_session, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(tmp_path / "home"))
    # Six at a time: the run lasts five vendor waits, long enough for every strike.
    report = await run_chaos(SCENARIO, workflows=30, kills=STRIKES, seed=5, concurrency=6)

    assert report["finished"] == report["total"] == 30
    assert report["duplicate_effects"] == 0, report
    assert report["lost_approvals"] == 0, report["lost"]
    assert report["kills"] == STRIKES
    assert {s["kind"] for s in report["strikes"]} == KINDS
    assert {s["target"] for s in report["strikes"] if s["kind"] == "agent"} == AGENTS
    killed = {s["target"] for s in report["strikes"] if s["how"] == "SIGKILL"}
    # Every actor killed came back (Ray restarted it, the swarm started it again).
    assert killed <= {name for name, n in report["actor_restarts"].items() if n >= 1}
    run = report["run"]
    # One order per workflow that placed one, counted from the ERP's own records.
    assert report["effects"] == {
        "erp.create_purchase_order": run["workflows"]["results"]["completed"]
    }
    assert "failed" not in run["workflows"]["results"], run["failures"]
    # Governance decided each workflow's intent once, however often it was asked.
    assert (run["decisions"]["replayed"], run["decisions"]["replay_differences"]) == (30, 0)
    # The audit index lost nothing through the strikes: it caught up with every event.
    audit = run["audit"]
    assert audit["caught_up"] and audit["intact"], audit
    assert run["runtime"]["embedded"]["nats"] and run["runtime"]["embedded"]["redis"]
    assert set(run["runtime"]["low_latency"]) == {"mode", "held", "detail"}
    assert not run_dir(run["run_id"]).exists()  # finished: nothing left to resume


def _done(result: str, approval_id: str = "") -> Outcome:
    return Outcome(result=result, approval_id=approval_id)  # type: ignore[arg-type]


def _request(approval_id: str, workflow: str) -> ApprovalRequest:
    return ApprovalRequest(
        approval_id=approval_id,
        workflow=workflow,
        agent="procurement-1",
        tool="erp.create_purchase_order",
        args={},
        intent_id="i",
        intent_hash="h",
        reasons=(),
        escalation="human_review",
        policy_hash="p",
        requested_at=1.0,
    )


class Step(msgspec.Struct, frozen=True):
    workflow: str
    step: int


@govmesh.tool(name="test.effect")
async def effect(args: Step, ctx: govmesh.ToolContext) -> Step:
    """A tool whose record of effects the test writes itself."""
    return args


@govmesh.tool(name="test.no_effects")
async def no_effects(args: Step, ctx: govmesh.ToolContext) -> Step:
    """A tool that declares no effects lister."""
    return args


RECORDED: list[govmesh.Effect] = []


@effect.effects
async def recorded(redis: Any, key_prefix: str) -> list[govmesh.Effect]:
    return list(RECORDED)


async def test_the_counts_catch_a_repeated_effect_and_every_kind_of_lost_approval(
    redis_server, prefix
) -> None:
    RECORDED[:] = [
        govmesh.Effect(workflow=workflow, step=step, id=f"e{i}")
        for i, (workflow, step) in enumerate(
            [("wf-twice", 1), ("wf-twice", 1), ("wf-twice", 2), ("wf-once", 1), ("wf-other-run", 1)]
        )
    ]
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        store = ApprovalStore(redis, prefix)
        await redis.hset(
            store.key("pending"), "a1", msgspec.msgpack.encode(_request("a1", "wf-pending"))
        )
        for approval_id, workflow, outcome in (
            ("a2", "wf-allowed", "allow"),
            ("a3", "wf-ok", "deny"),
            ("a5", "wf-later", "deny"),
            ("a7", "wf-caught", "deny"),
            ("a8", "wf-approved-anyway", "deny"),
        ):
            await store.finish(
                ApprovalRecord(
                    approval_id=approval_id,
                    workflow=workflow,
                    agent="procurement-1",
                    tool="erp.create_purchase_order",
                    args={},
                    intent_hash="h",
                    requested_at=1.0,
                    answer=Answer(approved=outcome == "allow", by="alice"),
                    outcome=outcome,  # type: ignore[arg-type]
                    reasons=(),
                    settled_at=2.0,
                )
            )
        outcomes = {
            "wf-twice": _done("completed"),
            "wf-once": _done("completed"),
            "wf-pending": _done("failed", "a1"),
            "wf-allowed": _done("failed", "a2"),  # allowed, yet the workflow did not go on
            "wf-ok": _done("rejected", "a3"),
            "wf-unknown": _done("rejected", "a4"),  # an approval governance never had
            "wf-later": _done("completed", "a6"),  # a5 was another call's; a6 is unknown
            "wf-caught": _done("completed", "a7"),  # its handler caught the rejection
            "wf-approved-anyway": Outcome(result="completed", approval_id="a8", approved_by="x"),
        }
        counted = await effects_and_approvals(
            redis_server.url, prefix, outcomes, [effect, no_effects]
        )
    finally:
        await redis.aclose()

    assert counted["effects"] == {"test.effect": 4}  # wf-other-run is not this run's
    assert counted["duplicate_effects"] == 1
    assert counted["duplicates"] == [
        {"tool": "test.effect", "workflow": "wf-twice", "step": 1, "times": 2}
    ]
    assert counted["lost_approvals"] == 5
    assert sorted((x["approval_id"], x["why"]) for x in counted["lost"]) == [
        ("a1", "still pending"),
        ("a2", "settled allow, workflow failed"),
        ("a4", "unknown"),
        ("a6", "unknown"),
        ("a8", "settled deny, workflow completed"),
    ]
