"""What a scenario run records, so a stopped run can be resumed and a finished one audited.

- ``<run dir>/run.json``: the run's `RunManifest`: scenario, seed, workflow count, tenant;
  kept with the run's record once it finished (see `govmesh.scenarios._records`).
- ``<tenant prefix>:run:<run_id>:done`` in Redis: hash, workflow -> the `Outcome` its
  entry agent answered (msgpack), as each ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import cast

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from govmesh.agents.messages import Outcome
from govmesh.errors import ConfigError

__all__ = ["RunManifest", "RunRecords", "load_manifest", "new_run_id", "save_manifest"]

log = logging.getLogger(__name__)

_MANIFEST = "run.json"


def new_run_id() -> str:
    """A fresh run id: 8 hex digits."""
    return uuid.uuid4().hex[:8]


class RunManifest(msgspec.Struct, frozen=True, kw_only=True):
    """What a run was asked to do, enough to do the rest of it again.

    Attributes:
        scenario: the scenario file's absolute path; empty for an app.
        app: the app's name (``package.module:app``) when it was run with ``--app``.
        app_dir: the folder the app's module was found from.
        manual_approvals: escalations were left to operators.
        tenant: the scenario's tenant (whose keys the run's Redis holds).
        finished_at: when every workflow had finished (0: not yet).
        refused: messages of the event stream the audit refused (forged, replayed,
            malformed) by the time every workflow had finished.
    """

    run_id: str
    scenario: str
    seed: int
    workflows: int
    concurrency: int
    manual_approvals: bool = False
    started_at: float = 0.0
    tenant: str = ""
    finished_at: float = 0.0
    refused: int = 0
    app: str = ""
    app_dir: str = ""


def save_manifest(directory: Path, manifest: RunManifest) -> None:
    """Keep what the run is asked to do in its directory."""
    (directory / _MANIFEST).write_bytes(msgspec.json.encode(manifest))


def load_manifest(directory: Path) -> RunManifest:
    """What the run of this directory was asked to do.

    Raises:
        ConfigError: there is no run there, or its manifest is unreadable.
    """
    path = directory / _MANIFEST
    try:
        return msgspec.json.decode(path.read_bytes(), type=RunManifest)
    except FileNotFoundError:
        raise ConfigError(
            f"no run {directory.name!r} under {directory.parent}: runs that finished leave "
            "nothing to resume, and GOVMESH_HOME must be the one the run used"
        ) from None
    except (OSError, msgspec.DecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


class RunRecords:
    """One run's records in Redis.

    Args:
        redis_url: the deployment's Redis.
        prefix: the tenant's key prefix.
        run_id: the run.
    """

    def __init__(self, redis_url: str, prefix: str, run_id: str) -> None:
        self.run_id = run_id
        self._redis = aioredis.Redis.from_url(redis_url)
        self._done = f"{prefix}:run:{run_id}:done"

    async def finished(self) -> dict[str, Outcome]:
        """How the workflows of the run that ended ended, by id."""
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(self._done))
        decoder = msgspec.msgpack.Decoder(Outcome)
        return {k.decode(): decoder.decode(v) for k, v in raw.items()}

    async def finish(self, workflow: str, done: Outcome) -> None:
        """Record a workflow's end, trying for a while if Redis is restarting; a record
        that cannot be written only means a resumed run asks its entry agent again."""
        deadline = time.monotonic() + 30.0
        while True:
            try:
                await self._redis.hset(self._done, workflow, msgspec.msgpack.encode(done))
                return
            except (RedisError, ConnectionError) as exc:
                if time.monotonic() > deadline:
                    log.warning("end of %s not recorded: %s", workflow, exc)
                    return
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        """Close the connection."""
        await self._redis.aclose()
