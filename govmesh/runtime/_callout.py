"""NATS auth callout: nats-server nodes govmesh does not run admit a run's members.

A mutual-TLS nats-server maps each client certificate to a user of its configuration
(``verify_and_map``), so every member must be written into every node's users before it
connects. govmesh does that for the nodes it runs itself; a NATS cluster on other machines
cannot learn of a run's members that way, since they are known only once the run starts.
With auth callout the nodes ask instead: a client whose certificate maps to no configured
user is described, certificate chain and all, in a request the node signs and publishes on
``$SYS.REQ.USER.AUTH``, and `AuthCallout`, in the process that registered the members (the
driver, which holds the deployment CA), answers with a user JWT that carries the member's
role's permissions, signed by the deployment's callout issuer key. The node enforces those
permissions as it enforces configured ones. A node needs only the issuer's public key and
the callout service's own user in its configuration (`render_authorization` writes both),
never a member.

The callout service is a NATS client of its own, on a thread of its own, so a driver whose
event loop is busy never delays a member's connection past the node's auth timeout. It
answers only for certificates it can judge: one of the deployment CA's, still valid, of a
member it registered. A certificate of this CA it did not register may be another driver's
member (several runs may share one NATS cluster and one issuer key), so it stays silent and
the node refuses the client after its auth timeout unless another driver admits it; a
certificate that is not this CA's, or expired, is refused at once. The user JWT expires
with the certificate: the node then disconnects the member, which reconnects with its
renewed certificate (`Bus` renews it at half-life) and is asked about again.

JWTs here are NATS's own (``alg: ed25519-nkey``, signed with an nkey) and are made with the
``nkeys`` package, NATS's Python nkeys library. The two PyPI packages that wrap auth
callout were measured unfit: ``nats-callout`` 0.1.1 pins a beta of adaptix
(``==3.0.0b11``), fixes every user's expiry at one hour, and checks a request only against
the key the request itself names; ``nats-jwt`` 0.2.2 pins ``pytz<2025`` and pulls in
pycryptodome and dataclasses-json for what ``nkeys`` and PyNaCl already do.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Final

import msgspec
import nkeys
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from govmesh.errors import ConfigError, RuntimeStartError
from govmesh.identity._ca import (
    ClientCert,
    DeploymentCA,
    load_client_cert,
    member_dn,
    ssl_context,
)
from govmesh.identity._permissions import Permissions, server_rules
from govmesh.identity._tokens import _b64, _unb64

__all__ = [
    "CALLOUT_MEMBER",
    "CALLOUT_ROLE",
    "CALLOUT_SUBJECT",
    "AuthCallout",
    "CalloutConfig",
    "callout_dn",
    "issuer_public_key",
    "new_issuer_seed",
]

log = logging.getLogger(__name__)

CALLOUT_SUBJECT: Final = "$SYS.REQ.USER.AUTH"
CALLOUT_MEMBER: Final = "govmesh-nats-auth-callout"
CALLOUT_ROLE: Final = "nats-auth-callout"
_REQUEST_AUDIENCE: Final = "nats-authorization-request"
_GLOBAL_ACCOUNT: Final = "$G"
"""The account of a nats-server configured without accounts, where every member lives."""
_NO_LIMIT: Final = -1
_RESPONSE_TTL_NS: Final = 120 * 10**9
"""How long a member may answer a request it received: nats-server's default for
``allow_responses: true``, which configured users get (`render_authorization`)."""
_HEADER: Final = {"typ": "JWT", "alg": "ed25519-nkey"}
_START_TIMEOUT_S: Final = 15.0


def callout_dn() -> str:
    """The user name of the callout service's certificate on every node (``auth_users``)."""
    return member_dn(CALLOUT_MEMBER, CALLOUT_ROLE)


