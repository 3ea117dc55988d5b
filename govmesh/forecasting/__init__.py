"""Cost: prices, model-spend reservations, the budget actor, forecasting."""

from govmesh.forecasting._atfm import (
    FORECAST_METHOD,
    P95_METHOD,
    AtfmParams,
    Calibration,
    Forecast,
    ForecastCheck,
    ParamErrors,
    RoleFit,
    ScenarioFit,
    WorkflowSample,
    calibrate,
    check_forecast,
    forecast,
    workflow_costs,
)
from govmesh.forecasting._budget import BudgetService
from govmesh.forecasting._history import UsageHistory, WorkflowUsage
from govmesh.forecasting._prices import Price, PriceTable
from govmesh.forecasting.messages import BudgetQuery, BudgetReport, Usage, WorkflowBurn
from govmesh.reservations import (
    INTERRUPT_TOOL,
    BudgetCaps,
    BudgetError,
    Granted,
    Refused,
    ReservationBook,
)

__all__ = [
    "FORECAST_METHOD",
    "INTERRUPT_TOOL",
    "P95_METHOD",
    "AtfmParams",
    "BudgetCaps",
    "BudgetError",
    "BudgetQuery",
    "BudgetReport",
    "BudgetService",
    "Calibration",
    "Forecast",
    "ForecastCheck",
    "Granted",
    "ParamErrors",
    "Price",
    "PriceTable",
    "Refused",
    "ReservationBook",
    "RoleFit",
    "ScenarioFit",
    "Usage",
    "UsageHistory",
    "WorkflowBurn",
    "WorkflowSample",
    "WorkflowUsage",
    "calibrate",
    "check_forecast",
    "forecast",
    "workflow_costs",
]
