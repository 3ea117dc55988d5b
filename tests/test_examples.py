"""The examples are user code: they import nothing of govmesh but its public API, their
workloads draw the same starts for the same seed, and they run governed as written."""

from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

import govmesh
from govmesh.config import Clock

from _agents import mesh
from expenses.agents import Claim
from expenses.tools import Paid, pay_expense, payments
from expenses.workload import Claims
from procurement.agents import Purchase
from procurement.tools import Placed, create_purchase_order, orders
from procurement.workload import Purchases

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
PURCHASES = {
    "items": [
        "laptops",
        "office chairs",
        "cloud credits",
        "security audit",
        "monitors",
        "licences",
    ],
    "vendors": {"Vendor_A": 0.45, "Vendor_B": 0.40, "Vendor_C": 0.15},
    "amount_usd": {"min": 250, "max": 12500},
}


def _govmesh_uses(tree: ast.AST) -> list[str]:
    """Every name of govmesh a module reaches: ``govmesh`` itself, ``govmesh.X`` for each
    attribute it reads of it or name it imports from it, and each submodule it imports."""
    used = []
    for node in ast.walk(tree):
        match node:
            case ast.Import(names=names):
                used += [a.name for a in names if a.name.split(".")[0] == "govmesh"]
            case ast.ImportFrom(module=str(module)) if module.split(".")[0] == "govmesh":
                used += [f"{module}.{a.name}" for a in node.names]
            case ast.Attribute(value=ast.Name(id="govmesh"), attr=attr):
                used.append(f"govmesh.{attr}")
    return used


def test_the_examples_import_nothing_of_govmesh_but_its_public_api() -> None:
    modules = sorted(EXAMPLES.rglob("*.py"))
    public = {f"govmesh.{name}" for name in govmesh.__all__} | {"govmesh"}
    uses = {path.relative_to(ROOT): _govmesh_uses(ast.parse(path.read_text())) for path in modules}

    private = {str(path): sorted(set(u) - public) for path, u in uses.items() if set(u) - public}
    assert private == {}
    # Not vacuous: every example's agents and tools use the API.
    assert {"govmesh.Agent", "govmesh.handler", "govmesh.tool"} <= {
        u for v in uses.values() for u in v
    }


def test_the_checker_finds_private_imports() -> None:
    tree = ast.parse(
        "import govmesh.agents\nfrom govmesh._load import load_object\nimport govmesh\n"
        "x = govmesh._host\n"
    )
    assert _govmesh_uses(tree) == [
        "govmesh.agents",
        "govmesh._load.load_object",
        "govmesh",
        "govmesh._host",
    ]


def test_purchases_are_drawn_as_the_procurement_runner_drew_them_for_the_same_seed() -> None:
    drawn = Purchases(**PURCHASES).starts(4, seed=1)

    assert drawn == [
        Purchase(item="licences", vendor="Vendor_A", amount_usd=2884.61),
        Purchase(item="security audit", vendor="Vendor_A", amount_usd=5972.28),
        Purchase(item="monitors", vendor="Vendor_B", amount_usd=11119.9),
        Purchase(item="office chairs", vendor="Vendor_B", amount_usd=6993.23),
    ]
    assert Purchases(**PURCHASES).starts(50, seed=2) == Purchases(**PURCHASES).starts(50, seed=2)
    assert Purchases(**PURCHASES).starts(4, seed=2) != drawn


def test_a_workload_option_out_of_range_is_named_with_its_value() -> None:
    with pytest.raises(ValueError, match=r"amount_usd needs 0 < min <= max, got \{'min': 5"):
        Purchases(**{**PURCHASES, "amount_usd": {"min": 5, "max": 1}})
    with pytest.raises(ValueError, match=r"vendors needs non-negative weights.*-1"):
        Purchases(**{**PURCHASES, "vendors": {"Vendor_A": -1}})
    with pytest.raises(ValueError, match=r"memos needs non-negative weights.*\{\}"):
        Claims(
            employees=["ana"], categories={"meals": 1}, memos={}, amount_usd={"min": 1, "max": 2}
        )


