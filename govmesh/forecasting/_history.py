"""Recorded model usage, one line per agent role and workflow, kept for calibration.

The store is ``$GOVMESH_HOME/usage/<scenario>.jsonl`` (default ``~/.govmesh``): one JSON
object per line, appended to after each run, read back whole by `govmesh forecast`. The
directory is 0700 and the files 0600: usage says what a tenant ran and what it cost.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import msgspec

from govmesh.errors import ConfigError
from govmesh.forecasting.messages import RoleUsage
from govmesh.runtime._home import home_dir

__all__ = ["UsageHistory", "WorkflowUsage"]

_SCENARIO_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class WorkflowUsage(RoleUsage, frozen=True, kw_only=True):
    """One agent role's use of one model in one workflow: the budget actor's `RoleUsage`,
    with the run it belongs to.

    A call with ``error=True`` is an unusable answer the agent reflects on and retries, so
    ``calls - errors`` calls moved the work on and ``errors / calls`` is the error rate.

    Attributes:
        scenario: the scenario's name.
        run_id: the run the workflow belonged to.
        seed: the run's seed.
        workflow: the workflow id, unique within its run.
        role: the agent role, e.g. ``"Procurement-Agent-v2"``.
        model: the model the role called.
        calls: model calls, retries included.
        errors: calls whose answer was unusable.
        input_tokens: input tokens of all the calls.
        output_tokens: output tokens of all the calls.
        cost_usd: what the calls cost.
    """

    scenario: str
    run_id: str
    seed: int
    workflow: str

    def __post_init__(self) -> None:
        for name in ("calls", "errors", "input_tokens", "output_tokens"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"{name} cannot be negative: {value!r}")
        if self.errors > self.calls:
            raise ConfigError(f"errors {self.errors!r} exceed calls {self.calls!r}")
        if not math.isfinite(self.cost_usd) or self.cost_usd < 0:
            raise ConfigError(f"cost_usd must be a finite amount >= 0: {self.cost_usd!r}")
        # Prices are per token, so spend without tokens means a broken record.
        if self.cost_usd > 0 and self.tokens == 0:
            raise ConfigError(f"cost_usd {self.cost_usd!r} with no tokens")

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


_decoder: Final = msgspec.json.Decoder(WorkflowUsage)
_encoder: Final = msgspec.json.Encoder()


class UsageHistory:
    """Recorded usage per scenario under ``<root>/usage/`` (default: `home_dir`).

    Args:
        root: the govmesh home to use instead of ``$GOVMESH_HOME``.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.dir = (home_dir() if root is None else root) / "usage"

    def path(self, scenario: str) -> Path:
        """The file that holds the usage of ``scenario``.

        Raises:
            ConfigError: the name cannot be a file name (a path, empty, or too long).
        """
        if not _SCENARIO_NAME.fullmatch(scenario):
            raise ConfigError(
                f"scenario name {scenario!r} cannot name a usage file: use letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
        return self.dir / f"{scenario}.jsonl"

    def append(self, records: Iterable[WorkflowUsage]) -> int:
        """Add ``records`` to the files of their scenarios.

        Each scenario's lines go out in one write on a file opened for appending, so
        runs that finish at the same time do not interleave their lines.

        Returns:
            How many records were written.
        """
        by_scenario: dict[str, list[bytes]] = defaultdict(list)
        for record in records:
            by_scenario[record.scenario].append(_encoder.encode(record) + b"\n")
        if not by_scenario:
            return 0
        paths = {scenario: self.path(scenario) for scenario in by_scenario}
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        for scenario, lines in by_scenario.items():
            fd = os.open(paths[scenario], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as f:
                f.write(b"".join(lines))
        return sum(len(lines) for lines in by_scenario.values())

    def read(self, scenario: str) -> list[WorkflowUsage]:
        """Every record of ``scenario``, oldest first; empty when none was recorded.

        Raises:
            ConfigError: a line is not a valid record; the message names the file and line.
        """
        path = self.path(scenario)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read usage history: {exc.strerror}") from None
        records: list[WorkflowUsage] = []
        with f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = _decoder.decode(line)
                except msgspec.DecodeError as exc:
                    raise ConfigError(f"{path}:{number}: not a usage record: {exc}") from None
                if record.scenario != scenario:
                    raise ConfigError(
                        f"{path}:{number}: a record of scenario {record.scenario!r} in the "
                        f"file of {scenario!r}"
                    )
                records.append(record)
        return records
