"""The governance actor on the signed bus: policy files reloaded while it runs, and every
decision records the policy hash that was in force."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from govmesh.bus import Bus, Delivery
from govmesh.governance._actor import GovernanceService
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.tools import ERP_CREATE_PO

from _deploy import deployment

ROOT = Path(__file__).parent.parent
SEED = (ROOT / "policies" / "procurement-agent-v2.yaml").read_text()
ROLE = "Procurement-Agent-v2"
ARGS = {"item": "monitors", "vendor": "Vendor_A", "amount_usd": 3000.0}


@pytest.fixture
async def running(tmp_path, secure_nats, redis_server, prefix):
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    policy = tmp_path / "policy.yaml"
    policy.write_text(SEED)
    governance = GovernanceService(
        dep,
        issuer.identity("governance-1", "governance"),
        policy_paths=[str(policy)],
        reload_interval_s=0.05,
    )
    await governance.start()
    agent = await Bus.connect(
        dep, issuer.identity("proc-1", ROLE, capabilities=(ERP_CREATE_PO,), budget_usd=50_000)
    )
    decisions: asyncio.Queue[Decision] = asyncio.Queue()

    async def on_decision(d: Delivery) -> None:
        await decisions.put(d.body)

    await agent.subscribe(agent.subjects.all("decision"), on_decision, accepts=Decision)
    await agent.flush()

    async def decide(workflow: str) -> Decision:
        await agent.publish(
            agent.subjects.intent("proc-1"),
            ToolIntent(tool=ERP_CREATE_PO, args=ARGS, step=1),
            workflow=workflow,
        )
        return await asyncio.wait_for(decisions.get(), 10)

    yield policy, governance, decide
    await agent.close()
    await governance.close()


async def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_an_edited_policy_file_takes_effect_without_a_restart(running) -> None:
    policy, governance, decide = running
    first = await decide("wf-1")
    assert first.outcome == "allow"
    assert first.policy_hash == governance.policies.hash

    policy.write_text(
        SEED.replace("require_approval_if_over: 5000", "require_approval_if_over: 1000")
    )
    await _wait_for(lambda: governance.reloads == 1)
    second = await decide("wf-2")

    assert second.outcome == "escalate"
    assert second.policy_hash == governance.policies.hash != first.policy_hash


async def test_a_broken_edit_keeps_the_policy_in_force(running) -> None:
    policy, governance, decide = running
    before = governance.policies.hash
    policy.write_text(SEED.replace("    - Vendor_A", "    \u2013 Vendor_A"))  # en dash bullet
    await _wait_for(lambda: governance.reload_errors == 1)

    decision = await decide("wf-3")
    assert governance.reloads == 0
    assert decision.outcome == "allow"
    assert decision.policy_hash == before
