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
    """Checks expense claims with the model and pays them from the ledger.

    Args:
        payment_run_hours: claims are paid at the next payment run, this many hours on,
            on the deployment's clock (a durable timer); 0 pays at once.
    """

    role = "Expense-Agent"
    tools = (pay_expense,)

    def __init__(self, *, payment_run_hours: float = 0.0) -> None:
        self.payment_run_hours = payment_run_hours

    @govmesh.handler
    async def review(self, wf: govmesh.Workflow, claim: Claim) -> Paid:
        """Check the claim, then pay it under the policy's decision."""
        await wf.think(
            f"Check the {claim.category} claim {claim.claim} of {claim.employee} for "
            f"{claim.amount_usd:,.2f} {claim.currency}: {claim.memo!r}",
            key="check",
        )
        if self.payment_run_hours:
            await wf.sleep("payment-run", self.payment_run_hours * 3600)
        payment = Payment(
            claim=claim.claim,
            employee=claim.employee,
            category=claim.category,
            amount_usd=claim.amount_usd,
            currency=claim.currency,
            memo=claim.memo,
        )
        return await wf.call_tool(pay_expense, payment, step=1)
