"""`govmesh.App` as a user writes one: a script with its own agent, tool and policy, run
with ``app.run()`` on embedded services, its classes sent to the actors by value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = '''
import json
import sys
from pathlib import Path

import msgspec

import govmesh


class Claim(msgspec.Struct, frozen=True):
    employee: str
    category: str
    amount_usd: float


class Paid(msgspec.Struct, frozen=True):
    payment_id: str


@govmesh.tool(name="ledger.pay", idempotent=True, spend="amount_usd", show=("category",))
async def pay(claim: Claim, ctx: govmesh.ToolContext) -> Paid:
    """Pay an expense claim."""
    return Paid(payment_id=f"pay-{ctx.workflow}")


class Expenses(govmesh.Agent):
    """Checks a claim with the model, then pays it under the policy's decision."""

    role = "Expense-Agent"
    tools = (pay,)

    @govmesh.handler
    async def review(self, wf: govmesh.Workflow, claim: Claim) -> Paid:
        await wf.think(f"Is this claim in order? {claim}")
        return await wf.call_tool(pay, claim, step=1)


POLICY = """
policy:
  agent: Expense-Agent
  allowed_tools: [ledger.pay]
  deny_if:
    - {arg: category, in: [gift_cards], reason: no gift cards}
"""

if __name__ == "__main__":
    Path("policy.yaml").write_text(POLICY)
    app = govmesh.App(
        "claims",
        # What governance may let it pay in a day; none by default.
        agents=[govmesh.AgentDef(agent=Expenses, budget_usd=1000)],
        tools=[pay],
        policies=["policy.yaml"],
        prices={"simulated-small": {"input_per_1k": 0.003, "output_per_1k": 0.015}},
        workload=[
            Claim(employee="ana", category="meals", amount_usd=42.0),
            Claim(employee="bo", category="gift_cards", amount_usd=90.0),
        ],
    )
    report = app.run(workflows=4)
    Path(sys.argv[1]).write_text(json.dumps(report))
'''


def test_an_app_in_a_script_runs_its_own_classes_on_embedded_services(tmp_path: Path) -> None:
    script, out = tmp_path / "claims.py", tmp_path / "report.json"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOVMESH_", "RAY_"))}
    env["GOVMESH_HOME"] = str(tmp_path / "home")
    ran = subprocess.run(
        [sys.executable, str(script), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["scenario"] == "claims"
    assert report["agents"] == {
        "expenses-1": {
            "class": "Expenses",
            "role": "Expense-Agent",
            "entry": True,
            "model": {"name": "simulated-small", "simulated": True},
        }
    }
    assert report["workflows"] == {
        "total": 4,
        "finished": 4,
        "results": {"completed": 2, "denied": 2},
    }
    assert (report["decisions"]["allow"], report["decisions"]["deny"]) == (2, 2)
    assert report["calls"]["ledger.pay"]["shown"] == {
        "category": {"values": {"meals": 2, "gift_cards": 2}}
    }
