"""Scenarios: the scenario file schema, the swarm and the runner."""

from govmesh.scenarios._runner import draw_workflows, new_issuer, run_scenario, run_workflows
from govmesh.scenarios._schema import Scenario, load_scenario
from govmesh.scenarios._swarm import SimulatedApprover, Swarm

__all__ = [
    "Scenario",
    "SimulatedApprover",
    "Swarm",
    "draw_workflows",
    "load_scenario",
    "new_issuer",
    "run_scenario",
    "run_workflows",
]
