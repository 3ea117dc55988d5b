"""``python -m govmesh.cli``: the ``govmesh`` command."""

from govmesh.cli import main

main()
