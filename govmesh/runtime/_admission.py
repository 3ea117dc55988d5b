"""Admission: processes of this machine join a mutual-TLS bus that another process serves.

``govmesh up`` runs the embedded nats-server with mutual TLS, and its deployment CA's key
stays in its memory. A process that joins it (``govmesh run`` with ``GOVMESH_NATS_URL``
and ``GOVMESH_NATS_ADMISSION``) runs members of its own (governance, the gateway, the
agents, the operator tools it enrols) and needs, for each, a user on that server with its
role's permissions and a client certificate for the TLS key the member made itself. It asks
`AdmissionServer`, a Unix socket the serving process keeps beside its other files, for
both: `admitted_transport` is a `Transport` whose CA signs and whose members are registered
over that socket. Nothing that can mint a certificate is ever written down: the CA key
stays in the serving process, each member's key in the process that made it, and the
socket only answers while the server runs, to the user that runs it (as `EnrolmentServer`
does, see there why a socket rather than a secret in a file).

One JSON line in, one JSON line out, a connection each; the calls block the caller for
the milliseconds a local socket and a server reload take, as `Transport.register` does for
an embedded server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Final

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from govmesh.errors import ConfigError, GovmeshError
from govmesh.identity import DeploymentCA
from govmesh.identity._ca import (
    CERT_ORGANIZATION,
    DEFAULT_CLIENT_TTL,
    _key_pem,
    signing_request,
)
from govmesh.identity._enrol import MAX_REQUEST_BYTES
from govmesh.identity._unix import UnixSocketServer, peer_uid, reply_and_close
from govmesh.runtime._transport import Member, Transport

__all__ = ["ENV_NATS_ADMISSION", "AdmissionServer", "AdmittedCA", "admitted_transport"]

log = logging.getLogger(__name__)

ENV_NATS_ADMISSION: Final = "GOVMESH_NATS_ADMISSION"
"""The admission socket of the process that serves the bus (``govmesh up`` prints it)."""
_MAX_REPLY_BYTES: Final = 65536
_TIMEOUT_S: Final = 10.0


class CaQuery(msgspec.Struct, frozen=True, tag="ca"):
    """Asks for the deployment CA's certificate."""


class Register(msgspec.Struct, frozen=True, kw_only=True, tag="register"):
    """Asks for a user on the server for each member, with its role's permissions."""

    members: list[Member]


class Sign(msgspec.Struct, frozen=True, kw_only=True, tag="sign"):
    """Asks for a client certificate for a registered member's own TLS key."""

    csr_pem: bytes
    member_id: str
    role: str
    tenant: str
    ttl_s: float


class Renew(msgspec.Struct, frozen=True, kw_only=True, tag="renew"):
    """Asks for a fresh certificate for the member and key of one this CA issued."""

    cert_pem: bytes
    member_id: str
    ttl_s: float


class Answer(msgspec.Struct, frozen=True, kw_only=True, tag="answer"):
    """What was asked for: a PEM certificate (the CA's, or a member's), or nothing."""

    pem: bytes = b""


class Refused(msgspec.Struct, frozen=True, kw_only=True, tag="refused"):
    """Why a request was refused."""

    error: str


_Request = CaQuery | Register | Sign | Renew
_REQUEST: Final = msgspec.json.Decoder(_Request)
_REPLY: Final = msgspec.json.Decoder(Answer | Refused)


class AdmissionServer(UnixSocketServer):
    """Registers members and signs their certificates for processes of this user, on a
    Unix socket; the serving process's `Transport` (with its CA key) does the work.

    A certificate is signed only for a member registered with that role and tenant; a
    member registered already with another role is refused (`Transport.register`). See
    `UnixSocketServer` for the socket's life.

    Args:
        path: where to serve the socket (in a directory only this user may enter).
        transport: the embedded server's transport.

    Attributes:
        answered: requests answered, by kind.
        refused: requests refused, by kind.
    """

    def __init__(self, path: Path, transport: Transport) -> None:
        super().__init__(path, limit=MAX_REQUEST_BYTES)
        self._transport = transport
        self.answered: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply: Answer | Refused
        kind = "unreadable"
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), _TIMEOUT_S)
            uid = peer_uid(writer)
            if uid is not None and uid != os.getuid():
                raise ConfigError(
                    f"admission is only for uid {os.getuid()}, the user that runs the bus; "
                    f"this client runs as uid {uid}"
                )
            request = _REQUEST.decode(line)
            kind = type(request).__name__
            reply = Answer(pem=self._answer(request))
            self.answered[kind] += 1
        except (GovmeshError, ValueError, msgspec.DecodeError) as exc:
            self.refused[kind] += 1
            log.warning("admission refused (%s): %s", kind, exc)
            reply = Refused(error=str(exc))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.refused[kind] += 1
            reply = Refused(error=f"no whole request within {_TIMEOUT_S:g} s")
        await reply_and_close(writer, msgspec.json.encode(reply), timeout_s=_TIMEOUT_S)

    def _answer(self, request: _Request) -> bytes:
        transport = self._transport
        match request:
            case CaQuery():
                return transport.ca.ca_pem
            case Register(members=members):
                transport.register(members)
                return b""
            case Sign():
                known = transport.members.get((request.tenant, request.member_id))
                if known is None or known.role != request.role:
                    raise ConfigError(
                        f"member {request.member_id!r} of tenant {request.tenant!r} is not "
                        f"registered in role {request.role!r}; register it first"
                    )
                return transport.ca.sign_request(
                    request.csr_pem,
                    request.member_id,
                    request.role,
                    tenant=request.tenant,
                    ttl=dt.timedelta(seconds=request.ttl_s),
                )
            case Renew():
                return transport.ca.renew_client_cert(
                    request.cert_pem,
                    member_id=request.member_id,
                    ttl=dt.timedelta(seconds=request.ttl_s),
                )


