"""Cost: prices, model-spend reservations, the budget actor, forecasting."""

from govmesh.forecasting._budget import BudgetService
from govmesh.forecasting._prices import Price, PriceTable
from govmesh.forecasting._reservations import (
    INTERRUPT_TOOL,
    BudgetCaps,
    Granted,
    Refused,
    ReservationBook,
)
from govmesh.forecasting.messages import BudgetQuery, BudgetReport, Usage, WorkflowBurn

__all__ = [
    "INTERRUPT_TOOL",
    "BudgetCaps",
    "BudgetQuery",
    "BudgetReport",
    "BudgetService",
    "Granted",
    "Price",
    "PriceTable",
    "Refused",
    "ReservationBook",
    "Usage",
    "WorkflowBurn",
]