def new_issuer_seed() -> bytes:
    """A new account nkey seed (``SA...``) to sign the users the callout admits."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT))


def _issuer(seed: bytes) -> nkeys.KeyPair:
    try:
        pair = nkeys.from_seed(bytearray(seed.strip()))
        public = pair.public_key.decode()
    except (nkeys.NkeysError, binascii.Error, ValueError, IndexError) as exc:
        raise ConfigError(f"the callout issuer key is not an nkey seed: {exc!r}") from None
    if not public.startswith("A"):
        raise ConfigError(
            f"the callout issuer key must be an account nkey (its seed starts with SA), "
            f"got a key whose public part is {public[:1]!r}..."
        )
    return pair


def issuer_public_key(seed: bytes) -> str:
    """The public key (``A...``) a node's ``auth_callout { issuer }`` names for `seed`.

    Raises:
        ConfigError: `seed` is not an account nkey seed.
    """
    return str(_issuer(seed).public_key.decode())


class CalloutConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What a node's configuration says of auth callout (see `render_authorization`).

    Attributes:
        issuer: the issuer's public account key, ``A...``.
        service: the callout service's user, its certificate's DN (`callout_dn`).
    """

    issuer: str
    service: str


def encode_jwt(claims: dict[str, Any], pair: nkeys.KeyPair) -> str:
    """A NATS JWT of `claims`, signed by `pair`; its ``jti`` is the hash of the claims, as
    NATS's Go library makes it."""
    claims = {**claims, "jti": ""}
    digest = hashlib.sha256(msgspec.json.encode(claims)).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signing_input = f"{_b64(msgspec.json.encode(_HEADER))}.{_b64(msgspec.json.encode(claims))}"
    return f"{signing_input}.{_b64(pair.sign(signing_input.encode()))}"


def _verify_key(public: str) -> VerifyKey:
    """The Ed25519 key of a public nkey (``N...`` of a server, ``A...``, ``U...``), its
    checksum checked; the ``nkeys`` package decodes seeds only."""
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a public nkey: {public!r}") from exc
    body, checksum = bytearray(raw[:-2]), raw[-2:]
    if len(body) != 33 or nkeys.crc16_checksum(body) != checksum:
        raise ValueError(f"not a public nkey (length or checksum): {public!r}")
    if not nkeys.valid_public_prefix_byte(body[0]):
        raise ValueError(f"not a public nkey (prefix): {public!r}")
    return VerifyKey(bytes(body[1:]))


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a NATS JWT whose signature verifies with the key its ``iss`` names.

    Raises:
        ValueError: the token is malformed, not ``ed25519-nkey``, or its signature fails.
    """
    try:
        header_b64, claims_b64, signature_b64 = token.strip().split(".")
        header = msgspec.json.decode(_unb64(header_b64))
        claims = msgspec.json.decode(_unb64(claims_b64))
        signature = _unb64(signature_b64)
    except (ValueError, binascii.Error, msgspec.DecodeError) as exc:
        raise ValueError(f"not a JWT: {exc}") from None
    if not isinstance(header, dict) or header.get("alg") != _HEADER["alg"]:
        raise ValueError(f"not an nkey-signed JWT: header {header!r}")
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise ValueError("the JWT names no issuer")
    try:
        _verify_key(claims["iss"]).verify(f"{header_b64}.{claims_b64}".encode(), signature)
    except (BadSignatureError, ValueError) as exc:
        raise ValueError(f"the JWT's signature does not verify: {exc}") from None
    return claims


class _Refusal(Exception):
    """The request is refused, and the node is told why.

    Args:
        reason: a short code, for counts.
        detail: what the node logs.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _NotOurs(Exception):
    """A certificate of the deployment CA that this service did not register."""


