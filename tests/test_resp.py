"""The lean Redis connection used on governance's decision path, against a real server."""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from govmesh.identity import DeploymentCA
from govmesh.runtime._resp import RespConnection


async def test_concurrent_callers_each_get_their_own_reply(redis_server, prefix) -> None:
    connection = RespConnection(redis_server.url)
    try:
        values = [f"value-{n}".encode() * (n % 7 + 1) for n in range(300)]
        await asyncio.gather(
            *(connection.call("SET", f"{prefix}:k{n}", v) for n, v in enumerate(values))
        )
        got = await asyncio.gather(*(connection.call("GET", f"{prefix}:k{n}") for n in range(300)))
        counts = await asyncio.gather(*(connection.call("INCR", f"{prefix}:n") for _ in range(50)))
    finally:
        await connection.close()
    assert got == values
    assert sorted(counts) == list(range(1, 51))


async def test_an_error_reply_raises_and_the_connection_stays_usable(redis_server, prefix) -> None:
    connection = RespConnection(redis_server.url)
    try:
        await connection.call("SET", f"{prefix}:text", "not a number")
        with pytest.raises(ResponseError, match="not an integer"):
            await connection.call("INCR", f"{prefix}:text")
        assert await connection.call("GET", f"{prefix}:text") == b"not a number"
    finally:
        await connection.close()


async def test_a_script_missing_from_the_server_is_loaded_and_run(redis_server, prefix) -> None:
    connection = RespConnection(redis_server.url)
    script = connection.script("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}")
    try:
        await connection.call("SCRIPT", "FLUSH")
        first = await script(keys=[f"{prefix}:a"], args=[b"x", 41])
        again = await script(keys=[f"{prefix}:b"], args=["y", 1.5])
    finally:
        await connection.close()
    assert first == [f"{prefix}:a".encode(), b"x", 42]
    assert again == [f"{prefix}:b".encode(), b"y", 2]  # Lua numbers reply as integers


async def test_a_float_reaches_the_server_as_its_repr(redis_server, prefix) -> None:
    # The decision script compares the figures it is sent with those it holds: a float must
    # arrive with every digit, as Python's repr writes it.
    floats = [0.1, 1 / 3, 1e12, 5e-324, 1.7976931348623157e308, 100.0, -2.5, 1765100000.123456]
    connection = RespConnection(redis_server.url)
    try:
        for n, value in enumerate(floats):
            await connection.call("SET", f"{prefix}:f{n}", value)
        got = [await connection.call("GET", f"{prefix}:f{n}") for n in range(len(floats))]
    finally:
        await connection.close()
    assert got == [repr(value).encode() for value in floats]


async def test_send_writes_the_command_before_it_returns(redis_server, prefix) -> None:
    import redis as blocking

    connection = RespConnection(redis_server.url)
    script = connection.script("redis.call('SET', KEYS[1], ARGV[1]) return 1")
    other = blocking.Redis.from_url(redis_server.url)
    try:
        await script(keys=[f"{prefix}:loaded"], args=["first"])  # opened, and loaded
        sent = connection.send("SET", f"{prefix}:plain", "written")
        ran = script.send(keys=[f"{prefix}:scripted"], args=["written"])
        # Neither was awaited, and this event loop has not run since: the server has them
        # only if both were written before `send` returned.
        deadline = time.monotonic() + 5.0
        while other.exists(f"{prefix}:plain", f"{prefix}:scripted") < 2:
            assert time.monotonic() < deadline, "the commands were not written"
        assert await sent == b"OK"
        assert await ran == 1
    finally:
        other.close()
        await connection.close()


async def test_a_lost_connection_fails_what_was_in_flight_and_is_opened_again(
    redis_server, prefix
) -> None:
    connection = RespConnection(redis_server.url)
    admin = aioredis.Redis.from_url(redis_server.admin_url)
    try:
        client_id = await connection.call("CLIENT", "ID")
        blocked = asyncio.ensure_future(connection.call("BLPOP", f"{prefix}:never", 0))
        await asyncio.sleep(0.1)
        assert await admin.client_kill_filter(_id=client_id) == 1
        with pytest.raises(RedisConnectionError, match="lost"):
            await blocked
        assert await connection.call("PING") == b"PONG"
    finally:
        await connection.close()
        await admin.aclose()


async def test_the_database_in_the_url_is_selected(redis_server, prefix) -> None:
    url = redis_server.url.removesuffix("?db=0") + "?db=3"
    connection = RespConnection(url)
    admin = aioredis.Redis.from_url(url)
    try:
        await connection.call("SET", f"{prefix}:in-3", "yes")
        assert await admin.get(f"{prefix}:in-3") == b"yes"
    finally:
        await connection.close()
        await admin.aclose()


async def test_a_closed_connection_refuses_calls(redis_server) -> None:
    connection = RespConnection(redis_server.url)
    await connection.call("PING")
    await connection.close()
    await connection.close()
    with pytest.raises(RedisConnectionError, match="closed"):
        await connection.call("PING")


async def test_a_failed_connect_names_the_server_but_not_its_password(tmp_path) -> None:
    connection = RespConnection(f"unix://govmesh:s3cret@{tmp_path}/none.sock?db=0")
    with pytest.raises(RedisConnectionError) as caught:
        await connection.call("PING")
    assert "govmesh:***@" in str(caught.value) and "s3cret" not in str(caught.value)


async def test_a_rediss_url_is_served_over_tls_with_its_own_ca(
    redis_server, tmp_path, prefix
) -> None:
    # A TLS front for the embedded server, as a managed Redis with a private CA would be.
    ca = DeploymentCA.create("redis-tls")
    cert_pem, key_pem = ca.server_cert()
    for name, data in (("ca.pem", ca.ca_pem), ("cert.pem", cert_pem), ("key.pem", key_pem)):
        (tmp_path / name).write_bytes(data)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        inner_reader, inner_writer = await asyncio.open_unix_connection(redis_server.socket_path)
        await asyncio.gather(pipe(reader, inner_writer), pipe(inner_reader, writer))

    front = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    port = front.sockets[0].getsockname()[1]
    password = urlsplit(redis_server.url).password
    url = f"rediss://govmesh:{password}@127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.pem'}"
    connection = RespConnection(url)
    reader = aioredis.Redis.from_url(url)
    try:
        await connection.call("SET", f"{prefix}:tls", "yes")
        assert await reader.get(f"{prefix}:tls") == b"yes"
    finally:
        await connection.close()
        await reader.aclose()
        front.close()
