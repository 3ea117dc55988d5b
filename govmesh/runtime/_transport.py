"""Transport security of one deployment: its CA, nats-server's TLS files, the admitted members.

Members are known only once a scenario decides them, after the server is up, so `admit`
adds a user to the running embedded nats-server (rewrite ``authorization.conf``, SIGHUP,
wait for the server's confirmation) without a restart. Admitting an admitted member again
only issues a fresh certificate, without a reload: that is how certificates are renewed.

External NATS (``GOVMESH_NATS_URL``) is configured by its operator through files:

============================  ===================================================
``GOVMESH_NATS_CA``           CA certificate (PEM) the server and members trust
``GOVMESH_NATS_CA_KEY``       its private key (PEM), only where members are admitted
``GOVMESH_NATS_CALLOUT_KEY``  the auth callout's issuer nkey seed, only there too
``GOVMESH_NATS_CERT``         this process's own client certificate (PEM), optional
``GOVMESH_NATS_KEY``          that certificate's private key (PEM)
============================  ===================================================

The operator's servers need ``tls { ... verify_and_map: true }`` and either the auth
callout (``govmesh nats init`` writes their configuration: the process that admits members
answers for them, see `AuthCallout`) or the users that `Transport.authorization` renders.
govmesh does not reload a server it did not start, nor read its log: what such a server
refuses (its ``Publish Violation``, ``Subscription Violation`` and ``authentication error``
log lines) is its operator's to watch.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

import msgspec

from govmesh.errors import ConfigError
from govmesh.identity._ca import DEFAULT_CLIENT_TTL, ClientCert, DeploymentCA, member_dn
from govmesh.identity._permissions import Permissions, permissions_for
from govmesh.identity._tokens import Identity
from govmesh.roles import PLATFORM_ROLES
from govmesh.runtime._callout import AuthCallout, callout_dn, new_issuer_seed
from govmesh.runtime._home import write_private
from govmesh.runtime._nats import NatsServer, ServerTLS, render_authorization
from govmesh.runtime._nats_cluster import NatsCluster
from govmesh.subjects import Subjects

__all__ = [
    "ENV_NATS_CA",
    "ENV_NATS_CALLOUT_KEY",
    "ENV_NATS_CA_KEY",
    "ENV_NATS_CERT",
    "ENV_NATS_KEY",
    "Member",
    "Transport",
]

log = logging.getLogger(__name__)

ENV_NATS_CA: Final = "GOVMESH_NATS_CA"
ENV_NATS_CA_KEY: Final = "GOVMESH_NATS_CA_KEY"
ENV_NATS_CERT: Final = "GOVMESH_NATS_CERT"
ENV_NATS_KEY: Final = "GOVMESH_NATS_KEY"
ENV_NATS_CALLOUT_KEY: Final = "GOVMESH_NATS_CALLOUT_KEY"
_TLS_DIR: Final = "tls"


class Member(msgspec.Struct, frozen=True, kw_only=True):
    """One admitted bus member; its role, tenant and kind fix its NATS permissions.

    Attributes:
        member_id: the member id (certificate CN).
        role: its role (certificate OU).
        tenant: the tenant whose subjects it uses.
        agent: `role` is a scenario's agent role rather than a platform role.
    """

    member_id: str
    role: str
    tenant: str
    agent: bool = False

    @classmethod
    def for_role(cls, member_id: str, role: str, *, tenant: str) -> Member:
        """`member_id` in `role`; roles outside the platform's own (`PLATFORM_ROLES`) are
        agent roles."""
        return cls(member_id=member_id, role=role, tenant=tenant, agent=role not in PLATFORM_ROLES)

    def permissions(self) -> Permissions:
        """The member's NATS permissions (see `permissions_for`)."""
        return permissions_for(self.member_id, self.role, Subjects(self.tenant), agent=self.agent)


def _read_env_file(var: str) -> bytes | None:
    value = os.environ.get(var, "").strip()
    if not value:
        return None
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}={value!r}: cannot read it: {exc.strerror}") from exc


