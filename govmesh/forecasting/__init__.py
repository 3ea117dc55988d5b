"""Cost: prices, the budget actor, forecasting."""

from govmesh.forecasting._budget import BudgetService
from govmesh.forecasting._prices import Price, PriceTable
from govmesh.forecasting.messages import BudgetQuery, BudgetReport, Usage

__all__ = ["BudgetQuery", "BudgetReport", "BudgetService", "Price", "PriceTable", "Usage"]
