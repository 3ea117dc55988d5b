"""Chaos on real parts: a scenario run on its own embedded nats-server and Valkey, with
Ray actors, while agent actors, the state actor, a governance actor and the gateway are
SIGKILLed and both servers restarted; and the counts that judge such a run."""

from __future__ import annotations

from pathlib import Path

import msgspec
import redis.asyncio as aioredis

from govmesh.agents import PurchaseOutcome, WorkflowDone
from govmesh.governance._approvals import Answer, ApprovalRecord, ApprovalStore
from govmesh.governance.messages import ApprovalRequest
from govmesh.scenarios._chaos import effects_and_approvals, run_chaos
from govmesh.scenarios._runner import run_dir
from govmesh.tools import ToolContext

from procurement.tools import Order, create_purchase_order

ROOT = Path(__file__).parent.parent
SCENARIO = ROOT / "scenarios" / "procurement.yaml"
KINDS = {"requester", "procurement", "state", "governance", "gateway", "redis", "nats"}


async def test_a_run_struck_by_every_kind_of_failure_finishes_every_workflow_once(
    ray_session, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(tmp_path / "home"))
    # Six at a time: the run lasts five vendor waits, long enough for every strike.
    report = await run_chaos(SCENARIO, workflows=30, kills=len(KINDS), seed=5, concurrency=6)

    assert report["finished"] == report["total"] == 30
    assert report["duplicate_effects"] == 0, report
    assert report["lost_approvals"] == 0, report["lost"]
    assert report["kills"] == len(KINDS)
    assert {s["kind"] for s in report["strikes"]} == KINDS
    killed = {s["target"] for s in report["strikes"] if s["how"] == "SIGKILL"}
    # Every actor killed came back (Ray restarted it, the swarm started it again).
    assert killed <= {name for name, n in report["actor_restarts"].items() if n >= 1}
    run = report["run"]
    # One order per executed workflow, counted from the ERP's own records.
    assert report["orders"] == run["workflows"]["executed"] > 0
    assert run["workflows"]["failed"] == 0
    # Governance decided each workflow's intent once, however often it was asked.
    assert (run["decisions"]["replayed"], run["decisions"]["replay_differences"]) == (30, 0)
    # The audit index lost nothing through the strikes: it caught up with every event.
    audit = run["audit"]
    assert audit["caught_up"] and audit["intact"], audit
    assert run["runtime"]["embedded"]["nats"] and run["runtime"]["embedded"]["redis"]
    assert set(run["runtime"]["low_latency"]) == {"mode", "held", "detail"}
    assert not run_dir(run["run_id"]).exists()  # finished: nothing left to resume


def _done(result: str, approval_id: str = "") -> WorkflowDone:
    return WorkflowDone(outcome=PurchaseOutcome(result=result, approval_id=approval_id))  # type: ignore[arg-type]


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


async def test_the_counts_catch_a_repeated_order_and_every_kind_of_lost_approval(
    redis_server, prefix
) -> None:
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        order = Order(item="monitors", vendor="Vendor_A", amount_usd=10.0)
        # Twice at one step is a duplicate; once at each of two steps is not.
        for workflow, step in (
            ("wf-twice", 1),
            ("wf-twice", 1),
            ("wf-once", 1),
            ("wf-once", 2),
            ("wf-other-run", 1),
        ):
            ctx = ToolContext(
                workflow=workflow,
                agent="procurement-1",
                step=step,
                decision_id="d",
                key_prefix=prefix,
                redis=redis,
            )
            await create_purchase_order(order, ctx)
        store = ApprovalStore(redis, prefix)
        await redis.hset(
            store.key("pending"), "a1", msgspec.msgpack.encode(_request("a1", "wf-pending"))
        )
        for approval_id, workflow, outcome in (
            ("a2", "wf-allowed", "allow"),
            ("a3", "wf-ok", "deny"),
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
            "wf-twice": _done("executed"),
            "wf-once": _done("executed"),
            "wf-pending": _done("failed", "a1"),
            "wf-allowed": _done("failed", "a2"),  # allowed, yet no order
            "wf-ok": _done("rejected", "a3"),
            "wf-unknown": _done("rejected", "a4"),  # an approval governance never had
        }
        counted = await effects_and_approvals(
            redis_server.url, prefix, outcomes, tools=[create_purchase_order]
        )
    finally:
        await redis.aclose()

    assert (counted["orders"], counted["duplicate_effects"]) == (4, 1)
    assert counted["lost_approvals"] == 3
    assert sorted((x["approval_id"], x["why"]) for x in counted["lost"]) == [
        ("a1", "still pending"),
        ("a2", "settled allow, workflow failed"),
        ("a4", "unknown"),
    ]
