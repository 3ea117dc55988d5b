"""A Unix socket a process serves to local clients of its own user (enrolment, admission)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import socket
import struct
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from govmesh.errors import ConfigError

__all__ = ["UnixSocketServer", "peer_uid", "reply_and_close"]

log = logging.getLogger(__name__)

# sockaddr_un's sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107


class UnixSocketServer(abc.ABC):
    """Serves a Unix socket at `path`, 0600, to the clients the kernel lets connect; a
    subclass answers each connection in `_serve` (and checks `peer_uid` where it must).

    A socket left by a process that was killed is replaced; one that another live process
    serves is an error. `close` removes the socket; it is safe to call twice.

    Args:
        path: where to serve the socket, in a directory only this user may enter.
        limit: the largest line a connection's reader takes, in bytes.
    """

    def __init__(self, path: Path, *, limit: int) -> None:
        self.path = Path(path)
        self._limit = limit
        self._server: asyncio.Server | None = None

    @property
    def serving(self) -> bool:
        """Whether the socket is served now."""
        return self._server is not None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Serve the socket at `path`, replacing one left by a killed process.

        Raises:
            ConfigError: the path is too long for a Unix socket, or a live process serves it.
        """
        size = len(os.fsencode(self.path))
        if size > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"{self.path}: {size} bytes is too long for a Unix socket (at most "
                f"{_MAX_SOCKET_PATH}); set GOVMESH_HOME to a shorter directory"
            )
        if self.path.exists() or self.path.is_symlink():
            await _clear_stale(self.path)
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=self._limit
        )
        # The directory is 0700 already, so the moment before this chmod exposes nothing.
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop serving and remove the socket. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        await server.wait_closed()

    @abc.abstractmethod
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one connection."""


async def reply_and_close(writer: asyncio.StreamWriter, line: bytes, *, timeout_s: float) -> None:
    """Send a connection's one answer, `line`, and close it; a client that left or does
    not read within `timeout_s` misses the answer, which is logged, not raised."""
    try:
        writer.write(line + b"\n")
        await asyncio.wait_for(writer.drain(), timeout_s)
    except (OSError, TimeoutError) as exc:
        log.info("answer on %s not delivered: %s", writer.get_extra_info("sockname"), exc)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The uid of the process at the other end, where the kernel says (Linux)."""
    sock = writer.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


async def _clear_stale(path: Path) -> None:
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody listens: left by a process that was killed.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    except OSError as exc:
        raise ConfigError(f"{path}: cannot tell whether it is in use: {exc}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise ConfigError(f"{path}: another live process serves this socket")
