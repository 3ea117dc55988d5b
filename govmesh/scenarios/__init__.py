"""Scenarios: apps and the scenario files that describe them, the swarm and the runner."""

from govmesh.scenarios._app import AgentDef, App, load_app, scenario_app
from govmesh.scenarios._plugins import installed_plugins
from govmesh.scenarios._runner import new_issuer, run_scenario, run_workflows
from govmesh.scenarios._schema import Scenario, load_scenario
from govmesh.scenarios._swarm import SimulatedApprover, Swarm

__all__ = [
    "AgentDef",
    "App",
    "Scenario",
    "SimulatedApprover",
    "Swarm",
    "installed_plugins",
    "load_app",
    "load_scenario",
    "new_issuer",
    "run_scenario",
    "run_workflows",
    "scenario_app",
]
