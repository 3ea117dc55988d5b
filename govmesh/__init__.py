"""govmesh: governed multi-agent workflow automation.

The public API: what user code (agents, tools, workflows) imports.
"""

from govmesh.errors import GovmeshError, ToolError

__all__ = ["GovmeshError", "ToolError"]
