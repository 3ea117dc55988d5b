"""What nats-server refused, read from its log: forbidden publishes and subscriptions,
certificates that map to no user, and failed TLS handshakes.

nats-server refuses these itself and tells only the offending client (which a compromised
member ignores) and its log. Lines look like this (Go-quoted strings, so a client-chosen
name or subject cannot fake the parts around it)::

    [7] 2026/12/07 06:49:02.794571 [ERR] 127.0.0.1:58582 - cid:6 - "v2.16.0:python3:x"
        - "$G/user:CN=alice,OU=agent,O=acme" - Publish Violation - Subject "gm.acme.intent.bob"
    [7] ... [ERR] 127.0.0.1:58582 - cid:6 - ... - Subscription Violation - Subject "s", SID 1
    [7] ... [DBG] 127.0.0.1:58594 - cid:7 - User in cert ["CN=stranger,OU=agent,O=acme"],
        not found
    [7] ... [ERR] 127.0.0.1:58594 - cid:7 - authentication error
    [7] ... [ERR] 127.0.0.1:58606 - cid:8 - TLS handshake error: tls: failed to verify
        certificate: x509: certificate signed by unknown authority (CN=a,OU=b,O=c SHA-256: ..)

The certificate of a connection refused for want of a user is named only at debug level,
which the embedded server's configuration turns on (see `render_nats_config`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final, Literal

import msgspec

__all__ = ["RefusalKind", "ServerLogReader", "ServerRefusal", "parse_refusal_line"]

RefusalKind = Literal["publish", "subscribe", "authentication", "tls"]

_QUOTED: Final = r'"(?:[^"\\]|\\.)*"'
_LINE: Final = re.compile(
    r"^\[\d+\] \S+ \S+ \[(?P<level>ERR|DBG)\] (?P<address>\S+) - cid:(?P<cid>\d+)"
    rf"(?P<quoted>(?: - {_QUOTED})*) - (?P<message>.*)$"
)
_VIOLATION: Final = re.compile(
    rf"^(?P<kind>Publish|Subscription) Violation - Subject (?P<subject>{_QUOTED})"
    rf"(?:, Queue: {_QUOTED})?(?:, SID \S+)?$"
)
_UNMAPPED: Final = re.compile(rf"^User in cert \[(?P<dn>{_QUOTED})\], not found$")
_AUTHENTICATION: Final = "authentication error"
_TLS: Final = "TLS handshake error: "
_TLS_PEER: Final = re.compile(r"\((?P<dn>[A-Za-z]+=[^()]*?) SHA-256: [0-9a-fA-F]+\)$")
_PROBES: Final = ("EOF", "connection reset by peer")
"""Ends of handshakes cut off before any certificate: port probes (our own readiness
check among them)."""
_USER: Final = "/user:"
_MAX_READ: Final = 4 << 20
"""Bytes of log read at once: a flood of refusals is taken in bounded steps."""
_MAX_PENDING: Final = 1024
"""Connections whose unmapped certificate waits for its "authentication error" line."""


class ServerRefusal(msgspec.Struct, frozen=True, kw_only=True):
    """One thing nats-server refused a client.

    Attributes:
        kind: a forbidden ``publish`` or ``subscribe``, a certificate mapping to no user
            (``authentication``), or a failed ``tls`` handshake.
        user: the certificate subject DN the server mapped or read ("" when none); for
            ``tls`` the DN the client presented, unverified.
        subject: the refused subject (publish, subscribe), else "".
        client: the connection, ``<address> - cid:<n>``.
        detail: the log message.
    """

    kind: RefusalKind
    user: str
    subject: str
    client: str
    detail: str


def _unquote(quoted: str) -> str:
    # Go's %q: only quote and backslash matter here; other escapes are kept as written.
    return re.sub(r"\\(.)", lambda m: m[1] if m[1] in '"\\' else m[0], quoted[1:-1])


def parse_refusal_line(line: str, unmapped: dict[str, str]) -> ServerRefusal | None:
    """The refusal one log line records, if any.

    Args:
        line: one line of the log, without its line break.
        unmapped: certificates that mapped to no user, by connection: filled from debug
            lines and taken out when that connection's authentication error comes.
    """
    found = _LINE.match(line)
    if found is None:
        return None
    client = f"{found['address']} - cid:{found['cid']}"
    message = found["message"]
    if found["level"] == "DBG":
        dn = _UNMAPPED.match(message)
        if dn is not None and len(unmapped) < _MAX_PENDING:
            unmapped.setdefault(client, _unquote(dn["dn"]))
        return None
    if (violation := _VIOLATION.match(message)) is not None:
        quoted = re.findall(_QUOTED, found["quoted"])
        who = _unquote(quoted[-1]) if quoted else ""
        user = who.split(_USER, 1)[1] if _USER in who else ""
        kind: RefusalKind = "publish" if violation["kind"] == "Publish" else "subscribe"
        subject = _unquote(violation["subject"])
        return ServerRefusal(kind=kind, user=user, subject=subject, client=client, detail=message)
    if message == _AUTHENTICATION:
        user = unmapped.pop(client, "")
        return ServerRefusal(
            kind="authentication", user=user, subject="", client=client, detail=message
        )
    if message.startswith(_TLS):
        reason = message.removeprefix(_TLS)
        if reason.endswith(_PROBES):
            return None
        peer = _TLS_PEER.search(reason)
        user = peer["dn"] if peer is not None else ""
        return ServerRefusal(kind="tls", user=user, subject="", client=client, detail=message)
    return None


class ServerLogReader:
    """Reads the refusals nats-server writes to its log file from now on.

    Call `read` as often as wanted; each call returns what was written since the last one
    (whole lines only, at most a few MiB of log at once; the rest comes with the next
    call). A log that shrank (replaced) is read again from its start.

    Args:
        path: the server's log file; it need not exist yet.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = path.stat().st_size if path.exists() else 0
        self._unmapped: dict[str, str] = {}

    def read(self) -> list[ServerRefusal]:
        """The refusals logged since the last call."""
        try:
            with self.path.open("rb") as f:
                size = f.seek(0, 2)
                if size < self._offset:
                    self._offset = 0
                f.seek(self._offset)
                data = f.read(min(size - self._offset, _MAX_READ))
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        # A chunk without any line break is no log line of nats-server's: skip it.
        self._offset += end or (len(data) if len(data) == _MAX_READ else 0)
        refusals = []
        for line in data[:end].decode(errors="replace").splitlines():
            refusal = parse_refusal_line(line, self._unmapped)
            if refusal is not None:
                refusals.append(refusal)
        return refusals
