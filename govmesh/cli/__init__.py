"""The ``govmesh`` command: one module per command group.

Each module imports only click, rich and `govmesh.errors` at the top; the layers a command
needs are imported inside it, so ``govmesh --help`` and every command start fast.
"""

from govmesh.cli import (  # noqa: F401  (importing a command group registers it)
    _approvals,
    _audit,
    _bench,
    _forecast,
    _model,
    _nats,
    _policy,
    _run_chaos,
    _up,
    _watch,
)
from govmesh.cli._root import cli

__all__ = ["cli", "main"]


def main() -> None:
    """Entry point of the ``govmesh`` command."""
    cli()
