"""A lean Redis connection for hot paths: one pipelined connection, replies parsed by hiredis.

redis-py's asyncio client spends about 100 us of CPU on every round trip here (a PING takes
108 us against 10 us over a bare protocol on this two-core machine, measured with
``hiredis``); governance makes one round trip per group of decisions, and that overhead was
the larger part of a decision's latency. `RespConnection` writes commands straight to the
transport and matches replies to callers in order, so many callers share one connection
without waiting for each other.

It serves scripts (`RespConnection.script`) and plain commands; everything else keeps using
redis-py. Errors are redis-py's (`redis.exceptions`), so callers handle both alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Final, cast

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from govmesh.config import public_url

__all__ = ["RespConnection", "RespScript"]

_CONNECT_TIMEOUT_S: Final = 10.0

Arg = str | bytes | int | float


def _encode(args: Sequence[Arg]) -> bytes:
    """One command in the Redis protocol: an array of bulk strings, a float as its `repr`.

    hiredis packs it in C: for a group of decisions (some thirty arguments each) that costs
    less than half of building it in Python. It takes no other types (not even a bool).
    """
    # hiredis's type stub says a tuple of one item; it takes any number.
    return cast(bytes, hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]


def _ssl_context(options: Mapping[str, Any]) -> ssl.SSLContext:
    """The TLS settings of a ``rediss://`` URL, read as redis-py reads them: the CA to trust
    (``ssl_ca_certs``, default the system's), a client certificate (``ssl_certfile``,
    ``ssl_keyfile``) and whether the host name is checked (``ssl_check_hostname``)."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    if options.get("ssl_check_hostname") is False:
        context.check_hostname = False
    return context


class _Protocol(asyncio.Protocol):
    """Matches each reply to the oldest caller still waiting, as Redis answers in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.WriteTransport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not derive from asyncio's classes.)
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            waiter = self.waiting.popleft()
            if waiter.done():  # its caller was cancelled
                continue
            if isinstance(reply, ResponseError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(self.lost)


class RespConnection:
    """One connection to a Redis-protocol server, opened on first use and again after it was
    lost; calls in flight when it is lost fail with redis-py's ``ConnectionError`` (the server
    may or may not have run them), later calls open a new one.

    Args:
        url: a ``redis://``, ``rediss://`` or ``unix://`` URL, as redis-py reads it
            (user, password, database and, for ``rediss://``, ``ssl_ca_certs``,
            ``ssl_certfile``, ``ssl_keyfile`` and ``ssl_check_hostname`` included).
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._options = parse_url(url)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._closed:
            raise RedisConnectionError("the connection to Redis is closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            protocol = self._protocol
            if protocol is None or protocol.lost is not None:
                protocol = self._protocol = await self._open()
        return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self._options
        kind = options.get("connection_class")
        try:
            if kind is UnixDomainSocketConnection:
                _, protocol = await asyncio.wait_for(
                    loop.create_unix_connection(_Protocol, options["path"]), _CONNECT_TIMEOUT_S
                )
            else:
                _, protocol = await asyncio.wait_for(
                    loop.create_connection(
                        _Protocol,
                        options.get("host", "localhost"),
                        int(options.get("port", 6379)),
                        ssl=_ssl_context(options) if kind is SSLConnection else None,
                    ),
                    _CONNECT_TIMEOUT_S,
                )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(
                f"cannot connect to Redis at {public_url(self._url)!r}: {exc}"
            ) from exc
        password, username = options.get("password"), options.get("username")
        if password:
            await self._send(protocol, ("AUTH", *((username,) if username else ()), password))
        if options.get("db"):
            await self._send(protocol, ("SELECT", int(options["db"])))
        return protocol

    @staticmethod
    def _send(protocol: _Protocol, args: Sequence[Arg]) -> asyncio.Future[Any]:
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        assert protocol.transport is not None
        protocol.transport.write(_encode(args))
        protocol.waiting.append(waiter)
        return waiter

    async def call(self, *args: Arg) -> Any:
        """Run one command and return its reply (bytes, int, list or None).

        Raises:
            redis.exceptions.ResponseError: the server refused the command.
            redis.exceptions.ConnectionError: no connection, or it was lost before the reply.
        """
        protocol = await self._connected()
        return await self._send(protocol, args)

    def send(self, *args: Arg) -> Awaitable[Any]:
        """Like `call`, but the command is written before this returns when the connection is
        open, so the caller can work while the reply is on its way; await the result for the
        reply."""
        protocol = self._protocol
        if protocol is not None and protocol.lost is None and protocol.transport is not None:
            return self._send(protocol, args)
        return self.call(*args)

    def script(self, text: str) -> RespScript:
        """A Lua script to run by its hash, loaded into the server when it is missing."""
        return RespScript(self, text)

    async def close(self) -> None:
        """Close the connection; calls in flight fail. Safe to call twice."""
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


class RespScript:
    """A Lua script run with ``EVALSHA``; on ``NOSCRIPT`` (a restarted server) it is loaded
    and run again, which is safe as the script never ran."""

    def __init__(self, connection: RespConnection, text: str) -> None:
        self._connection = connection
        self._text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, *, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run the script on ``keys`` and ``args`` and return its reply."""
        return await self.send(keys=keys, args=args)

    def send(self, *, keys: Sequence[Arg], args: Sequence[Arg]) -> Awaitable[Any]:
        """Run the script, written at once as `RespConnection.send` writes; await the result
        for the reply."""
        return self._finish(
            self._connection.send("EVALSHA", self.sha, len(keys), *keys, *args), keys, args
        )

    async def _finish(self, sent: Awaitable[Any], keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await sent
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self._connection.call("SCRIPT", "LOAD", self._text)
        return await self._connection.call("EVALSHA", self.sha, len(keys), *keys, *args)