class Transport:
    """Mutual TLS for one deployment: the CA, the member registry and (embedded) the server.

    Use `embedded` for a nats-server this process starts, `from_environment` for an external
    one. `admit` blocks for the reload (milliseconds); call it when members join, never per
    message.

    Args:
        ca: the deployment CA; `admit` needs its private key, or a CA that has another
            process sign (`AdmittedCA`).
        server: the embedded nats-server whose users `admit` maintains; None for external.
        own_cert: this process's own certificate, issued by an operator (external NATS).
        registrar: for external NATS served by another govmesh process, asks it for the
            users of members admitted here (see `admitted_transport`).
        cluster: the NATS cluster on this machine whose nodes admit this transport's
            members through its `callout` (`embedded_cluster`); no sentinel reports what
            its nodes refuse (a run's sentinel follows the one embedded server's log).
        callout: the auth callout service that answers for this transport's members to
            nodes that ask (`AuthCallout`); who runs the nodes starts it.

    Attributes:
        ca: the deployment CA.
        server: the embedded nats-server, or None.
        own_cert: the operator-issued certificate of this process, or None.
        cluster: the NATS cluster on this machine, or None.
        callout: the auth callout service, or None.
    """

    def __init__(
        self,
        ca: DeploymentCA,
        *,
        server: NatsServer | None = None,
        own_cert: ClientCert | None = None,
        registrar: Callable[[list[Member]], object] | None = None,
        cluster: NatsCluster | None = None,
        callout: AuthCallout | None = None,
    ) -> None:
        self.ca = ca
        self.server = server
        self.own_cert = own_cert
        self._registrar = registrar
        self.cluster = cluster
        self.callout = callout
        self._members: dict[tuple[str, str], Member] = {}
        self._by_user: dict[str, Member] = {}
        self._users: dict[str, Permissions] = {}
        self._lock = threading.Lock()

    @classmethod
    def embedded(cls, workdir: Path, *, jetstream: bool = True) -> tuple[Transport, NatsServer]:
        """A new CA and a mutual-TLS nats-server in `workdir`, not started yet.

        The server's certificate and key go to ``workdir/tls`` (key 0600); the CA key stays
        in memory and is gone with this process.

        Returns:
            The transport and the server whose users it maintains.
        """
        ca = DeploymentCA.create(f"govmesh-{uuid.uuid4().hex[:12]}")
        server = NatsServer(workdir=workdir, jetstream=jetstream, tls=_server_files(ca, workdir))
        return cls(ca, server=server), server

    @classmethod
    def embedded_cluster(cls, workdir: Path, *, size: int = 3) -> tuple[Transport, NatsCluster]:
        """A new CA and a NATS cluster of `size` mutual-TLS nodes on this machine, with
        route TLS and clustered JetStream, in `workdir`, not started yet (see `NatsCluster`).
        Its nodes admit members by auth callout, with an issuer key made here and kept in
        memory, as nodes on other machines do.

        Returns:
            The transport and the cluster whose nodes admit its members.
        """
        ca = DeploymentCA.create(f"govmesh-{uuid.uuid4().hex[:12]}")
        transport = cls(ca)
        transport.callout = AuthCallout(
            ca=ca, issuer_seed=new_issuer_seed(), permissions_of=transport.permissions_of
        )
        transport.cluster = NatsCluster(
            workdir=workdir,
            tls=_server_files(ca, workdir, routes=True),
            callout=transport.callout,
            size=size,
        )
        return transport, transport.cluster

    @classmethod
    def from_environment(cls) -> Transport | None:
        """The operator's files for external NATS (see the module docs); None without a CA.

        Raises:
            ConfigError: a named file cannot be read or parsed, or only one of the
                certificate and its key is given.
        """
        ca_pem = _read_env_file(ENV_NATS_CA)
        if ca_pem is None:
            return None
        ca = DeploymentCA.load(ca_pem, _read_env_file(ENV_NATS_CA_KEY))
        cert_pem, key_pem = _read_env_file(ENV_NATS_CERT), _read_env_file(ENV_NATS_KEY)
        if (cert_pem is None) != (key_pem is None):
            raise ConfigError(f"set both {ENV_NATS_CERT} and {ENV_NATS_KEY}, or neither")
        own = None
        if cert_pem is not None and key_pem is not None:
            own = ClientCert.from_pem(cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)
        transport = cls(ca, own_cert=own)
        seed = _read_env_file(ENV_NATS_CALLOUT_KEY)
        if seed is not None:
            if not ca.can_issue:
                raise ConfigError(
                    f"{ENV_NATS_CALLOUT_KEY} admits members, which needs the CA's key too: "
                    f"set {ENV_NATS_CA_KEY}"
                )
            try:
                transport.callout = AuthCallout(
                    ca=ca, issuer_seed=seed, permissions_of=transport.permissions_of
                )
            except ConfigError as exc:
                raise ConfigError(f"{ENV_NATS_CALLOUT_KEY}: {exc}") from None
        return transport

    @property
    def members(self) -> Mapping[tuple[str, str], Member]:
        """Admitted members by (tenant, member id) (read-only view)."""
        return MappingProxyType(self._members)

    def permissions_of(self, user: str) -> Permissions | None:
        """The NATS permissions of the member whose certificate maps to `user` (its
        subject DN), or None if no such member is admitted: what `callout` answers."""
        return self._users.get(user)

    def member_of(self, user: str) -> Member | None:
        """The admitted member whose certificate maps to nats-server user `user` (its
        subject DN, as the server's log names it), or None."""
        return self._by_user.get(user)

    def admit(
        self,
        member_id: str,
        role: str,
        *,
        tenant: str,
        agent: bool = False,
        ttl: dt.timedelta = DEFAULT_CLIENT_TTL,
    ) -> ClientCert:
        """Let `member_id` join the bus in `role` and return its certificate.

        Args:
            member_id: the member id; becomes the certificate's CN.
            role: its role; becomes the OU and fixes its permissions.
            tenant: the tenant whose subjects it uses.
            agent: `role` is a scenario's agent role (see `permissions_for`).
            ttl: certificate validity; renew by admitting again before `renew_before`.

        Raises:
            ConfigError: no CA key, an invalid id or role, or `member_id` already admitted
                with another role, tenant or kind.
            RuntimeStartError: the embedded server did not apply the new user.
        """
        member = Member(member_id=member_id, role=role, tenant=tenant, agent=agent)
        return self.admit_many([member], ttl=ttl)[member_id]

    def admit_many(
        self, members: Iterable[Member], *, ttl: dt.timedelta = DEFAULT_CLIENT_TTL
    ) -> dict[str, ClientCert]:
        """Admit several members with a single reload; certificates by member id.

        Raises:
            ConfigError, RuntimeStartError: as `admit`; then nobody new is admitted.
        """
        requested = list(members)
        if ttl <= dt.timedelta(0):
            raise ConfigError(f"certificate ttl must be positive, got {ttl!r}")
        self.register(requested)
        return {
            m.member_id: self.ca.member_cert(m.member_id, m.role, tenant=m.tenant, ttl=ttl)
            for m in requested
        }

    def register(self, members: Iterable[Member]) -> None:
        """Let members join the bus, with a single reload, without issuing a certificate:
        a member that makes its own key gets one from `DeploymentCA.sign_request`.

        Raises:
            ConfigError, RuntimeStartError: as `admit`; then nobody new is admitted.
        """
        requested = list(members)
        if not self.ca.can_issue:
            raise ConfigError(
                f"cannot admit {[m.member_id for m in requested]!r}: the CA {self.ca.name!r} "
                f"has no private key; set {ENV_NATS_CA_KEY} or have the operator issue "
                "certificates"
            )
        with self._lock:
            joining: dict[tuple[str, str], Member] = {}
            named: dict[str, Member] = {}
            users = dict(self._users)
            for member in requested:
                key = (member.tenant, member.member_id)
                known = self._members.get(key) or joining.get(key)
                if known is not None and known != member:
                    raise ConfigError(
                        f"member {member.member_id!r} is already admitted as {known!r}, "
                        f"not {member!r}"
                    )
                if known is None:
                    dn = member_dn(member.member_id, member.role, member.tenant)
                    if dn == callout_dn():
                        raise ConfigError(f"{dn!r} is the NATS auth callout's; no member's")
                    users[dn] = _permissions(member)
                    joining[key] = member
                    named[dn] = member
            if joining and self.server is not None:
                self.server.authorize(users)
            elif joining and self.callout is not None:
                log.debug("registered %d members for the auth callout", len(joining))
            elif joining and self._registrar is not None:
                self._registrar(list(joining.values()))
            elif joining:
                log.info(
                    "admitted %s; the external nats-server needs their users (see "
                    "Transport.authorization)",
                    ", ".join(f"{t}/{m}" for t, m in joining),
                )
            self._members.update(joining)
            self._by_user.update(named)
            self._users = users

    def enrol(
        self,
        identities: Iterable[Identity],
        *,
        tenant: str,
        ttl: dt.timedelta = DEFAULT_CLIENT_TTL,
    ) -> None:
        """Admit every identity with one reload and attach its certificate to it, with a
        key made here: for members that run in this process (see `Member.for_role`).
        """
        people = list(identities)
        members = [Member.for_role(i.agent_id, i.role, tenant=tenant) for i in people]
        certs = self.admit_many(members, ttl=ttl)
        for identity in people:
            identity.cert = certs[identity.agent_id]

    def authorization(self) -> str:
        """The ``authorization`` block for the admitted members, for an external server."""
        with self._lock:
            return render_authorization(self._users)

    def __repr__(self) -> str:
        where = "embedded" if self.server is not None or self.cluster is not None else "external"
        return f"Transport({where}, ca={self.ca.name!r}, members={len(self._members)})"


def _server_files(ca: DeploymentCA, workdir: Path, *, routes: bool = False) -> ServerTLS:
    """The CA's certificate and a server certificate for 127.0.0.1 (`routes`: for a
    cluster's routes too) in ``workdir/tls``, the key 0600."""
    tls_dir = Path(workdir) / _TLS_DIR
    tls_dir.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = ca.server_cert(routes=routes)
    files = ServerTLS(
        cert_file=tls_dir / "server.pem",
        key_file=tls_dir / "server-key.pem",
        ca_file=tls_dir / "ca.pem",
    )
    files.ca_file.write_bytes(ca.ca_pem)
    files.cert_file.write_bytes(cert_pem)
    write_private(files.key_file, key_pem)
    return files


def _permissions(member: Member) -> Permissions:
    try:
        return member.permissions()
    except ConfigError:
        raise
    except ValueError as exc:  # an id or tenant that is not a subject token
        raise ConfigError(f"cannot admit {member!r}: {exc}") from exc