class AuthCallout:
    """Answers nats-server's auth callout requests for the members a `Transport` registered.

    Call `start` once the nodes run, `close` when done (safe twice). See the module docs.

    Args:
        ca: the deployment CA: it issues the service's own certificate, and the member
            certificates it judges must be directly issued by it.
        issuer_seed: the account nkey seed that signs the users (`new_issuer_seed`).
        permissions_of: the registered member's permissions for a certificate DN, or None.

    Attributes:
        admitted: users admitted, by role (the certificate's OU).
        refused: requests refused or left unanswered, by reason.
    """

    def __init__(
        self,
        *,
        ca: DeploymentCA,
        issuer_seed: bytes,
        permissions_of: Callable[[str], Permissions | None],
    ) -> None:
        self.ca = ca
        self._issuer = _issuer(issuer_seed)
        self.issuer = str(self._issuer.public_key.decode())
        self._ca_cert = x509.load_pem_x509_certificate(ca.ca_pem)
        self._permissions_of = permissions_of
        self.admitted: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def config(self) -> CalloutConfig:
        """What every node's configuration must say of this callout."""
        return CalloutConfig(issuer=self.issuer, service=callout_dn())

    def start(self, url: str, *, timeout: float = _START_TIMEOUT_S) -> None:
        """Connect to the nodes at `url` (comma-separated) and answer their requests, from a
        thread of this object's; returns once subscribed. No-op while it runs.

        Raises:
            ConfigError: the CA cannot issue the service's certificate.
            RuntimeStartError: the service did not connect and subscribe within `timeout`.
        """
        if self._thread is not None and self._thread.is_alive():
            return
        cert = self.ca.member_cert(CALLOUT_MEMBER, CALLOUT_ROLE)
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(
            target=self._run, args=(url, cert), name="govmesh-nats-auth-callout", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout) or self._failure is not None:
            failure = self._failure
            self.close()
            raise RuntimeStartError(
                f"the NATS auth callout service did not subscribe at {url} within "
                f"{timeout:g} s (last error: {failure!r}); do the nodes trust the deployment "
                f"CA {self.ca.name!r} and list {callout_dn()!r} in auth_users?"
            )

    def close(self) -> None:
        """Stop answering and disconnect; a node then refuses new members. Safe twice."""
        loop, main, thread = self._loop, self._main, self._thread
        if loop is not None and main is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(main.cancel)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10.0)
        self._loop = self._main = None

    def _run(self, url: str, cert: ClientCert) -> None:
        try:
            asyncio.run(self._serve(url, cert))
        except asyncio.CancelledError:  # `close`
            pass
        except BaseException as exc:  # reported to `start`, or logged once it served
            self._failure = exc
            if self._ready.is_set():
                log.error("NATS auth callout service stopped: %r", exc)
        finally:
            self._ready.set()

    async def _serve(self, url: str, cert: ClientCert) -> None:
        import nats  # deferred, as in the bus: most importers of the runtime never connect

        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        tls = ssl_context(cert)

        async def on_error(exc: Exception) -> None:
            self._failure = exc  # what `start` reports, if it never subscribes
            log.debug("auth callout connection: %r", exc)

        nc = await nats.connect(
            servers=[u.strip() for u in url.split(",") if u.strip()],
            tls=tls,
            error_cb=on_error,
            name=CALLOUT_MEMBER,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=5,
        )
        try:
            await nc.subscribe(CALLOUT_SUBJECT, cb=self._on_request)
            await nc.flush()
            self._failure = None
            self._ready.set()
            await self._renew(tls, cert)
        finally:
            await nc.close()

    async def _renew(self, tls: Any, cert: ClientCert) -> None:
        """Keep a valid certificate in the service's context for its next reconnect, until
        cancelled."""
        while True:
            await asyncio.sleep(max(1.0, cert.renew_before().timestamp() - time.time()))
            cert = self.ca.member_cert(CALLOUT_MEMBER, CALLOUT_ROLE)
            load_client_cert(tls, cert)

    async def _on_request(self, msg: Any) -> None:
        try:
            answer = self.answer(msg.data)
        except _NotOurs as exc:
            self.refused["not_registered"] += 1
            log.info("auth callout: not answering for %s (not a member registered here)", exc)
            return
        if answer:
            await msg.respond(answer)

    def answer(self, data: bytes) -> bytes:
        """The signed answer to one authorization request, or b"" for a request that is
        not a node's (it cannot be answered at all).

        Raises:
            _NotOurs: a certificate of this CA that this service did not register.
        """
        try:
            request = decode_jwt(data.decode())
            nats_claims = request["nats"]
            user_nkey = str(nats_claims["user_nkey"])
            server_id = str(nats_claims["server_id"]["id"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self.refused["malformed_request"] += 1
            log.warning("auth callout: dropped a request that is not a node's: %s", exc)
            return b""
        now = int(time.time())
        try:
            if request.get("aud") != _REQUEST_AUDIENCE or request.get("sub") != self.issuer:
                raise _Refusal(
                    "wrong_issuer",
                    f"request for {request.get('sub')!r}, not this callout's issuer {self.issuer}",
                )
            if int(request.get("exp", now)) < now:
                raise _Refusal("expired_request", "the request expired")
            cert = self._certificate(nats_claims.get("client_tls") or {})
            dn = cert.subject.rfc4514_string()
            permissions = self._permissions_of(dn)
            if permissions is None:
                raise _NotOurs(dn)
            user = self._user_jwt(user_nkey, dn, permissions, cert, now)
        except _Refusal as exc:
            self.refused[exc.reason] += 1
            log.warning("auth callout: refused a client of %s: %s", server_id, exc)
            body: dict[str, Any] = {"error": str(exc)}
        else:
            role = cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)
            self.admitted[str(role[0].value) if role else "?"] += 1
            body = {"jwt": user}
        response = {
            "sub": user_nkey,
            "aud": server_id,
            "iss": self.issuer,
            "iat": now,
            "nats": {**body, "type": "authorization_response", "version": 2},
        }
        return encode_jwt(response, self._issuer).encode()

    def _certificate(self, client_tls: dict[str, Any]) -> x509.Certificate:
        """The client's certificate, checked: verified by the node, issued by this CA,
        valid now."""
        chains = client_tls.get("verified_chains") or []
        if not chains or not chains[0]:
            raise _Refusal(
                "no_certificate", "no client certificate the node verified (is tls verify on?)"
            )
        try:
            cert = x509.load_pem_x509_certificate(str(chains[0][0]).encode())
        except ValueError as exc:
            raise _Refusal("bad_certificate", f"the certificate does not load: {exc}") from None
        try:
            cert.verify_directly_issued_by(self._ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise _Refusal(
                "foreign_certificate",
                f"certificate {cert.subject.rfc4514_string()!r} is not issued by the "
                f"deployment CA {self.ca.name!r}",
            ) from None
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise _Refusal(
                "expired_certificate",
                f"certificate {cert.subject.rfc4514_string()!r} is not valid now",
            )
        return cert

    def _user_jwt(
        self,
        user_nkey: str,
        dn: str,
        permissions: Permissions,
        cert: x509.Certificate,
        now: int,
    ) -> str:
        """The user the node admits: the member's permissions, until its certificate
        expires; named by its DN, as a configured user would be in the node's log."""
        user: dict[str, Any] = {
            "type": "user",
            "version": 2,
            "subs": _NO_LIMIT,
            "data": _NO_LIMIT,
            "payload": _NO_LIMIT,
        }
        try:
            user["pub"] = server_rules(dn, "publish", permissions["publish"])
            user["sub"] = server_rules(dn, "subscribe", permissions["subscribe"])
        except ConfigError as exc:
            raise _Refusal("unsafe_permissions", str(exc)) from None
        if permissions["allow_responses"]:
            user["resp"] = {"max": 1, "ttl": _RESPONSE_TTL_NS}
        claims = {
            "sub": user_nkey,
            "aud": _GLOBAL_ACCOUNT,
            "iss": self.issuer,
            "iat": now,
            "exp": int(cert.not_valid_after_utc.timestamp()),
            "name": dn,
            "nats": user,
        }
        return encode_jwt(claims, self._issuer)

    def __repr__(self) -> str:
        return f"AuthCallout(issuer={self.issuer!r}, answered={sum(self.admitted.values())})"
