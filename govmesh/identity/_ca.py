"""The deployment CA: short-lived X.509 certificates for nats-server and for each member.

Keys are ECDSA P-256 signed with SHA-256, which nats-server (Go's crypto/tls) and Python's
``ssl`` (OpenSSL) both accept in TLS 1.2 and 1.3; Ed25519 certificates work only in TLS 1.3.

A member's certificate names it in its subject, ``CN=<member id>,OU=<role>,O=govmesh``
(RFC 4514 order), and carries no subject alternative names: nats-server's ``verify_and_map``
tries e-mail, DNS and URI SANs as user names before the subject DN, and a member certificate
must map by its DN only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from typing import Final

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from govmesh.errors import ConfigError

__all__ = [
    "CERT_ORGANIZATION",
    "DEFAULT_CA_TTL",
    "DEFAULT_CLIENT_TTL",
    "DEFAULT_SERVER_TTL",
    "ClientCert",
    "DeploymentCA",
    "load_client_cert",
    "member_dn",
    "renew_before",
    "signing_request",
    "ssl_context",
]

CERT_ORGANIZATION: Final = "govmesh"
DEFAULT_CA_TTL: Final = dt.timedelta(days=90)
DEFAULT_SERVER_TTL: Final = dt.timedelta(days=30)
DEFAULT_CLIENT_TTL: Final = dt.timedelta(hours=24)
RENEW_AT_FRACTION: Final = 0.5
# Backdating absorbs clock skew between the issuing host and the server's host.
_BACKDATE: Final = dt.timedelta(minutes=1)
# Characters that need escaping in an RFC 4514 DN; ids and roles must not contain them so the
# DN written in the server's user list is exactly the one nats-server derives from the cert.
_DN_SPECIAL: Final = frozenset(',+"\\<>;=#') | {"\0"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _dn_value(value: str, *, what: str) -> str:
    if not value or value != value.strip() or any(c in _DN_SPECIAL for c in value):
        raise ConfigError(
            f"{what} must be non-empty, without surrounding spaces or any of "
            f"{''.join(sorted(_DN_SPECIAL - {chr(0)}))}: {value!r}"
        )
    return value


def _member_name(member_id: str, role: str, tenant: str) -> x509.Name:
    # Stored most significant first (O, OU, CN); RFC 4514 prints it reversed, CN first.
    # O is the tenant, so one server can hold the same member id for several tenants.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _dn_value(tenant, what="tenant")),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _dn_value(role, what="role")),
            x509.NameAttribute(NameOID.COMMON_NAME, _dn_value(member_id, what="member id")),
        ]
    )


def member_dn(member_id: str, role: str, tenant: str = CERT_ORGANIZATION) -> str:
    """The user name nats-server's ``verify_and_map`` derives from a member's certificate:
    ``CN=<member_id>,OU=<role>,O=<tenant>``.

    Raises:
        ConfigError: a value contains a character a DN would have to escape.
    """
    return _member_name(member_id, role, tenant).rfc4514_string()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def signing_request(key: ec.EllipticCurvePrivateKey, member_id: str, role: str) -> bytes:
    """A certificate signing request (PEM) for ``key``. The CA names the certificate
    itself (`DeploymentCA.sign_request`); the subject only says who asks."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, member_id),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_cert(pem: bytes, *, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"{what} is not a PEM certificate: {pem[:40]!r}...") from exc


def renew_before(cert_pem: bytes, *, fraction: float = RENEW_AT_FRACTION) -> dt.datetime:
    """When to replace a certificate: `fraction` of the way through its validity (UTC).

    Renewing at half-life, like Agent-ID tokens, leaves the other half to retry in.

    Raises:
        ConfigError: `fraction` is not in (0, 1], or `cert_pem` is not a certificate.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    cert = _load_cert(cert_pem, what="cert_pem")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    # Certificates are back-dated for clock skew; the lifetime runs from the moment of
    # issue, or a short-lived certificate would look due for renewal the moment it is made.
    issued = min(start + _BACKDATE, end)
    return issued + (end - issued) * fraction


class ClientCert(msgspec.Struct, frozen=True, kw_only=True):
    """What a member needs to join the bus over mutual TLS; picklable, so Ray can ship it.

    Attributes:
        member_id: the member the certificate names (its CN).
        role: the member's role (its OU), which fixes its NATS permissions.
        cert_pem: the member's certificate.
        key_pem: the certificate's private key (PKCS#8, unencrypted).
        ca_pem: the deployment CA that the server's certificate must chain to.
    """

    member_id: str
    role: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @classmethod
    def from_pem(cls, *, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ClientCert:
        """Wrap a certificate issued elsewhere, reading the member and role from its subject.

        Raises:
            ConfigError: the certificate has no CN or OU.
        """
        subject = _load_cert(cert_pem, what="cert_pem").subject
        cn = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ou = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if len(cn) != 1 or len(ou) != 1:
            raise ConfigError(
                f"a member certificate needs one CN and one OU, got {subject.rfc4514_string()!r}"
            )
        return cls(
            member_id=str(cn[0].value),
            role=str(ou[0].value),
            cert_pem=cert_pem,
            key_pem=key_pem,
            ca_pem=ca_pem,
        )

    @property
    def expires(self) -> dt.datetime:
        """The end of the certificate's validity (UTC)."""
        return _load_cert(self.cert_pem, what="cert_pem").not_valid_after_utc

    def renew_before(self) -> dt.datetime:
        """When to ask for a fresh certificate; see `renew_before`."""
        return renew_before(self.cert_pem)

    def __repr__(self) -> str:
        # The default repr would print the private key into logs and tracebacks.
        return f"ClientCert(member_id={self.member_id!r}, role={self.role!r})"


