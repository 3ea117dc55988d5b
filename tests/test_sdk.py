"""Agents written on the SDK, hosted by `AgentHost` on real servers: every governed call
decided by policy, waited for durably, run once, and its typed result handed back."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from govmesh import ToolError
from govmesh.agents import RetryPolicy
from govmesh.tools import GatewayService

import _shipping
from _agents import mesh
from _shipping import POLICY, ROLE, Shipment, Shipped, ship

SHIPPER = "_shipping:Shipper"
TOOL = ship.name


@pytest.fixture(autouse=True)
def behaviour() -> _shipping.Behaviour:
    """A fresh behaviour of the test tool for each test."""
    _shipping.BEHAVIOUR = _shipping.Behaviour()
    return _shipping.BEHAVIOUR


@pytest.fixture
async def shipping(secure_nats, redis_server, prefix, tmp_path):
    """The services, with a shipper agent ``shipper-1``."""
    async with mesh(secure_nats, redis_server, prefix, tmp_path, policy=POLICY, tools=[ship]) as m:
        await m.host(
            "shipper-1",
            SHIPPER,
            role=ROLE,
            capabilities=(TOOL,),
            tool_retry=RetryPolicy(initial_s=0.01, maximum_attempts=3),
        )
        yield m


def _order(amount: float, vendor: str = "Vendor_A") -> Shipment:
    return Shipment(item="monitors", vendor=vendor, amount_usd=amount)


async def test_each_governed_call_is_allowed_denied_approved_or_rejected_as_policy_says(
    shipping, behaviour
) -> None:
    m = shipping
    m.approve["wf-rejected"] = False
    runs = {
        "wf-allowed": _order(900.0),
        "wf-denied": _order(900.0, vendor="Vendor_Z"),
        "wf-approved": _order(6_000.0),
        "wf-rejected": _order(7_000.0),
    }
    got = dict(
        zip(
            runs,
            await asyncio.gather(*(m.run(w, "shipper-1", p) for w, p in runs.items())),
            strict=True,
        )
    )

    summary = {w: (o.result, o.first_decision) for w, o in got.items()}
    assert summary == {
        "wf-allowed": ("completed", "allow"),
        "wf-denied": ("denied", "deny"),
        "wf-approved": ("completed", "escalate"),
        "wf-rejected": ("rejected", "escalate"),
    }
    # The handler's typed result travels back as the tool returned it.
    allowed = msgspec.msgpack.decode(got["wf-allowed"].value, type=Shipped)
    approved = msgspec.msgpack.decode(got["wf-approved"].value, type=Shipped)
    assert {allowed.item, approved.item} == {"monitors"}
    assert sorted(s.tracking for s in behaviour.shipped.values()) == sorted(
        [allowed.tracking, approved.tracking]
    )
    assert got["wf-approved"].approved_by == "test-operator" and got["wf-approved"].approval_id
    assert got["wf-rejected"].approval_id and got["wf-rejected"].value == b""
    assert any("Vendor_Z" in r for r in got["wf-denied"].reasons), got["wf-denied"].reasons
    assert got["wf-allowed"].shown == {"tool": TOOL, "item": "monitors", "amount_usd": 900.0}
    assert all(o.model_calls == 1 for o in got.values())
    # Only what was allowed ran, each once.
    assert behaviour.effects == {("wf-allowed", 1): 1, ("wf-approved", 1): 1}


async def test_a_tool_raising_runtime_error_is_reported_to_its_agent_as_failed(
    shipping, behaviour
) -> None:
    behaviour.failures.append(RuntimeError("the depot's disk is full"))

    outcome = await shipping.run("wf-broken", "shipper-1", _order(900.0))

    assert (outcome.result, outcome.first_decision) == ("failed", "allow")
    assert outcome.reasons == (f"{TOOL}: RuntimeError: the depot's disk is full",)
    assert behaviour.calls == 1 and not behaviour.effects
    assert shipping.service(GatewayService).stats()["failed"] == {TOOL: 1}


async def test_a_retryable_tool_error_is_retried_and_the_call_takes_effect_once(
    shipping, behaviour
) -> None:
    behaviour.failures.append(ToolError("the depot is busy", retryable=True))

    outcome = await shipping.run("wf-busy", "shipper-1", _order(900.0))

    assert outcome.result == "completed", outcome.reasons
    assert behaviour.calls == 2
    assert behaviour.effects == {("wf-busy", 1): 1}


async def test_a_tool_that_keeps_failing_retryably_fails_after_the_policys_attempts(
    shipping, behaviour
) -> None:
    behaviour.failures.extend(ToolError(f"busy {n}", retryable=True) for n in range(10))

    outcome = await shipping.run("wf-always-busy", "shipper-1", _order(900.0))

    assert (outcome.result, outcome.reasons) == ("failed", (f"{TOOL}: busy 2",))
    assert behaviour.calls == 3 and not behaviour.effects
