"""Where a running deployment tells other govmesh commands how to join it.

A process that runs a deployment (``govmesh run``) writes ``$GOVMESH_HOME/<tenant>/``
(default ``~/.govmesh``) while it runs, and removes it when it stops:

=====================  ==============================================================
``deployment.json``    tenant, NATS URL, token audience, pid: what a client needs to connect
``issuer.key``         the token issuer's Ed25519 seed (0600)
``ca.pem``             the deployment CA's certificate
``ca-key.pem``         the CA's private key (0600), only when mutual TLS is on
=====================  ==============================================================

With these, ``govmesh approvals`` issues itself a short-lived operator token and
certificate for the member the deployment admitted for operators (`OPERATOR_MEMBER`), so
an answer given from another terminal is signed exactly as any other message. Whoever can
read the directory can act as an operator of the deployment: the directory is 0700, the
keys 0600, and nothing is written anywhere else. The Redis URL, which holds the
deployment's Redis password, is not written: operator tools ask governance over the bus.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from govmesh.config import Deployment
from govmesh.errors import ConfigError
from govmesh.identity import ClientCert, DeploymentCA, Identity, Issuer, SigningKey

__all__ = [
    "ENV_HOME",
    "OPERATOR_MEMBER",
    "WATCH_MEMBER",
    "JoinedDeployment",
    "advertise",
    "home_dir",
    "join",
    "write_private",
]

ENV_HOME: Final = "GOVMESH_HOME"
OPERATOR_MEMBER: Final = "operator"
WATCH_MEMBER: Final = "watch"
"""The member `govmesh watch` joins as, in the auditor role: it reads, it changes nothing."""
"""The member id operators join as; the person's name travels in each answer."""
_STATE: Final = "deployment.json"


class _Record(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    nats_url: str
    audience: str
    issuer_name: str
    tls: bool
    pid: int
    started_at: float
    what: str = ""


@dataclass(frozen=True, kw_only=True)
class JoinedDeployment:
    """A running deployment as another process sees it.

    Attributes:
        deployment: where its services are and whom they trust; without the Redis URL.
        issuer: its token issuer, with the private key.
        ca: its CA with the private key; None without mutual TLS.
        pid: the process that runs it.
        started_at: when it started (Unix time).
        what: what it runs, e.g. the scenario file.
    """

    deployment: Deployment
    issuer: Issuer
    ca: DeploymentCA | None
    pid: int
    started_at: float
    what: str

    @property
    def running(self) -> bool:
        """Whether the process that runs it is still alive."""
        return _alive(self.pid)

    def member(
        self, member_id: str, role: str, *, ttl_s: float
    ) -> tuple[Identity, ClientCert | None]:
        """A short-lived identity, and on a mutual-TLS bus its client certificate, for a
        member the deployment admitted (`OPERATOR_MEMBER`, `WATCH_MEMBER`)."""
        identity = self.issuer.identity(member_id, role, ttl_s=ttl_s)
        cert = (
            None
            if self.ca is None
            else self.ca.member_cert(
                member_id,
                role,
                tenant=self.deployment.tenant,
                ttl=dt.timedelta(seconds=ttl_s),
            )
        )
        return identity, cert


def home_dir() -> Path:
    """``$GOVMESH_HOME``, or ``~/.govmesh``."""
    value = os.environ.get(ENV_HOME, "").strip()
    return Path(value) if value else Path.home() / ".govmesh"


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a file only its owner can read, from the first byte on."""
    # Created 0600 from the start: a key must never be readable, not even for a moment
    # (fchmod too, in case the file already existed with a wider mode).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def advertise(
    deployment: Deployment,
    issuer: Issuer,
    *,
    ca: DeploymentCA | None,
    what: str = "",
) -> Iterator[Path]:
    """Advertise a running deployment under `home_dir` for the duration of the block.

    Yields:
        The deployment's directory.

    Raises:
        ConfigError: another live process already runs a deployment of this tenant here.
    """
    where = home_dir() / deployment.tenant
    found = _read(where)
    if found is not None and found.pid != os.getpid() and _alive(found.pid):
        raise ConfigError(
            f"a deployment of tenant {deployment.tenant!r} is already running (pid "
            f"{found.pid}, {found.what or 'no description'}); stop it, or set {ENV_HOME} "
            "to another directory"
        )
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(where, 0o700)
    record = _Record(
        tenant=deployment.tenant,
        nats_url=deployment.nats_url,
        audience=deployment.audience,
        issuer_name=issuer.name,
        tls=deployment.tls,
        pid=os.getpid(),
        started_at=time.time(),
        what=what,
    )
    write_private(where / "issuer.key", issuer.key.raw)
    if ca is not None:
        (where / "ca.pem").write_bytes(ca.ca_pem)
        if ca.can_issue:
            write_private(where / "ca-key.pem", ca.key_pem)
    # Written last: a reader that sees it sees the keys too.
    write_private(where / _STATE, msgspec.json.encode(record))
    try:
        yield where
    finally:
        mine = _read(where)
        if mine is not None and mine.pid == os.getpid():
            shutil.rmtree(where, ignore_errors=True)


def _read(where: Path) -> _Record | None:
    try:
        return msgspec.json.decode((where / _STATE).read_bytes(), type=_Record)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{where / _STATE}: cannot read the deployment: {exc}") from None


def join(tenant: str | None = None) -> JoinedDeployment:
    """The running deployment of `tenant` (or the only one) advertised under `home_dir`.

    Raises:
        ConfigError: none is running, several are and `tenant` is not given, or the one
            found belongs to a process that is gone.
    """
    home = home_dir()
    if tenant is None:
        tenants = sorted(p.parent.name for p in home.glob(f"*/{_STATE}"))
        if not tenants:
            raise ConfigError(
                f"no govmesh deployment is running here (nothing under {home}); start one "
                f"with `govmesh run SCENARIO`, or set {ENV_HOME} to where it runs"
            )
        if len(tenants) > 1:
            raise ConfigError(f"deployments of several tenants run here: {tenants}; pass --tenant")
        tenant = tenants[0]
    where = home / tenant
    record = _read(where)
    if record is None:
        raise ConfigError(f"no deployment of tenant {tenant!r} is running (nothing in {where})")
    if not _alive(record.pid):
        raise ConfigError(
            f"the deployment of tenant {tenant!r} in {where} belonged to pid {record.pid}, "
            "which is gone; start it again"
        )
    issuer = Issuer(
        name=record.issuer_name,
        audience=record.audience,
        key=SigningKey((where / "issuer.key").read_bytes()),
    )
    ca = None
    if record.tls:
        key_path = where / "ca-key.pem"
        ca = DeploymentCA.load(
            (where / "ca.pem").read_bytes(),
            key_path.read_bytes() if key_path.exists() else None,
        )
    return JoinedDeployment(
        deployment=issuer.deployment(
            tenant=record.tenant,
            nats_url=record.nats_url,
            redis_url="",  # not advertised: it holds the Redis password
            tls=record.tls,
        ),
        issuer=issuer,
        ca=ca,
        pid=record.pid,
        started_at=record.started_at,
        what=record.what,
    )
