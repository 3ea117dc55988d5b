"""What governance must know of a tool to decide on calls of it, as the tool declares it."""

from __future__ import annotations

import msgspec

__all__ = ["ToolTerms"]


class ToolTerms(msgspec.Struct, frozen=True, kw_only=True):
    """A tool's declared terms, from its ``@tool(...)`` declaration.

    Attributes:
        name: the tool's name, as intents and calls name it.
        spend: the arguments that are money (US dollars). Only these count toward spending
            limits, approval thresholds and budget authority; a tool that declares none spends
            nothing, whatever its arguments are called.
        show: the arguments shown to people (approvals, watch, run reports, audit
            summaries); none shows every argument.
    """

    name: str
    spend: tuple[str, ...] = ()
    show: tuple[str, ...] = ()
