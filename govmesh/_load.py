"""Find user code by name: ``package.module:attribute``, as scenario files and
``govmesh run --app`` name agents, tools and apps."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any

from govmesh.errors import ConfigError

__all__ = ["load_object"]


def load_object(path: str, *, search_path: Iterable[str] = (), what: str = "object") -> Any:
    """The object that ``path`` (``package.module:attribute``, the attribute may be dotted)
    names, importing its module; ``search_path`` folders are put on ``sys.path`` first.

    Raises:
        ConfigError: ``path`` is malformed, its module does not import, or it has no such
            attribute; the message quotes ``path`` and says which.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{what} {path!r} must be 'package.module:name'")
    for folder in search_path:
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{what} {path!r}: module {module_name!r} does not import: {exc}"
        ) from None
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ConfigError(f"{what} {path!r}: {module_name!r} has no {attribute!r}") from None
    return found
