"""Expense claims on govmesh's public API: an agent checks each claim with a model and pays
it from the ledger, under a policy that escalates travel and entertainment to a manager and
denies cash advances, whatever the amount."""
