"""The scenario file: who the agents are, how the simulated model behaves, what is bought."""

from __future__ import annotations

from pathlib import Path

import msgspec

from govmesh.config import read_yaml_mapping
from govmesh.errors import ConfigError, ScenarioError
from govmesh.forecasting import BudgetCaps, Price
from govmesh.forecasting._prices import load_price_file
from govmesh.llm import SimulatedModelSettings

__all__ = ["AgentSpec", "Scenario", "load_scenario"]


class AgentSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One agent of the swarm."""

    id: str
    role: str
    capabilities: tuple[str, ...] = ()
    budget_usd: float = 0.0


class Agents(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The scenario's agents by job."""

    requester: AgentSpec
    procurement: AgentSpec


class AmountRange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Purchase amounts, drawn uniformly."""

    min: float
    max: float


class Purchases(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the requesters ask to buy."""

    items: tuple[str, ...]
    vendors: dict[str, float]
    amount_usd: AmountRange


class Approvals(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The simulated approver standing in for a human operator."""

    approve_probability: float = 0.7
    delay_ms: float = 10.0
    by: str = "sim-approver"


class VendorReply(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How long each workflow waits for the vendor's quote before it asks governance, in
    hours on the scenario's clock (a durable timer; 0: no wait)."""

    wait_hours: float = 0.0


class ClockSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The scenario's workflow clock: ``speed`` simulated seconds per real second (1: real
    time). Timers and waits run on it; security checks always use real time."""

    speed: float = 1.0


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A whole scenario file; paths in it are relative to the file."""

    name: str
    description: str = ""
    tenant: str = "acme"
    policies: tuple[str, ...]
    path: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    model: SimulatedModelSettings
    prices: dict[str, Price]
    agents: Agents
    purchases: Purchases
    approvals: Approvals = Approvals()
    vendor_reply: VendorReply = VendorReply()
    clock: ClockSpec = ClockSpec()
    budget: BudgetCaps | None = None
    max_reflections: int = 40
    keep_thoughts: bool = False
    source: str = ""

    def policy_paths(self) -> list[str]:
        """Policy files, resolved against the scenario file's folder."""
        base = Path(self.source).parent
        return [str((base / p).resolve()) for p in self.policies]

    def search_path(self) -> list[str]:
        """Folders of user code (``path``), resolved against the scenario file's folder."""
        base = Path(self.source).parent
        return [str((base / p).resolve()) for p in self.path]


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario file.

    Raises:
        ScenarioError: naming the file and the field path of anything wrong.
    """
    path = Path(path)
    data = read_yaml_mapping(path, what="scenario", error=ScenarioError)
    prices = data.get("prices")
    if isinstance(prices, str):
        # A price table file, named relative to the scenario.
        try:
            data = {**data, "prices": msgspec.to_builtins(load_price_file(path.parent / prices))}
        except ConfigError as exc:
            raise ScenarioError(f"{path}: prices: {exc}") from None
    try:
        scenario = msgspec.convert({**data, "source": str(path)}, Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    _check(scenario, path)
    return scenario


def _check(s: Scenario, path: Path) -> None:
    if s.model.name not in s.prices:
        raise ScenarioError(
            f"{path}: model {s.model.name!r} has no entry under prices; a model is never free"
        )
    if not s.purchases.items:
        raise ScenarioError(f"{path}: purchases.items is empty")
    if not s.purchases.vendors or any(w < 0 for w in s.purchases.vendors.values()):
        raise ScenarioError(f"{path}: purchases.vendors needs non-negative weights")
    if not 0 < s.purchases.amount_usd.min <= s.purchases.amount_usd.max:
        raise ScenarioError(
            f"{path}: purchases.amount_usd needs 0 < min <= max, got {s.purchases.amount_usd!r}"
        )
    if not 0 <= s.approvals.approve_probability <= 1:
        raise ScenarioError(
            f"{path}: approvals.approve_probability must be in [0, 1], "
            f"got {s.approvals.approve_probability!r}"
        )
    if not s.vendor_reply.wait_hours >= 0:
        raise ScenarioError(
            f"{path}: vendor_reply.wait_hours must be 0 or more, got {s.vendor_reply.wait_hours!r}"
        )
    if not s.clock.speed > 0:
        raise ScenarioError(f"{path}: clock.speed must be positive, got {s.clock.speed!r}")
    for policy in s.policy_paths():
        if not Path(policy).is_file():
            raise ScenarioError(f"{path}: policy file not found: {policy!r}")