async def test_procurement_runs_from_the_requester_through_the_buyer_as_the_policy_decides(
    secure_nats, redis_server, prefix, tmp_path
) -> None:
    two_days = 2 * 86_400.0
    clock = Clock(origin=time.time(), speed=two_days / 2)  # the vendor's two days: 2 s
    policy = (ROOT / "policies" / "procurement-agent-v2.yaml").read_text()
    tool = create_purchase_order
    async with mesh(
        secure_nats, redis_server, prefix, tmp_path, policy=policy, tools=[tool], clock=clock
    ) as m:
        await m.host(
            "procurement-1",
            "procurement.agents:Buyer",
            role="Procurement-Agent-v2",
            capabilities=(tool.name,),
            budget_usd=1_000_000,
            options={"vendor_wait_hours": 48},
        )
        await m.host(
            "requester-1",
            "procurement.agents:Requester",
            role="Requester",
            options={"procurement": "procurement-1"},
        )
        m.approve["wf-rejected"] = False
        runs = {
            "wf-allowed": Purchase(item="monitors", vendor="Vendor_A", amount_usd=1_200.0),
            "wf-denied": Purchase(item="monitors", vendor="Vendor_C", amount_usd=1_200.0),
            "wf-approved": Purchase(item="laptops", vendor="Vendor_B", amount_usd=6_000.0),
            "wf-rejected": Purchase(item="laptops", vendor="Vendor_B", amount_usd=9_000.0),
        }
        got = await asyncio.gather(
            *(m.run(w, "requester-1", p, agents=("procurement-1",)) for w, p in runs.items())
        )
        outcomes = dict(zip(runs, got, strict=True))
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            placed = await orders(client, m.dep.key_prefix)
        finally:
            await client.aclose()

    assert {w: (o.result, o.first_decision) for w, o in outcomes.items()} == {
        "wf-allowed": ("completed", "allow"),
        "wf-denied": ("denied", "deny"),
        "wf-approved": ("completed", "escalate"),
        "wf-rejected": ("rejected", "escalate"),
    }
    # The requester's outcome carries the buyer's typed result and governance's facts.
    ids = {
        msgspec.msgpack.decode(outcomes[w].value, type=Placed).po_id
        for w in ("wf-allowed", "wf-approved")
    }
    assert ids == {o.po_id for o in placed}
    assert sorted(o.workflow for o in placed) == ["wf-allowed", "wf-approved"]
    assert all(o.model_calls == 2 for o in outcomes.values())  # the draft and the plan
    assert outcomes["wf-allowed"].shown == {
        "tool": tool.name,
        "vendor": "Vendor_A",
        "amount_usd": 1_200.0,
    }
    assert m.hosts["procurement-1"].timers == {"fired": 4, "missed": 0}


