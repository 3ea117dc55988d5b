"""Where a running deployment tells other govmesh commands how to join it.

A process that runs a deployment (``govmesh run``, ``govmesh chaos``) writes
``$GOVMESH_HOME/<tenant>/`` (default ``~/.govmesh``, the tenant's directory 0700) while it
runs, and removes it when it stops:

=====================  ==============================================================
``deployment.json``    tenant, NATS URL, token audience, issuer public key, pid (0600)
``enrol.sock``         the deployment's `EnrolmentServer` (0600)
=====================  ==============================================================

Nothing there can mint an identity: the token issuer's key and the CA's key stay in the
memory of the process that runs the deployment. ``govmesh approvals`` and ``govmesh watch``
make their own keys and enrol them over the socket (`JoinedDeployment.member`), getting a
ten-minute token and certificate for the operator (`OPERATOR_MEMBER`) or watch
(`WATCH_MEMBER`) member and for nothing else. Whoever can connect to the socket, the user
that runs the deployment, can act as an operator of it. The Redis URL, which holds the
deployment's Redis password, is not written either: operator tools ask governance over
the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from govmesh.config import Deployment
from govmesh.errors import ConfigError
from govmesh.identity import (
    OPERATOR_MEMBER,
    WATCH_MEMBER,
    DeploymentCA,
    EnrolmentServer,
    Identity,
    Issuer,
    MemberKeys,
    request_grant,
)

__all__ = [
    "ENROL_SOCKET",
    "ENV_HOME",
    "OPERATOR_MEMBER",
    "WATCH_MEMBER",
    "JoinedDeployment",
    "NotRunning",
    "advertise",
    "home_dir",
    "join",
    "join_when_up",
    "write_private",
]

ENV_HOME: Final = "GOVMESH_HOME"
ENROL_SOCKET: Final = "enrol.sock"
_STATE: Final = "deployment.json"
_JOIN_POLL_S: Final = 0.2


class NotRunning(ConfigError):
    """No deployment (of the tenant asked for) is running here now; one may start later."""


class _Record(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    nats_url: str
    audience: str
    issuer_key: bytes
    tls: bool
    pid: int
    started_at: float
    what: str = ""


@dataclass(frozen=True, kw_only=True)
class JoinedDeployment:
    """A running deployment as another process sees it.

    Attributes:
        deployment: where its services are and whom they trust; without the Redis URL.
        enrolment: its enrolment socket.
        pid: the process that runs it.
        started_at: when it started (Unix time).
        what: what it runs, e.g. the scenario file.
    """

    deployment: Deployment
    enrolment: Path
    pid: int
    started_at: float
    what: str

    @property
    def running(self) -> bool:
        """Whether the process that runs it is still alive."""
        return _alive(self.pid)

    async def member(self, member_id: str, role: str) -> Identity:
        """A short-lived identity, and on a mutual-TLS bus its client certificate, for a
        member the deployment enrols over its socket (`OPERATOR_MEMBER` as operator,
        `WATCH_MEMBER` as auditor), with keys made here.

        Raises:
            ConfigError: the socket cannot be reached (see `request_grant`).
            SecurityError: the deployment refused, or granted something not for these keys.
        """
        keys = MemberKeys(member_id, role)
        granted = await request_grant(self.enrolment, keys.request())
        return keys.accept(granted, self.deployment)


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
    """Whether process `pid` runs. One that exited but whose parent has not yet reaped it
    (a zombie: a run started by a supervisor or a test that has not waited for it) still
    answers a signal, but runs no more, and neither does its deployment."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # not Linux, or gone meanwhile: the signal's answer stands
        return True
    # The state follows the command name, which is in parentheses and may hold any byte.
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"


