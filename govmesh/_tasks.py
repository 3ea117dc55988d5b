"""Stopping background loops for sure, whatever a client library does with a cancellation.

Kept apart from `govmesh.service` so that any module can use it without importing the bus
and Ray.
"""

from __future__ import annotations

import asyncio

__all__ = ["being_cancelled", "raise_if_cancelled"]


def being_cancelled() -> bool:
    """Whether the running task has been asked to stop.

    Background loops that survive Redis or NATS errors check it in their error handler:
    a client library may turn a cancellation that lands mid-command into its own error, and
    a loop that swallows that would never stop.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_cancelled() -> None:
    """Raise `asyncio.CancelledError` if the running task has been asked to stop.

    Background loops call it once a turn, because a cancellation can also vanish inside a
    client library: on Python 3.11, `asyncio.wait_for` returns the awaited result instead
    of raising when the cancellation lands just as that result arrives, and redis-py sends
    every command through it (its ``socket_timeout``). The command then returns normally,
    the loop's next sleep is no longer cancelled, and the loop would run forever.
    """
    if being_cancelled():
        raise asyncio.CancelledError
