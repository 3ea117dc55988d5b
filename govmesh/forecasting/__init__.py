"""Cost: prices, the budget actor, forecasting."""

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
from govmesh.forecasting.messages import BudgetQuery, BudgetReport, Usage

__all__ = [
    "FORECAST_METHOD",
    "P95_METHOD",
    "AtfmParams",
    "BudgetQuery",
    "BudgetReport",
    "BudgetService",
    "Calibration",
    "Forecast",
    "ForecastCheck",
    "ParamErrors",
    "Price",
    "PriceTable",
    "RoleFit",
    "ScenarioFit",
    "Usage",
    "UsageHistory",
    "WorkflowSample",
    "WorkflowUsage",
    "calibrate",
    "check_forecast",
    "forecast",
    "workflow_costs",
]
