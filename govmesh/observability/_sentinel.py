"""The sentinel: what the embedded nats-server refused, reported as security events.

A member that ignores what the server tells it (a raw client with a stolen certificate)
leaves its refused publishes and subscriptions only in the server's log. The sentinel
follows that log (`ServerLogReader`) and publishes each refusal on the tenant's
``security`` subject, naming the certificate the client presented and the member and role
it belongs to. A client hammering refused publishes gets one event at once and then one
per ``window_s`` that counts the rest, so it cannot flood the stream.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

# The bus's modules, not the package: the bus imports observability's metrics.
from govmesh.bus._bus import Bus
from govmesh.bus._envelope import SecurityEvent
from govmesh.config import Deployment
from govmesh.errors import ConfigError
from govmesh.identity import Identity
from govmesh.roles import SENTINEL_ROLE
from govmesh.runtime._nats_log import RefusalKind, ServerLogReader, ServerRefusal
from govmesh.runtime._transport import Transport
from govmesh.subjects import Subjects
from govmesh.telemetry._metrics import SECURITY_REJECTIONS

__all__ = ["REASONS", "SENTINEL_MEMBER", "Coalesced", "RefusalCoalescer", "ServerSentinel"]

log = logging.getLogger(__name__)

REASONS: Final[dict[RefusalKind, str]] = {
    "publish": "publish_violation",
    "subscribe": "subscribe_violation",
    "authentication": "authentication_failure",
    "tls": "tls_failure",
}
"""The security event reason of each kind of refusal."""
SENTINEL_MEMBER: Final = "nats-sentinel"
"""The member id a deployment's sentinel signs with."""
_WHAT: Final[dict[RefusalKind, str]] = {
    "publish": "a publish to",
    "subscribe": "a subscription to",
    "authentication": "a connection",
    "tls": "a TLS handshake",
}
_ORGANIZATION: Final = re.compile(r"(?:^|,)O=([^,]*)")
_EXAMPLES: Final = 5
"""Subjects a coalesced event names, at most."""


@dataclass
class _Pending:
    first: ServerRefusal
    since: float
    more: int = 0
    subjects: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Coalesced:
    """Refusals of one client and kind within one window, after the first was reported.

    Attributes:
        first: the refusal that opened the window (already reported).
        count: how many more came within the window.
        subjects: up to a few of the subjects they named.
    """

    first: ServerRefusal
    count: int
    subjects: tuple[str, ...]


class RefusalCoalescer:
    """Decides which refusals are reported at once and which are counted for later.

    Refusals are grouped by kind and identity (the certificate, else the client's address).
    The first of a group is reported at once; the rest of its window are counted and come
    out of `due` as one summary when the window ends. A group with nothing new in a whole
    window is forgotten. Beyond `max_groups` groups at once, further identities share one
    group per kind, so made-up identities cannot flood the stream either.

    Args:
        window_s: seconds a group collects refusals before its summary is due.
        max_groups: groups kept at once.
    """

    def __init__(self, *, window_s: float = 10.0, max_groups: int = 100) -> None:
        if window_s <= 0 or max_groups < 1:
            raise ConfigError(
                f"window_s must be positive and max_groups at least 1, got {window_s!r} "
                f"and {max_groups!r}"
            )
        self.window_s = window_s
        self.max_groups = max_groups
        self._groups: dict[tuple[str, str], _Pending] = {}

    def add(self, refusal: ServerRefusal, *, now: float) -> bool:
        """Take `refusal`; True when it is to be reported now, False when it was counted."""
        # By certificate, else by the client's host (its port changes with each attempt).
        host = refusal.client.split(" ", 1)[0].rsplit(":", 1)[0]
        key = (refusal.kind, refusal.user or host)
        if key not in self._groups and len(self._groups) >= self.max_groups:
            key = (refusal.kind, "*")
        pending = self._groups.get(key)
        if pending is None:
            self._groups[key] = _Pending(first=refusal, since=now)
            return True
        pending.more += 1
        if refusal.subject and len(pending.subjects) < _EXAMPLES:
            pending.subjects.add(refusal.subject)
        return False

    def due(self, *, now: float) -> list[Coalesced]:
        """The summaries of the windows that ended by `now`; each group starts a new one."""
        summaries = []
        for key, pending in list(self._groups.items()):
            if now - pending.since < self.window_s:
                continue
            if not pending.more:
                del self._groups[key]
                continue
            summaries.append(
                Coalesced(
                    first=pending.first,
                    count=pending.more,
                    subjects=tuple(sorted(pending.subjects)),
                )
            )
            self._groups[key] = _Pending(first=pending.first, since=now)
        return summaries


