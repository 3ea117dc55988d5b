"""Kept records of finished runs, so their audit trail outlives them.

A run whose workflows all finished keeps what an auditor needs under
``$GOVMESH_HOME/records/<run_id>/`` and drops what only a running deployment needs (its
JetStream store, nats-server state and snapshot keys):

==============  ================================================================
``run.json``    its `RunManifest`, with its tenant and when it finished
``redis/``      its embedded Redis-protocol server's data (the append-only file):
                audit index and checkpoints, decision records and policy texts,
                approvals, spend
``prune.log``   (in ``records/`` itself) one JSON line per record `prune_kept` removed
==============  ================================================================

`open_kept` starts an embedded server on a kept record for the duration of one command and
stops it afterwards; a lock file keeps two commands from serving one record at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from govmesh.bus import Subjects
from govmesh.config import key_prefix, public_url
from govmesh.errors import ConfigError, StateError
from govmesh.runtime import RedisServer
from govmesh.runtime._home import home_dir
from govmesh.scenarios._runs import RunManifest, load_manifest, save_manifest

__all__ = [
    "AuditTarget",
    "audit_target",
    "keep_run",
    "kept_run",
    "kept_runs",
    "load_resumable",
    "open_kept",
    "parse_duration",
    "prune_kept",
    "record_dir",
    "records_dir",
]

log = logging.getLogger(__name__)

_REDIS: Final = "redis"
_LOCK: Final = ".lock"
_PRUNE_LOG: Final = "prune.log"
_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def records_dir() -> Path:
    """``$GOVMESH_HOME/records``: where finished runs keep their records."""
    return home_dir() / "records"


def record_dir(run_id: str) -> Path:
    """The kept record of run ``run_id``."""
    return records_dir() / run_id


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30d``, ``12h``, ``90m``, ``45s`` or ``2w``.

    Raises:
        ConfigError: ``text`` is not a number followed by one of s, m, h, d, w.
    """
    found = _DURATION.match(text)
    if found is None:
        raise ConfigError(f"expected a duration such as 30d, 12h or 90m, got {text!r}")
    return float(found.group(1)) * _UNIT_S[found.group(2)]


def keep_run(workdir: Path, manifest: RunManifest) -> Path:
    """Keep a finished run's Redis data and manifest as its record; remove ``workdir``.

    Call once the run's servers have stopped (the data is then flushed to disk).
    Returns the record's directory.
    """
    target = record_dir(manifest.run_id)
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = workdir / _REDIS
    if data.is_dir():
        shutil.rmtree(target / _REDIS, ignore_errors=True)
        shutil.move(data, target / _REDIS)
    save_manifest(target, msgspec.structs.replace(manifest, finished_at=time.time()))
    shutil.rmtree(workdir, ignore_errors=True)
    return target


def load_resumable(workdir: Path) -> RunManifest:
    """The manifest of the stopped run in ``workdir``, to resume it.

    Raises:
        ConfigError: the run finished (its record is kept), or there is no such run.
    """
    kept = record_dir(workdir.name)
    if not workdir.exists() and (kept / "run.json").exists():
        raise ConfigError(
            f"run {workdir.name!r} finished; there is nothing to resume. Its record is kept "
            f"in {kept}: `govmesh audit show WORKFLOW --run {workdir.name}`"
        )
    return load_manifest(workdir)


def kept_runs() -> list[RunManifest]:
    """Every kept run, the latest finished last; unreadable records are skipped."""
    found = []
    directory = records_dir()
    for entry in sorted(directory.iterdir()) if directory.is_dir() else ():
        if not entry.is_dir():
            continue
        try:
            found.append(load_manifest(entry))
        except ConfigError as exc:
            log.warning("skipping %s: %s", entry, exc)
    return sorted(found, key=lambda m: (m.finished_at, m.run_id))


def kept_run(run_id: str | None) -> RunManifest:
    """The kept run ``run_id``, or with None the one that finished last.

    Raises:
        ConfigError: no such run is kept here.
    """
    if run_id is not None:
        if not (record_dir(run_id) / "run.json").exists():
            raise ConfigError(
                f"no kept run {run_id!r} under {records_dir()} (see `govmesh audit runs`); "
                "GOVMESH_HOME must be the one the run used"
            )
        return load_manifest(record_dir(run_id))
    runs = kept_runs()
    if not runs:
        raise ConfigError(
            f"no finished run is kept under {records_dir()}; give --run RUN_ID, or "
            "--redis-url and --tenant of a running deployment"
        )
    return runs[-1]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the record's lock: one command at a time serves or removes a record."""
    with (directory / _LOCK).open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(
                f"the record {directory} is open in another govmesh command; try again once it ends"
            ) from None
        yield


