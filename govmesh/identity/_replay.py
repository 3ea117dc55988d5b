"""A nonce cache bounded by the freshness window, so replays inside the window are caught."""

from __future__ import annotations

from collections import deque

__all__ = ["NonceCache"]


class NonceCache:
    """Remembers nonces seen within ``window_s`` seconds.

    A message older than the window is refused for staleness before the cache is consulted,
    so forgetting nonces older than the window never lets a replay through.
    """

    def __init__(self, *, window_s: float) -> None:
        self._window_s = window_s
        self._seen: set[bytes] = set()
        self._order: deque[tuple[float, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, nonce: bytes, *, ts: float, now: float) -> bool:
        """Record ``nonce``; return False when it was already seen (a replay)."""
        horizon = now - self._window_s
        while self._order and self._order[0][0] < horizon:
            self._seen.discard(self._order.popleft()[1])
        if nonce in self._seen:
            return False
        self._seen.add(nonce)
        # Keep the nonce until a message carrying ``ts`` could no longer pass the freshness
        # check; a timestamp slightly in the future (clock skew) extends that.
        self._order.append((max(ts, now), nonce))
        return True