def _ask(path: Path, request: _Request) -> bytes:
    """Send `request` to the `AdmissionServer` at `path` and return what it answered.

    Raises:
        ConfigError: nothing serves the socket, it cannot be reached, or it refused.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_TIMEOUT_S)
            sock.connect(str(path))
            sock.sendall(msgspec.json.encode(request) + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) < _MAX_REPLY_BYTES:
                chunk = sock.recv(_MAX_REPLY_BYTES)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise ConfigError(
            f"{ENV_NATS_ADMISSION}={str(path)!r}: nothing admits members there; the process "
            "that serves the bus (`govmesh up`) stopped"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{ENV_NATS_ADMISSION}={str(path)!r}: cannot reach it: {exc!r}") from None
    try:
        reply = _REPLY.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{ENV_NATS_ADMISSION}={str(path)!r}: not an answer: {exc}") from None
    match reply:
        case Refused(error=error):
            raise ConfigError(f"admission at {path} refused: {error}")
        case Answer(pem=pem):
            return pem


class AdmittedCA(DeploymentCA):
    """The deployment CA of a bus another process serves, seen from a process that joins
    it: it trusts the CA's certificate, and has certificates signed and renewed by the
    serving process over its admission socket, without ever holding the CA's key.

    Args:
        path: the admission socket.

    Raises:
        ConfigError: the socket does not answer.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        super().__init__(cert=x509.load_pem_x509_certificate(_ask(self.path, CaQuery())))

    @property
    def can_issue(self) -> bool:
        """Always: the serving process issues."""
        return True

    def client_cert(
        self,
        member_id: str,
        role: str,
        *,
        tenant: str = CERT_ORGANIZATION,
        ttl: dt.timedelta = DEFAULT_CLIENT_TTL,
        not_before: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A key made here and its certificate, signed by the serving process from now
        (``not_before`` is not asked of it)."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr_pem = signing_request(key, member_id, role)
        cert_pem = self.sign_request(csr_pem, member_id, role, tenant=tenant, ttl=ttl)
        return cert_pem, _key_pem(key)

    def sign_request(
        self,
        csr_pem: bytes,
        member_id: str,
        role: str,
        *,
        tenant: str = CERT_ORGANIZATION,
        ttl: dt.timedelta = DEFAULT_CLIENT_TTL,
    ) -> bytes:
        """`DeploymentCA.sign_request`, by the serving process, for a registered member."""
        return _ask(
            self.path,
            Sign(
                csr_pem=csr_pem,
                member_id=member_id,
                role=role,
                tenant=tenant,
                ttl_s=ttl.total_seconds(),
            ),
        )

    def renew_client_cert(
        self, cert_pem: bytes, *, member_id: str, ttl: dt.timedelta = DEFAULT_CLIENT_TTL
    ) -> bytes:
        """`DeploymentCA.renew_client_cert`, by the serving process."""
        return _ask(
            self.path, Renew(cert_pem=cert_pem, member_id=member_id, ttl_s=ttl.total_seconds())
        )

    def __repr__(self) -> str:
        return f"AdmittedCA(name={self.name!r}, path={str(self.path)!r})"


def admitted_transport(path: Path) -> Transport:
    """The transport of a process that joins, through the admission socket at `path`, a
    mutual-TLS bus another process serves: its members are registered there, and their
    certificates signed there.

    Raises:
        ConfigError: the socket does not answer.
    """
    ca = AdmittedCA(path)
    return Transport(ca, registrar=lambda members: _ask(ca.path, Register(members=members)))