@contextlib.contextmanager
def open_kept(manifest: RunManifest) -> Iterator[str]:
    """Serve the kept run's Redis data on an embedded server; yields its URL.

    The server is stopped when the block ends, however it ends. Start it on a long-lived
    thread (see `govmesh.runtime.Runtime`).

    Raises:
        ConfigError: the run used an external Redis, so its record holds no data.
        StateError: another command has the record open.
    """
    directory = record_dir(manifest.run_id)
    data = directory / _REDIS
    if not data.is_dir():
        raise ConfigError(
            f"run {manifest.run_id!r} kept no Redis data in {directory}: it used an external "
            "Redis; audit it there with --redis-url and --tenant"
        )
    with _locked(directory), RedisServer(workdir=data) as server:
        yield server.url


def prune_kept(older_than_s: float, *, now: float, dry_run: bool = False) -> list[RunManifest]:
    """Remove the kept runs that finished more than ``older_than_s`` before ``now``, each
    listed first in ``records/prune.log``; with ``dry_run`` only say which.

    Returns the runs removed (or that would be).

    Raises:
        StateError: one of them is open in another command (those before it are removed).
    """
    old = [m for m in kept_runs() if (m.finished_at or m.started_at) < now - older_than_s]
    if dry_run:
        return old
    for m in old:
        directory = record_dir(m.run_id)
        with _locked(directory):
            entry = {
                "pruned_at": now,
                "older_than_s": older_than_s,
                **msgspec.to_builtins(m),
            }
            with (records_dir() / _PRUNE_LOG).open("ab") as f:
                f.write(msgspec.json.encode(entry) + b"\n")
            shutil.rmtree(directory)
    return old


@dataclass(frozen=True, kw_only=True)
class AuditTarget:
    """The Redis an audit command reads, and whose records.

    Attributes:
        redis_url: the Redis to read.
        tenant: whose records.
        prefix: the tenant's key prefix.
        run: the kept run served, None for a deployment's own Redis.
        latest: the run was not named; it is the one that finished last.
    """

    redis_url: str
    tenant: str
    prefix: str
    run: RunManifest | None = None
    latest: bool = False

    @property
    def source(self) -> dict[str, object]:
        """Where the records come from, as an evidence bundle names it."""
        if self.run is None:
            return {"redis_url": public_url(self.redis_url), "run": None}
        return {"redis_url": None, "run": msgspec.to_builtins(self.run)}


@contextlib.contextmanager
def audit_target(
    *, run_id: str | None, redis_url: str | None, tenant: str | None
) -> Iterator[AuditTarget]:
    """What an audit command reads: the Redis at ``redis_url`` (``tenant`` needed), else the
    kept run ``run_id``, else the kept run that finished last, served by an embedded server
    for the duration of the block (`open_kept`); the tenant comes from the run's manifest.

    Raises:
        ConfigError: both or neither of a URL and a tenant, a run and a URL, no such run, or
            a tenant other than the run's.
        StateError: another command has the run's record open.
    """
    if redis_url and run_id:
        raise ConfigError(f"give --run {run_id} or --redis-url {public_url(redis_url)}, not both")
    if redis_url:
        if not tenant:
            raise ConfigError(f"--tenant is needed with --redis-url {public_url(redis_url)}")
        yield AuditTarget(
            redis_url=redis_url, tenant=tenant, prefix=key_prefix(Subjects(tenant).tenant)
        )
        return
    run = kept_run(run_id)
    if tenant and run.tenant and tenant != run.tenant:
        raise ConfigError(f"run {run.run_id!r} is of tenant {run.tenant!r}, not {tenant!r}")
    name = tenant or run.tenant
    if not name:
        raise ConfigError(f"run {run.run_id!r} does not name its tenant; give --tenant")
    with open_kept(run) as url:
        yield AuditTarget(
            redis_url=url,
            tenant=name,
            prefix=key_prefix(Subjects(name).tenant),
            run=run,
            latest=run_id is None,
        )