async def test_expenses_are_decided_by_category_and_memo_whatever_the_amount(
    secure_nats, redis_server, prefix, tmp_path
) -> None:
    policy = (ROOT / "policies" / "expenses.yaml").read_text()
    async with mesh(
        secure_nats, redis_server, prefix, tmp_path, policy=policy, tools=[pay_expense]
    ) as m:
        await m.host(
            "expenses-1",
            "expenses.agents:Expenses",
            role="Expense-Agent",
            capabilities=(pay_expense.name,),
            budget_usd=1_000_000,
        )

        def claim(n: int, category: str, memo: str = "", **kw: object) -> Claim:
            return Claim(
                claim=f"c-{n}",
                employee="ana",
                category=category,
                amount_usd=30.0,
                memo=memo,
                **kw,
            )

        m.approve["wf-entertainment"] = False
        runs = {
            "wf-meals": claim(1, "meals", "client visit"),
            "wf-big-meals": msgspec.structs.replace(claim(2, "meals"), amount_usd=2_400.0),
            "wf-travel": claim(3, "travel"),
            "wf-entertainment": claim(4, "entertainment"),
            "wf-cash": claim(5, "travel", "Cash Advance for the trip"),
            "wf-gift": claim(6, "gift_cards"),
            "wf-pounds": claim(7, "meals", currency="GBP"),
        }
        got = await asyncio.gather(*(m.run(w, "expenses-1", c) for w, c in runs.items()))
        outcomes = dict(zip(runs, got, strict=True))
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            paid = await payments(client, m.dep.key_prefix)
        finally:
            await client.aclose()

    assert {w: (o.result, o.first_decision) for w, o in outcomes.items()} == {
        "wf-meals": ("completed", "allow"),
        "wf-big-meals": ("completed", "allow"),  # no rule is about the amount
        "wf-travel": ("completed", "escalate"),
        "wf-entertainment": ("rejected", "escalate"),
        "wf-cash": ("denied", "deny"),  # deny over escalate
        "wf-gift": ("denied", "deny"),
        "wf-pounds": ("denied", "deny"),
    }
    assert any("a cash advance is not an expense" in r for r in outcomes["wf-cash"].reasons)
    assert sorted(e.workflow for e in paid) == ["wf-big-meals", "wf-meals", "wf-travel"]
    ids = {msgspec.msgpack.decode(outcomes[e.workflow].value, type=Paid).payment_id for e in paid}
    assert ids == {e.id for e in paid}


def test_a_claims_workload_draws_every_kind_of_claim_the_policy_decides() -> None:
    claims = Claims(
        employees=["ana", "bo"],
        categories={"meals": 0.5, "travel": 0.3, "gift_cards": 0.2},
        memos={"": 0.8, "cash advance for the trip": 0.2},
        amount_usd={"min": 20, "max": 2500},
    )
    drawn = claims.starts(200, seed=1)

    assert drawn == claims.starts(200, seed=1)
    assert {c.category for c in drawn} == {"meals", "travel", "gift_cards"}
    assert {c.memo for c in drawn} == {"", "cash advance for the trip"}
    assert len({c.claim for c in drawn}) == 200
    assert all(20 <= c.amount_usd <= 2500 for c in drawn)


def test_call_tool_and_ask_are_typed_by_the_tools_and_the_answers_types(tmp_path) -> None:
    from mypy import api

    user = tmp_path / "user.py"
    user.write_text(
        "import govmesh\n"
        "from procurement.agents import Purchase\n"
        "from procurement.tools import Order, Placed, create_purchase_order\n"
        "\n"
        "class Agent(govmesh.Agent):\n"
        "    @govmesh.handler\n"
        "    async def go(self, wf: govmesh.Workflow, p: Purchase) -> str:\n"
        "        await wf.call_tool(create_purchase_order, p, step=1)\n"
        "        order = Order(item=p.item, vendor=p.vendor, amount_usd=p.amount_usd)\n"
        "        placed = await wf.call_tool(create_purchase_order, order, step=2)\n"
        "        asked = await wf.ask('buyer-1', p, returns=Placed)\n"
        "        return placed.po_id + asked.po_id\n"
        "\n"
        "    @govmesh.handler\n"
        "    async def wrong(self, wf: govmesh.Workflow, o: Order) -> int:\n"
        "        placed = await wf.call_tool(create_purchase_order, o, step=1)\n"
        "        return placed\n"
    )

    out, _, status = api.run(
        ["--strict", "--no-incremental", "--config-file", str(ROOT / "pyproject.toml"), str(user)]
    )

    errors = [line.split(": error: ")[1] for line in out.splitlines() if ": error: " in line]
    assert status == 1 and len(errors) == 2, out
    assert errors[0].startswith('Cannot infer value of type parameter "A" of "call_tool"')
    assert errors[1].startswith('Incompatible return value type (got "Placed", expected "int")')
