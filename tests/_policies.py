"""Policy texts that several test modules decide under."""

from __future__ import annotations

EXPENSES = """\
policy:
  agent: Expense-Agent
  allowed_tools: [ledger.pay_expense]
  allowed_values:
    currency: [USD, EUR]
  denied_values:
    category: [gift_cards]
  escalate_if:
    - {arg: category, in: [travel, entertainment], reason: travel and entertainment need a manager}
    - {arg: amount_usd, over: 1000}
  deny_if:
    - {arg: memo, matches: "(?i)cash advance"}
"""
"""A non-monetary policy with every kind of rule on arguments, in the syntax of the
expense example."""