class ServerSentinel:
    """Follows the embedded nats-server's log and reports its refusals as security events.

    Signed by its own member, in the ``sentinel`` role, whose NATS permissions let it
    publish security events and renew its token, nothing else. It reports the refusals of
    its tenant's members and of certificates naming its tenant (``O=<tenant>``), and those
    it cannot tie to any tenant (a client with no certificate); every refusal counts in
    `refused` (by reason), which a run's report adds to its security rejections.

    Use `start`, then `close` (safe to call twice; cancels the follower).

    Args:
        deployment: where the bus is and whom to trust.
        identity: the sentinel's identity, role ``sentinel``, admitted by `transport`.
        transport: the deployment's transport; its embedded server's log is followed and
            its member registry names the members behind certificates.
        window_s: see `RefusalCoalescer`.
        poll_s: seconds between two reads of the log.

    Attributes:
        refused: refusals seen, by security event reason.
        events: security events published.
    """

    def __init__(
        self,
        deployment: Deployment,
        identity: Identity,
        *,
        transport: Transport,
        window_s: float = 10.0,
        poll_s: float = 0.2,
    ) -> None:
        if transport.server is None:
            raise ConfigError(
                "the sentinel reads an embedded nats-server's log; an external server's "
                "refusals are its operator's to watch (see docs/security.md)"
            )
        if identity.role != SENTINEL_ROLE:
            raise ConfigError(
                f"the sentinel signs as role {SENTINEL_ROLE!r}, not {identity.role!r}"
            )
        self.deployment = deployment
        self.identity = identity
        self.transport = transport
        self.subjects = Subjects(deployment.tenant)
        self.refused: Counter[str] = Counter()
        self.events = 0
        self._reader = ServerLogReader(transport.server.log_path)
        self._coalescer = RefusalCoalescer(window_s=window_s)
        self._poll_s = poll_s
        self._bus: Bus | None = None
        self._task: asyncio.Task[None] | None = None
        self._polling = asyncio.Lock()

    async def start(self) -> None:
        """Join the bus and follow the log from its current end."""
        self._bus = await Bus.connect(self.deployment, self.identity)
        self._task = asyncio.get_running_loop().create_task(
            self._follow(), name=f"sentinel-{self.subjects.tenant}"
        )

    def stats(self) -> dict[str, Any]:
        """Refusals by reason (``rejected``, as every service reports) and events sent."""
        return {
            "agent": self.identity.agent_id,
            "rejected": dict(self.refused),
            "events": self.events,
        }

    async def _follow(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self._poll_s)

    async def poll(self) -> None:
        """Read what the log holds now and publish what is due: the follower's one step,
        and what a caller runs to have everything logged so far counted (a run's report).
        """
        async with self._polling:  # one reader at a time: it keeps its place in the log
            refusals = await asyncio.to_thread(self._reader.read)
            now = time.monotonic()
            for refusal in refusals:
                if not self._ours(refusal):
                    continue
                reason = REASONS[refusal.kind]
                self.refused[reason] += 1
                SECURITY_REJECTIONS.add(1, {"govmesh.security.reason": reason})
                if self._coalescer.add(refusal, now=now):
                    await self._publish(refusal)
            for summary in self._coalescer.due(now=now):
                await self._publish(summary.first, summary)

    def _ours(self, refusal: ServerRefusal) -> bool:
        member = self.transport.member_of(refusal.user)
        if member is not None:
            return member.tenant == self.subjects.tenant
        organization = _ORGANIZATION.search(refusal.user)
        return organization is None or organization[1] == self.subjects.tenant

    async def _publish(self, refusal: ServerRefusal, summary: Coalesced | None = None) -> None:
        member = self.transport.member_of(refusal.user)
        if member is not None:
            who = (
                f"certificate {refusal.user!r} (member {member.member_id!r}, role {member.role!r})"
            )
        elif refusal.user:
            unverified = "unverified " if refusal.kind == "tls" else ""
            who = f"{unverified}certificate {refusal.user!r} (no admitted member)"
        else:
            who = "a client that named no certificate"
        subject = f" {refusal.subject!r}" if refusal.subject else ""
        detail = f"nats-server refused {_WHAT[refusal.kind]}{subject} by {who} at {refusal.client}"
        if summary is not None:
            also = f" (e.g. {', '.join(map(repr, summary.subjects))})" if summary.subjects else ""
            detail += f"; {summary.count} more like it within {self._coalescer.window_s:g} s{also}"
        elif refusal.kind == "tls":
            detail += f": {refusal.detail}"
        event = SecurityEvent(
            reason=REASONS[refusal.kind],
            subject=refusal.subject,
            claimed_sender=member.member_id if member is not None else refusal.user,
            receiver=self.identity.agent_id,
            detail=detail[:500],
        )
        log.warning("%s", detail)
        if self._bus is None:
            return
        try:
            await self._bus.publish(self.subjects.security, event)
        except Exception as exc:  # a failing report must never stop the sentinel
            log.error("could not publish security event %s: %s", event.reason, exc)
            return
        self.events += 1

    async def close(self) -> None:
        """Stop following the log and leave the bus. Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.close()

    async def __aenter__(self) -> ServerSentinel:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