@contextlib.asynccontextmanager
async def advertise(
    deployment: Deployment,
    issuer: Issuer,
    *,
    ca: DeploymentCA | None,
    what: str = "",
) -> AsyncIterator[Path]:
    """Advertise a running deployment under `home_dir`, and serve its enrolment socket, for
    the duration of the block; both are removed when it ends, by an error or Ctrl-C too.

    What a process that was killed left there (an older govmesh's keys too) is removed
    first.

    Yields:
        The deployment's directory.

    Raises:
        ConfigError: another live process already runs a deployment of this tenant here.
    """
    where = home_dir() / deployment.tenant
    found = _owner(where)
    if found is not None and found.pid != os.getpid():
        if _alive(found.pid):
            raise ConfigError(
                f"a deployment of tenant {deployment.tenant!r} is already running (pid "
                f"{found.pid}, {found.what or 'no description'}); stop it, or set {ENV_HOME} "
                "to another directory"
            )
        shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(where, 0o700)
    record = _Record(
        tenant=deployment.tenant,
        nats_url=deployment.nats_url,
        audience=deployment.audience,
        issuer_key=issuer.public_key,
        tls=deployment.tls,
        pid=os.getpid(),
        started_at=time.time(),
        what=what,
    )
    server = EnrolmentServer(where / ENROL_SOCKET, issuer=issuer, ca=ca, tenant=deployment.tenant)
    try:
        await server.start()
        # Written last: a reader that sees it can enrol.
        write_private(where / _STATE, msgspec.json.encode(record))
        yield where
    finally:
        await server.close()
        mine = _owner(where)
        if mine is not None and mine.pid == os.getpid():
            shutil.rmtree(where, ignore_errors=True)


class _Owner(msgspec.Struct, frozen=True):
    pid: int
    what: str = ""


def _owner(where: Path) -> _Owner | None:
    """Who advertised `where`, read from any govmesh version's record (an older one's may
    lack today's fields); None when nobody did or the record is unreadable."""
    try:
        return msgspec.json.decode((where / _STATE).read_bytes(), type=_Owner)
    except (OSError, msgspec.DecodeError):
        return None


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
        NotRunning: none is running, or the one found belongs to a process that is gone.
        ConfigError: several are running and `tenant` is not given.
    """
    home = home_dir()
    if tenant is None:
        tenants = sorted(p.parent.name for p in home.glob(f"*/{_STATE}"))
        if not tenants:
            raise NotRunning(
                f"no govmesh deployment is running here (nothing under {home}); start one "
                f"with `govmesh run SCENARIO`, or set {ENV_HOME} to where it runs"
            )
        if len(tenants) > 1:
            raise ConfigError(f"deployments of several tenants run here: {tenants}; pass --tenant")
        tenant = tenants[0]
    where = home / tenant
    record = _read(where)
    if record is None:
        raise NotRunning(f"no deployment of tenant {tenant!r} is running (nothing in {where})")
    if not _alive(record.pid):
        raise NotRunning(
            f"the deployment of tenant {tenant!r} in {where} belonged to pid {record.pid}, "
            "which is gone; start it again"
        )
    return JoinedDeployment(
        deployment=Deployment(
            tenant=record.tenant,
            nats_url=record.nats_url,
            redis_url="",  # not advertised: it holds the Redis password
            audience=record.audience,
            issuers=(record.issuer_key,),
            tls=record.tls,
        ),
        enrolment=where / ENROL_SOCKET,
        pid=record.pid,
        started_at=record.started_at,
        what=record.what,
    )


async def join_when_up(tenant: str | None = None, *, wait_s: float = 0.0) -> JoinedDeployment:
    """`join`, asked again every fraction of a second for up to `wait_s` seconds while no
    deployment runs, so a command started a moment before its deployment finds it.

    Raises:
        NotRunning: none was running when `wait_s` had passed.
        ConfigError: several are running and `tenant` is not given.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return join(tenant)
        except NotRunning as exc:
            if time.monotonic() >= deadline:
                if wait_s:
                    raise NotRunning(f"{exc} (waited {wait_s:g} s)") from None
                raise
        await asyncio.sleep(_JOIN_POLL_S)