def ssl_context(client: ClientCert) -> ssl.SSLContext:
    """A client TLS context that trusts only the deployment CA and presents `client`'s cert.

    ``ssl`` loads a certificate chain only from a file, so the certificate and key are written
    to a private (0600) temporary file that is removed as soon as they are loaded. Build the
    context once per connection, not per message.

    Raises:
        ConfigError: the certificate, key or CA does not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=client.ca_pem.decode())
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"CA of {client.member_id!r} does not load: {exc}") from exc
    load_client_cert(ctx, client)
    return ctx


def load_client_cert(ctx: ssl.SSLContext, client: ClientCert) -> None:
    """Make ``ctx`` present ``client``'s certificate from its next handshake on.

    Loading into the context a live connection holds is how a renewed certificate takes
    effect: every reconnect handshakes again with the context's current chain.
    """
    fd, path = tempfile.mkstemp(prefix="govmesh-cert-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(client.cert_pem + b"\n" + client.key_pem)
        ctx.load_cert_chain(path)
    except ssl.SSLError as exc:
        raise ConfigError(f"certificate of {client.member_id!r} does not load: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class DeploymentCA:
    """A deployment's own certificate authority (ECDSA P-256).

    Without its private key (`can_issue` is False) it can still hand out its certificate for
    clients to trust, but issues nothing.

    Args:
        cert: the CA certificate.
        key: the CA private key; None when only the certificate is known.
    """

    def __init__(
        self, *, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None
    ) -> None:
        self._cert = cert
        self._key = key

    @classmethod
    def create(cls, name: str, *, ttl: dt.timedelta = DEFAULT_CA_TTL) -> DeploymentCA:
        """A new CA named ``CN=<name>,O=govmesh``, valid from now for `ttl`.

        Raises:
            ConfigError: `name` is not usable in a DN or `ttl` is not positive.
        """
        if ttl <= dt.timedelta(0):
            raise ConfigError(f"CA ttl must be positive, got {ttl!r}")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, CERT_ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, _dn_value(name, what="CA name")),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key)

    @classmethod
    def load(cls, ca_pem: bytes, key_pem: bytes | None = None) -> DeploymentCA:
        """A CA from its PEM certificate and, to issue certificates, its PEM private key.

        Raises:
            ConfigError: either does not load, the key is not P-256, or it does not match.
        """
        cert = _load_cert(ca_pem, what="CA certificate")
        if key_pem is None:
            return cls(cert=cert)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"CA key does not load: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ConfigError(f"CA key must be an EC P-256 key, got {type(key).__name__}")
        if key.public_key() != cert.public_key():
            raise ConfigError(f"CA key does not match the certificate {cert.subject!r}")
        return cls(cert=cert, key=key)

    @property
    def expires(self) -> dt.datetime:
        """The end of the CA certificate's validity (UTC)."""
        return self._cert.not_valid_after_utc

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return _pem(self._cert)

    @property
    def key_pem(self) -> bytes:
        """The CA private key, PEM (PKCS#8, unencrypted); for writing to a 0600 file.

        Raises:
            ConfigError: this CA has no private key.
        """
        return _key_pem(self._require_key())

    @property
    def can_issue(self) -> bool:
        """Whether this CA holds its private key."""
        return self._key is not None

    @property
    def name(self) -> str:
        """The CA's subject, RFC 4514."""
        return self._cert.subject.rfc4514_string()

    def _require_key(self) -> ec.EllipticCurvePrivateKey:
        if self._key is None:
            raise ConfigError(f"CA {self.name!r} has no private key; it cannot issue certificates")
        return self._key

    def server_cert(
        self,
        hosts: Sequence[str] = ("127.0.0.1", "localhost"),
        *,
        ttl: dt.timedelta = DEFAULT_SERVER_TTL,
        routes: bool = False,
    ) -> tuple[bytes, bytes]:
        """A nats-server certificate for `hosts` (IP addresses or DNS names).

        With `routes`, also a client certificate: a node of a NATS cluster presents it
        when it connects a route to another node, which verifies it (route TLS).

        Returns:
            ``(cert_pem, key_pem)``.

        Raises:
            ConfigError: no hosts, `ttl` not positive, or this CA has no private key.
        """
        if not hosts:
            raise ConfigError("a server certificate needs at least one host")
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, CERT_ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, _dn_value(hosts[0], what="host")),
            ]
        )
        return self._issue(
            subject,
            ttl=ttl,
            usage=(ExtendedKeyUsageOID.SERVER_AUTH,)
            + ((ExtendedKeyUsageOID.CLIENT_AUTH,) if routes else ()),
            san=x509.SubjectAlternativeName(names),
        )

    def client_cert(
        self,
        member_id: str,
        role: str,
        *,
        tenant: str = CERT_ORGANIZATION,
        ttl: dt.timedelta = DEFAULT_CLIENT_TTL,
        not_before: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A member's client certificate, subject ``CN=<member_id>,OU=<role>,O=<tenant>``.

        Args:
            member_id: the member; becomes the CN.
            role: the member's role; becomes the OU.
            tenant: the member's tenant; becomes the O.
            ttl: validity; short, and renewed at `renew_before`.
            not_before: start of validity (UTC); default now, backdated a minute for skew.

        Returns:
            ``(cert_pem, key_pem)``.

        Raises:
            ConfigError: `member_id` or `role` is not usable in a DN, `ttl` is not positive,
                or this CA has no private key.
        """
        return self._issue(
            _member_name(member_id, role, tenant),
            ttl=ttl,
            usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            not_before=not_before,
        )

    def member_cert(
        self,
        member_id: str,
        role: str,
        *,
        tenant: str = CERT_ORGANIZATION,
        ttl: dt.timedelta = DEFAULT_CLIENT_TTL,
    ) -> ClientCert:
        """`client_cert` with its key and this CA, ready to connect with.

        Raises:
            ConfigError: as `client_cert`.
        """
        cert_pem, key_pem = self.client_cert(member_id, role, tenant=tenant, ttl=ttl)
        return ClientCert(
            member_id=member_id,
            role=role,
            cert_pem=cert_pem,
            key_pem=key_pem,
            ca_pem=self.ca_pem,
        )

    def sign_request(
        self,
        csr_pem: bytes,
        member_id: str,
        role: str,
        *,
        tenant: str = CERT_ORGANIZATION,
        ttl: dt.timedelta = DEFAULT_CLIENT_TTL,
    ) -> bytes:
        """A member's client certificate for the key of its certificate signing request.

        The member made the key itself and keeps it; the request (PKCS#10, PEM) proves it
        holds it. The subject is this CA's choice, ``CN=<member_id>,OU=<role>,O=<tenant>``,
        whatever the request asks for: who a member is comes from whoever enrols it.

        Returns:
            The certificate, PEM.

        Raises:
            ConfigError: the request does not load, its signature is not its key's, the key
                is not EC P-256, a name is not usable in a DN, or this CA has no private key.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise ConfigError(
                f"csr_pem is not a PEM certificate signing request: {csr_pem[:40]!r}..."
            ) from exc
        if not csr.is_signature_valid:
            raise ConfigError("certificate signing request is not signed by its own key")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ConfigError(
                f"certificate signing request key must be EC P-256, got {type(key).__name__}"
            )
        cert, _ = self._issue(
            _member_name(member_id, role, tenant),
            ttl=ttl,
            usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            public_key=key,
        )
        return cert

    def renew_client_cert(
        self, cert_pem: bytes, *, member_id: str, ttl: dt.timedelta = DEFAULT_CLIENT_TTL
    ) -> bytes:
        """A fresh certificate for the same member, role, tenant and key as ``cert_pem``.

        The member keeps its private key; only the validity moves. ``member_id`` (the
        verified token subject of the asker) must be the certificate's CN, so nobody can
        renew another member's certificate.

        Raises:
            ConfigError: the certificate is not one this CA issued, or names another member.
        """
        old = _load_cert(cert_pem, what="certificate to renew")
        try:
            old.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise ConfigError(f"certificate was not issued by {self.name!r}: {exc}") from None
        names = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names or names[0].value != member_id:
            raise ConfigError(f"certificate names {names!r}, not {member_id!r}")
        key = old.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(f"certificate key is {type(key).__name__}, not EC")
        cert, _ = self._issue(
            old.subject, ttl=ttl, usage=(ExtendedKeyUsageOID.CLIENT_AUTH,), public_key=key
        )
        return cert

    def _issue(
        self,
        subject: x509.Name,
        *,
        ttl: dt.timedelta,
        usage: tuple[x509.ObjectIdentifier, ...],
        san: x509.SubjectAlternativeName | None = None,
        not_before: dt.datetime | None = None,
        public_key: ec.EllipticCurvePublicKey | None = None,
    ) -> tuple[bytes, bytes]:
        ca_key = self._require_key()
        if ttl <= dt.timedelta(0):
            raise ConfigError(f"certificate ttl must be positive, got {ttl!r}")
        # Backdated for clock skew, but the lifetime counts from now, so a short-lived
        # certificate is never born expired.
        start = not_before if not_before is not None else _now() - _BACKDATE
        end = (not_before if not_before is not None else _now()) + ttl
        key: ec.EllipticCurvePrivateKey | None = None
        if public_key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public_key = key.public_key()
        subject_key = public_key
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(subject_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return _pem(builder.sign(ca_key, hashes.SHA256())), b"" if key is None else _key_pem(key)

    def __repr__(self) -> str:
        return f"DeploymentCA(name={self.name!r}, can_issue={self.can_issue})"


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
