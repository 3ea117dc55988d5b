"""The expense agent."""

from __future__ import annotations

import msgspec

import govmesh

from expenses.tools import Paid, Payment, pay_expense

__all__ = ["Claim", "Expenses"]


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """An expense claim: what starts an expenses workflow."""

    claim: str
    employee: str
    category: str
    amount_usd: float
    currency: str = "USD"
    memo: str = ""


class Expenses(govmesh.Agent):
    """Checks expense claims with the model and pays them from the ledger."""

    role = "Expense-Agent"
    tools = (pay_expense,)

    @govmesh.handler
    async def review(self, wf: govmesh.Workflow, claim: Claim) -> Paid:
        """Check the claim, then pay it under the policy's decision."""
        await wf.think(
            f"Check the {claim.category} claim {claim.claim} of {claim.employee} for "
            f"{claim.amount_usd:,.2f} {claim.currency}: {claim.memo!r}",
            key="check",
        )
        payment = Payment(
            claim=claim.claim,
            employee=claim.employee,
            category=claim.category,
            amount_usd=claim.amount_usd,
            currency=claim.currency,
            memo=claim.memo,
        )
        return await wf.call_tool(pay_expense, payment, step=1)
