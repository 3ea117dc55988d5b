"""Enrolment: a member makes its own keys and sends only their public halves to be certified.

Every member of a deployment enrols the same way. It makes its Ed25519 message key and its
P-256 TLS key in the process that uses them (`MemberKeys`) and sends an `EnrolRequest`: the
Ed25519 public key, which the Agent-ID token binds as ``cnf``, and a certificate signing
request (PKCS#10), which proves it holds the TLS key. Whoever holds the issuer and the CA
answers with a `Grant`: the token and the client certificate, nothing secret. A Ray actor
enrols through its driver this way, so no private key travels in actor arguments.

Processes outside the deployment, ``govmesh approvals`` and ``govmesh watch``, enrol over
`EnrolmentServer`, a Unix socket that the running deployment serves in its advertised
directory, and only as the operator (`OPERATOR_MEMBER`) or watch (`WATCH_MEMBER`) member.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from govmesh.config import Deployment
from govmesh.errors import ConfigError, SecurityError
from govmesh.identity._ca import (
    DEFAULT_CLIENT_TTL,
    ClientCert,
    DeploymentCA,
    _key_pem,
    signing_request,
)
from govmesh.identity._keys import SigningKey, VerifyKey
from govmesh.identity._tokens import DEFAULT_TOKEN_TTL_S, Identity, Issuer, TokenVerifier
from govmesh.identity._unix import UnixSocketServer, peer_uid, reply_and_close
from govmesh.roles import AUDITOR_ROLE, OPERATOR_ROLE

__all__ = [
    "ENROLMENT_TTL_S",
    "MAX_REQUEST_BYTES",
    "OPERATOR_MEMBER",
    "SOCKET_MEMBERS",
    "WATCH_MEMBER",
    "EnrolRequest",
    "EnrolmentServer",
    "Grant",
    "MemberKeys",
    "Refusal",
    "certify",
    "request_grant",
]

log = logging.getLogger(__name__)

OPERATOR_MEMBER: Final = "operator"
"""The member id operators join as; the person's name travels in each answer."""
WATCH_MEMBER: Final = "watch"
"""The member `govmesh watch` joins as, in the auditor role: it reads, it changes nothing."""
SOCKET_MEMBERS: Final[Mapping[str, str]] = MappingProxyType(
    {OPERATOR_MEMBER: OPERATOR_ROLE, WATCH_MEMBER: AUDITOR_ROLE}
)
"""The only members `EnrolmentServer` enrols, with their only role."""
ENROLMENT_TTL_S: Final = 600.0
"""Lifetime of the token and certificate `EnrolmentServer` grants."""
MAX_REQUEST_BYTES: Final = 8192
"""The largest request `EnrolmentServer` reads; a request is about 1 KiB."""
_MAX_REPLY_BYTES: Final = 65536
_CONCURRENT: Final = 8


class EnrolRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a member sends to enrol: who it asks to be, and the public halves of its keys.

    Attributes:
        member_id: the member it asks to enrol as.
        role: that member's role.
        key: its raw Ed25519 public key (32 bytes), which the token binds (``cnf``).
        csr_pem: a certificate signing request (PKCS#10, PEM) for its P-256 TLS key;
            needed on a mutual-TLS bus.
    """

    member_id: str
    role: str
    key: bytes
    csr_pem: bytes = b""


class Grant(msgspec.Struct, frozen=True, kw_only=True, tag="grant"):
    """A member's credentials for its own keys; nothing in it is secret.

    Attributes:
        token: its Agent-ID token, bound to the key it sent.
        cert_pem: its client certificate for the TLS key it sent, on a mutual-TLS bus.
        ca_pem: the deployment CA that the server's certificate chains to.
    """

    token: str
    cert_pem: bytes = b""
    ca_pem: bytes = b""


class Refusal(msgspec.Struct, frozen=True, kw_only=True, tag="refused"):
    """Why `EnrolmentServer` refused a request."""

    error: str


_REQUEST: Final = msgspec.json.Decoder(EnrolRequest)
_REPLY: Final = msgspec.json.Decoder(Grant | Refusal)


class MemberKeys:
    """A member's own private keys, made in the process that uses them.

    Only `request` leaves the process: the public halves. The keys themselves cannot be
    pickled, so they cannot be handed to a Ray actor or another process by mistake.

    Args:
        member_id: the member.
        role: its role.

    Attributes:
        identity: the member's identity, with its own key; it has a token (and, on a
            mutual-TLS bus, a certificate) once `accept` took a grant.
    """

    __slots__ = ("_tls_key", "identity")

    def __init__(self, member_id: str, role: str) -> None:
        self.identity = Identity(agent_id=member_id, role=role, key=SigningKey(), token="")
        self._tls_key = ec.generate_private_key(ec.SECP256R1())

    def request(self) -> EnrolRequest:
        """The enrolment request for these keys: the Ed25519 public key, and a certificate
        signing request for the TLS key, which a deployment without mutual TLS ignores."""
        me = self.identity
        return EnrolRequest(
            member_id=me.agent_id,
            role=me.role,
            key=me.key.public.raw,
            csr_pem=signing_request(self._tls_key, me.agent_id, me.role),
        )

    def accept(self, granted: Grant, deployment: Deployment) -> Identity:
        """Take `granted` into `identity`, once it is checked to be for these keys.

        Raises:
            SecurityError: the token is not one the deployment trusts, names another member
                or role, or binds another key; or the certificate is not for this member and
                TLS key, or is missing on a mutual-TLS bus.
        """
        me = self.identity
        verifier = TokenVerifier(issuers=list(deployment.issuers), audience=deployment.audience)
        claims = verifier.verify(granted.token)
        if (claims.sub, claims.role, claims.key.raw) != (me.agent_id, me.role, me.key.public.raw):
            raise SecurityError(
                "bad_grant",
                f"token for {claims.sub!r} in role {claims.role!r} is not for the key that "
                f"{me.agent_id!r} in role {me.role!r} made here",
            )
        cert = None
        if granted.cert_pem:
            try:
                issued = x509.load_pem_x509_certificate(granted.cert_pem)
                cert = ClientCert.from_pem(
                    cert_pem=granted.cert_pem,
                    key_pem=_key_pem(self._tls_key),
                    ca_pem=granted.ca_pem,
                )
            except (ValueError, ConfigError) as exc:
                raise SecurityError("bad_grant", f"certificate: {exc}") from None
            mine = issued.public_key() == self._tls_key.public_key()
            if not mine or (cert.member_id, cert.role) != (me.agent_id, me.role):
                raise SecurityError(
                    "bad_grant",
                    f"certificate of {cert.member_id!r} in role {cert.role!r} is not for the "
                    f"TLS key of {me.agent_id!r}",
                )
        elif deployment.tls:
            raise SecurityError("bad_grant", f"no client certificate for {me.agent_id!r}")
        me.token = granted.token
        me.cert = cert
        return me

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError(
            f"the keys of {self.identity.agent_id!r} stay in the process that made them"
        )

    def __repr__(self) -> str:
        return f"MemberKeys(member_id={self.identity.agent_id!r}, role={self.identity.role!r})"


def certify(
    request: EnrolRequest,
    *,
    issuer: Issuer,
    ca: DeploymentCA | None,
    tenant: str,
    capabilities: tuple[str, ...] = (),
    budget_usd: float = 0.0,
    ttl_s: float = DEFAULT_TOKEN_TTL_S,
    cert_ttl_s: float = DEFAULT_CLIENT_TTL.total_seconds(),
) -> Grant:
    """Certify the keys of `request` for the member and role it names.

    The caller decides whether that member may enrol at all; this only issues.

    Args:
        request: the member's request.
        issuer: signs the token.
        ca: signs the client certificate; None when the bus is not mutual TLS.
        tenant: the member's tenant (the certificate's O).
        capabilities: what the token grants.
        budget_usd: the token's budget authority.
        ttl_s: the token's lifetime.
        cert_ttl_s: the certificate's lifetime.

    Raises:
        ConfigError: the key is not an Ed25519 public key, or, with `ca`, the request has
            no valid certificate signing request.
    """
    try:
        key = VerifyKey(request.key)
    except ValueError as exc:
        raise ConfigError(f"key: {exc}") from None
    cert_pem = ca_pem = b""
    if ca is not None:
        if not request.csr_pem:
            raise ConfigError(
                "csr_pem: the bus is mutual TLS, so enrolment needs a certificate signing "
                "request for the member's own TLS key"
            )
        cert_pem = ca.sign_request(
            request.csr_pem,
            request.member_id,
            request.role,
            tenant=tenant,
            ttl=dt.timedelta(seconds=cert_ttl_s),
        )
        ca_pem = ca.ca_pem
    token = issuer.issue(
        sub=request.member_id,
        role=request.role,
        key=key,
        capabilities=capabilities,
        budget_usd=budget_usd,
        ttl_s=ttl_s,
    )
    return Grant(token=token, cert_pem=cert_pem, ca_pem=ca_pem)


class EnrolmentServer(UnixSocketServer):
    """Short-lived operator and watch credentials for local processes, on a Unix socket.

    The running deployment serves this at ``<advertised directory>/enrol.sock``. A client
    (``govmesh approvals``, ``govmesh watch``) makes its own keys and sends one JSON line, an
    `EnrolRequest` for `OPERATOR_MEMBER` in the operator role or `WATCH_MEMBER` in the
    auditor role; it gets one JSON line back, a `Grant` for its keys that lives
    `ENROLMENT_TTL_S`, or a `Refusal` that says why. Every other member and role is refused:
    nothing here can become governance, the gateway or an agent.

    Why a socket rather than a one-time enrolment token: a token would be a secret written
    somewhere for the client to find, readable by whoever can read that place, and spent or
    not, it outlives the moment it was meant for. The socket holds no secret at rest: it
    answers only while the deployment runs, only to processes the kernel lets connect (the
    socket is 0600 in a 0700 directory) and, where the kernel says who connects
    (``SO_PEERCRED`` on Linux), only to the user that runs the deployment. Whoever can
    connect can act as an operator of the deployment; that user can read the deployment's
    memory anyway. The client's private keys never leave it: it sends a certificate signing
    request and a public key.

    Requests are bounded (`MAX_REQUEST_BYTES`, a few seconds to arrive, a few served at
    once). A socket left by a process that was killed is replaced; one that another live
    process serves is an error. `close` removes the socket; it is safe to call twice.

    Use ``async with EnrolmentServer(...) as server:``.

    Args:
        path: where to serve the socket.
        issuer: signs the tokens.
        ca: signs the client certificates; None when the bus is not mutual TLS.
        tenant: the deployment's tenant.
        ttl_s: lifetime of what it grants.
        timeout_s: how long a client may take to send its request.

    Attributes:
        granted: grants made, by member.
        refused: refusals, by reason.
    """

    def __init__(
        self,
        path: Path,
        *,
        issuer: Issuer,
        ca: DeploymentCA | None,
        tenant: str,
        ttl_s: float = ENROLMENT_TTL_S,
        timeout_s: float = 5.0,
    ) -> None:
        super().__init__(path, limit=MAX_REQUEST_BYTES)
        self._issuer = issuer
        self._ca = ca
        self._tenant = tenant
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(_CONCURRENT)
        self.granted: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._slots:
            reply: Grant | Refusal
            try:
                reply = await self._answer(reader, writer)
            except _Refused as exc:
                self.refused[exc.reason] += 1
                log.warning("enrolment refused (%s): %s", exc.reason, exc.error)
                reply = Refusal(error=exc.error)
            await reply_and_close(writer, msgspec.json.encode(reply), timeout_s=self._timeout_s)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Grant:
        uid = peer_uid(writer)
        try:
            # Read even a foreign peer's request (bounded in size and time) before refusing
            # it: a refusal sent before the client finished writing breaks its pipe, and the
            # client would never see why.
            line = await asyncio.wait_for(reader.readuntil(b"\n"), self._timeout_s)
            if uid is not None and uid != os.getuid():
                raise _Refused(
                    "peer",
                    f"enrolment is only for uid {os.getuid()}, the user that runs the "
                    f"deployment; this client runs as uid {uid}",
                )
        except asyncio.LimitOverrunError:
            raise _Refused(
                "too_large", f"request is larger than {MAX_REQUEST_BYTES} bytes"
            ) from None
        except asyncio.IncompleteReadError as exc:
            raise _Refused(
                "incomplete", f"request ended after {len(exc.partial)} bytes, before its newline"
            ) from None
        except TimeoutError:
            raise _Refused("timeout", f"no request within {self._timeout_s:g} s") from None
        try:
            request = _REQUEST.decode(line)
        except msgspec.DecodeError as exc:
            raise _Refused("malformed", f"not an enrolment request: {exc}") from None
        allowed = SOCKET_MEMBERS.get(request.member_id)
        if allowed is None or request.role != allowed:
            raise _Refused(
                "role",
                f"enrolment here is only for {_allowed()}; refused member "
                f"{request.member_id!r} in role {request.role!r}",
            )
        try:
            granted = certify(
                request,
                issuer=self._issuer,
                ca=self._ca,
                tenant=self._tenant,
                ttl_s=self._ttl_s,
                cert_ttl_s=self._ttl_s,
            )
        except ConfigError as exc:
            raise _Refused("bad_keys", str(exc)) from None
        self.granted[request.member_id] += 1
        return granted

    def __repr__(self) -> str:
        return f"EnrolmentServer(path={str(self.path)!r}, serving={self.serving})"


class _Refused(Exception):
    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


def _allowed() -> str:
    return " and ".join(f"member {m!r} in role {r!r}" for m, r in SOCKET_MEMBERS.items())


async def request_grant(path: Path, request: EnrolRequest, *, timeout_s: float = 10.0) -> Grant:
    """Ask the `EnrolmentServer` at `path` to certify the keys of `request`.

    Raises:
        ConfigError: nothing serves the socket, this user may not connect to it, or no
            well-formed answer came within `timeout_s`.
        SecurityError: the server refused the request (``enrolment_refused``).
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=_MAX_REPLY_BYTES), timeout_s
        )
    except (FileNotFoundError, ConnectionRefusedError):
        raise ConfigError(
            f"{path}: the deployment serves no enrolment here; it stopped, or was started "
            "by a govmesh without enrolment"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"{path}: permission denied; only the user that runs the deployment may enrol"
        ) from None
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"{path}: cannot reach the enrolment socket: {exc!r}") from None
    try:
        writer.write(msgspec.json.encode(request) + b"\n")
        await asyncio.wait_for(writer.drain(), timeout_s)
        line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout_s)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise ConfigError(f"{path}: enrolment got no answer: {exc!r}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    try:
        reply = _REPLY.decode(line)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not an enrolment answer: {exc}") from None
    match reply:
        case Refusal(error=error):
            raise SecurityError("enrolment_refused", error)
        case Grant():
            return reply
