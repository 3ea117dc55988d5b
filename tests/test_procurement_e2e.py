"""The procurement scenario end to end: Ray actors, real nats-server and Redis-protocol
server, the seed policy, the simulated ERP's own records as the proof."""

from __future__ import annotations

from pathlib import Path

import msgspec
import redis.asyncio as aioredis

from govmesh.scenarios import load_scenario, run_workflows

from _deploy import deployment
from procurement.tools import orders as placed_orders

ROOT = Path(__file__).parent.parent
SCENARIO = ROOT / "scenarios" / "procurement.yaml"


async def test_procurement_swarm_is_governed_end_to_end(
    secure_nats, redis_server, prefix, ray_session
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix)
    scenario = load_scenario(SCENARIO)

    report = await run_workflows(
        scenario, dep, issuer, workflows=50, seed=1, timeout_s=240, transport=transport
    )

    w, d = report["workflows"], report["decisions"]
    assert w["finished"] == w["total"] == 50
    assert d["allow"] > 0 and d["deny"] > 0 and d["escalate"] > 0
    assert d["allow"] + d["deny"] + d["escalate"] == 50
    assert (d["replayed"], d["replay_differences"]) == (50, 0)
    assert w["failed"] == 0
    assert report["model_calls"]["counted_by_budget"] == report["model_calls"]["reported_by_agents"]
    assert report["tokens"] > 0 and report["cost_usd"] > 0
    assert report["security_rejections"] == {}
    # The audit actor indexed every event of the run, and every workflow's chain is intact.
    audit = report["audit"]
    assert audit["caught_up"] and audit["intact"], audit
    assert audit["workflows_verified"] == 50 and audit["records"] >= 50 * 6

    r = aioredis.Redis.from_url(redis_server.url)
    try:
        orders = await placed_orders(r, dep.key_prefix)
        approvals = {
            k.decode(): msgspec.json.decode(v)
            for k, v in (await r.hgetall(f"{dep.key_prefix}:approvals:done")).items()
        }
    finally:
        await r.aclose()

    assert len(orders) == w["executed"] > 0
    assert len({o.workflow for o in orders}) == len(orders), "one order per workflow at most"
    for order in orders:
        assert order.amount_usd <= 10_000, order
        assert order.vendor in {"Vendor_A", "Vendor_B"}, order
        if order.amount_usd > 5_000:
            record = approvals[order.approval_id]
            assert record["answer"]["approved"] is True and record["outcome"] == "allow"
            assert record["workflow"] == order.workflow
            assert order.approved_by == record["answer"]["by"] == scenario.approvals.by
    assert any(o.amount_usd > 5_000 for o in orders), "the run exercised approved escalations"
    rejected = [a for a in approvals.values() if not a["answer"]["approved"]]
    assert rejected, "some escalations were rejected"
    assert all(a["outcome"] == "deny" for a in rejected)
