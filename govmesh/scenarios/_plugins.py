"""Agents and tools that installed packages add through the ``govmesh.plugins`` entry point
group, so scenario files and apps can name them without a module path.

A package declares, in its ``pyproject.toml``::

    [project.entry-points."govmesh.plugins"]
    negotiation = "negotiation.plugin:plugin"

where ``plugin`` is any object with ``agents`` (agent classes) and ``tools`` (``@tool``
declarations), a module or a `govmesh.App` for instance. Its agents are then named
``negotiation.Negotiator`` (the entry point's name, a dot, the class's name) and its tools
by their own names (``crm.lookup``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from govmesh._load import load_object
from govmesh.agents._sdk import Agent
from govmesh.errors import ConfigError
from govmesh.tools._spec import ToolSpec

__all__ = [
    "GROUP",
    "Plugins",
    "installed_plugins",
    "load_agent",
    "load_tool",
    "main_module",
    "path_of",
]

GROUP: Final = "govmesh.plugins"
"""The entry point group through which installed packages add agents and tools."""


@dataclass(frozen=True)
class Plugins:
    """What installed plugins add.

    Attributes:
        agents: agent classes by name (``<plugin>.<Class>``).
        tools: tools by name.
        origin: which plugin gave each name, for error messages.
    """

    agents: Mapping[str, type[Agent]]
    tools: Mapping[str, ToolSpec[Any, Any]]
    origin: Mapping[str, str]


@functools.cache
def installed_plugins() -> Plugins:
    """Every plugin of the ``govmesh.plugins`` group, loaded once per process.

    Raises:
        ConfigError: a plugin does not load, gives something that is not an agent class or
            a tool, or gives a name another plugin gives too; the message names the plugin.
    """
    agents: dict[str, type[Agent]] = {}
    tools: dict[str, ToolSpec[Any, Any]] = {}
    origin: dict[str, str] = {}
    for entry in importlib.metadata.entry_points(group=GROUP):
        where = f"plugin {entry.name!r} ({entry.value})"
        try:
            plugin = entry.load()
        except Exception as exc:  # a plugin's own import error, whatever it is
            raise ConfigError(f"{where} does not load: {exc!r}") from None
        for cls in getattr(plugin, "agents", ()):
            if not (isinstance(cls, type) and issubclass(cls, Agent)):
                raise ConfigError(f"{where}: agents holds {cls!r}, not a govmesh.Agent class")
            _add(agents, origin, f"{entry.name}.{cls.__name__}", cls, where)
        for spec in getattr(plugin, "tools", ()):
            if not isinstance(spec, ToolSpec):
                raise ConfigError(f"{where}: tools holds {spec!r}, not a @govmesh.tool")
            _add(tools, origin, spec.name, spec, where)
    return Plugins(agents=agents, tools=tools, origin=origin)


def _add(into: dict[str, Any], origin: dict[str, str], name: str, value: Any, where: str) -> None:
    if name in into and into[name] is not value:
        raise ConfigError(f"{where} gives {name!r}, which {origin[name]} gives too")
    into[name] = value
    origin[name] = where


def load_agent(ref: str, *, search_path: Iterable[str] = ()) -> type[Agent]:
    """The agent class ``ref`` names: ``package.module:Class``, or a plugin's agent name.

    Raises:
        ConfigError: no such class, or not a `govmesh.Agent`; the message quotes ``ref``.
    """
    found = _named(ref, installed_plugins().agents, "agent class", search_path)
    if not (isinstance(found, type) and issubclass(found, Agent)):
        raise ConfigError(f"{ref!r} is {found!r}, not a govmesh.Agent class")
    return found


def load_tool(ref: str, *, search_path: Iterable[str] = ()) -> ToolSpec[Any, Any]:
    """The tool ``ref`` names: ``package.module:tool``, or a plugin's tool name.

    Raises:
        ConfigError: no such tool, or not a ``@govmesh.tool``; the message quotes ``ref``.
    """
    found = _named(ref, installed_plugins().tools, "tool", search_path)
    if not isinstance(found, ToolSpec):
        raise ConfigError(f"{ref!r} is {found!r}, not a @govmesh.tool")
    return found


def _named(ref: str, known: Mapping[str, Any], what: str, search_path: Iterable[str]) -> Any:
    """What ``ref`` names: a path (it has a colon), else a name a plugin gives."""
    if ":" in ref:
        return load_object(ref, search_path=search_path, what=what)
    if ref not in known:
        raise ConfigError(
            f"no installed plugin gives a {what} {ref!r} (they give {sorted(known)!r}); "
            f"name it by path, as 'package.module:name'"
        )
    return known[ref]


def main_module() -> tuple[str, Path] | None:
    """The name under which another process imports what this process runs as
    ``__main__``, and the folder it imports it from: the script's file name and folder
    (``python claims.py``), or the module's name and the working directory
    (``python -m mypkg.claims``); None in an interactive session."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return spec.name, Path.cwd()
    found = getattr(main, "__file__", None)
    if not found:
        return None
    script = Path(found).resolve()
    return script.stem, script.parent


def path_of(obj: Any) -> str | None:
    """``package.module:name`` under which another process imports ``obj`` (a class, or a
    tool declared at module level), or None if no module names it (an interactive
    session's). What a script defines is named as `main_module` says, and imported again
    by that name: a script runs its app under ``if __name__ == "__main__":``, as one
    using `multiprocessing` does.
    """
    module_name = obj.run.__module__ if isinstance(obj, ToolSpec) else obj.__module__
    module = sys.modules.get(module_name)
    if module is None:
        return None
    if module_name == "__main__":
        main = main_module()
        if main is None:
            return None
        module_name = main[0]
    qualname = getattr(obj, "__qualname__", None)
    if qualname is not None:
        found: Any = module
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is obj:
            return f"{module_name}:{qualname}"
    for name, value in vars(module).items():
        if value is obj:
            return f"{module_name}:{name}"
    return None
