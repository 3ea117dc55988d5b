"""The runtime: embedded servers start, serve, keep data, stop, and never outlive their owner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import redis

from govmesh.bus import Subjects
from govmesh.errors import ConfigError, RuntimeStartError
from govmesh.identity import ssl_context
from govmesh.runtime import NatsServer, RedisServer, Runtime, _process
from govmesh.runtime._home import _alive

from _procs import MARK_VAR, leftovers, process_names, processes_with_marker, wait_until_gone

SERVICE_ENV = ("GOVMESH_NATS_URL", "GOVMESH_REDIS_URL", "RAY_ADDRESS")

# Enters a Runtime, reports where its servers are, then waits to be signalled.
CHILD = """
import asyncio, json, sys
from govmesh.runtime import Runtime

async def main() -> None:
    async with Runtime(start_ray=sys.argv[1] == "ray", ray_num_cpus=1) as rt:
        session = str(rt.ray_session_dir) if rt.ray_session_dir else None
        report = {"workdir": str(rt.workdir), "embedded": rt.embedded, "ray_session": session}
        print(json.dumps(report), flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children_of_this_process() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(pid) for pid in (task / "children").read_text().split())
    return pids


@pytest.fixture
def no_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)


class Child:
    """A Python process running CHILD with a unique environment marker."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        self.mark = uuid.uuid4().hex
        self.ray_session: str | None = None
        self.workdir: str | None = None
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
        env[MARK_VAR] = self.mark
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        self.stderr_path = tmp_path / "child.stderr"
        with self.stderr_path.open("wb") as stderr:
            # Its own session, so killpg() reaches it and its group the way a terminal's
            # Ctrl-C reaches a foreground job, and nothing else in this test run.
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )

    def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else b""
        if not line:
            self.proc.kill()
            pytest.fail(f"child did not start:\n{self.stderr_path.read_text()[-3000:]}")
        report: dict[str, Any] = json.loads(line)
        self.ray_session = report["ray_session"]
        self.workdir = report["workdir"]
        return report

    def cleanup(self) -> None:
        """Kill whatever the test left alive, so one failure cannot leak into other tests."""
        self.proc.kill()
        self.proc.wait()
        for pid in leftovers(self.mark, directory=self.ray_session):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def child_factory(tmp_path: Path) -> Iterator[Callable[[str], Child]]:
    children: list[Child] = []

    def make(mode: str) -> Child:
        children.append(Child(tmp_path, mode))
        return children[-1]

    yield make
    for child in children:
        child.cleanup()


async def test_nats_server_serves_pubsub_and_jetstream(nats_server: NatsServer, prefix: str):
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe(f"{prefix}.greeting")
        await nc.publish(f"{prefix}.greeting", b"hello")
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"hello"
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()


async def test_nats_restart_keeps_port_and_jetstream_data(tmp_path: Path, prefix: str):
    with NatsServer(workdir=tmp_path) as server:
        port = server.port
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name=prefix, subjects=[f"{prefix}.>"])
        await js.publish(f"{prefix}.event", b"kept")
        await nc.close()

        server.restart()

        assert server.port == port
        nc = await nats.connect(server.url)
        try:
            msg = await nc.jetstream().get_msg(prefix, seq=1)
            assert msg.data == b"kept"
        finally:
            await nc.close()


def test_redis_server_answers_ping_and_keeps_data_across_restart(tmp_path: Path, prefix: str):
    with RedisServer(workdir=tmp_path) as server:
        url = server.url
        assert url.startswith("unix://govmesh:") and url.endswith(f"@{server.socket_path}?db=0")
        with redis.Redis.from_url(url) as client:
            assert client.ping()
            client.set(f"{prefix}:key", "kept")

        server.restart()

        assert server.url == url  # clients reconnect with what they have
        with redis.Redis.from_url(server.url) as client:
            assert client.get(f"{prefix}:key") == b"kept"
        private = server.socket_path.parent
    assert not private.exists(), "the socket and the secrets outlived the server"


def test_the_platform_user_of_redis_may_not_administer_it(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        for command in (("CONFIG", "SET", "dir", "/tmp"), ("FLUSHALL",), ("ACL", "LIST")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
    with redis.Redis.from_url(redis_server.admin_url) as admin:
        assert admin.acl_whoami() == "admin"


async def test_an_external_redis_without_a_password_is_refused_unless_accepted(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bare = f"unix://{redis_server.socket_path}?db=0"
    monkeypatch.setenv("GOVMESH_REDIS_URL", bare)
    monkeypatch.delenv("GOVMESH_REDIS_NO_AUTH", raising=False)
    with pytest.raises(ConfigError, match=r"has no password.*GOVMESH_REDIS_NO_AUTH=1"):
        async with Runtime(start_ray=False):
            pass

    monkeypatch.setenv("GOVMESH_REDIS_NO_AUTH", "1")
    with caplog.at_level("WARNING", logger="govmesh.runtime._runtime"):
        async with Runtime(start_ray=False) as rt:
            assert rt.redis_url == bare
    assert "has no password and GOVMESH_REDIS_NO_AUTH=1 accepts that" in caplog.text


@pytest.mark.parametrize("server_type", [NatsServer, RedisServer])
def test_stop_twice_is_safe_and_the_process_is_gone(tmp_path: Path, server_type: type[Any]):
    server = server_type(workdir=tmp_path)
    server.start()
    pid = server.pid
    assert pid is not None and pid_alive(pid)

    server.stop()
    server.stop()

    assert server.pid is None
    assert not pid_alive(pid)


def test_start_failure_quotes_the_server_log(tmp_path: Path):
    server = NatsServer(workdir=tmp_path, extra_config="bogus {{{")

    with pytest.raises(RuntimeStartError, match="exited with code") as caught:
        server.start()

    assert "Parse error" in str(caught.value)
    assert not server.running


def test_start_retries_when_the_free_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = _process.free_port
        monkeypatch.setattr(_process, "free_port", lambda: next(ports, None) or real_free_port())

        with NatsServer(workdir=tmp_path) as server:
            assert server.port not in (0, taken)


async def test_runtime_with_service_urls_starts_no_server(
    nats_server: NatsServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("GOVMESH_NATS_URL", nats_server.url)
    monkeypatch.setenv("GOVMESH_REDIS_URL", redis_server.url)
    before = children_of_this_process()

    async with Runtime(start_ray=False, insecure_bus=True) as rt:
        assert rt.nats_url == nats_server.url
        assert rt.redis_url == redis_server.url
        assert rt.embedded == {"nats": False, "redis": False, "ray": False}
        assert rt.nats_server is None and rt.redis_server is None
        assert rt.insecure_bus and rt.transport is None
        assert children_of_this_process() == before


async def test_an_external_nats_without_mutual_tls_is_refused_unless_accepted(
    nats_server: NatsServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("GOVMESH_NATS_URL", nats_server.url)
    monkeypatch.setenv("GOVMESH_REDIS_URL", redis_server.url)
    before = children_of_this_process()

    with pytest.raises(ConfigError, match=r"without mutual TLS.*--insecure-bus"):
        async with Runtime(start_ray=False):
            pass

    assert children_of_this_process() == before


async def test_runtime_rejects_a_malformed_service_url(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GOVMESH_NATS_URL", "http://127.0.0.1:4222")

    with pytest.raises(ConfigError, match=re.escape("'http://127.0.0.1:4222'")):
        async with Runtime(start_ray=False):
            pass


@pytest.mark.usefixtures("no_service_env")
async def test_embedded_runtime_serves_and_cleans_up_on_close(prefix: str):
    rt = Runtime(start_ray=False)
    async with rt:
        assert rt.embedded == {"nats": True, "redis": True, "ray": False}
        assert rt.nats_server is not None and rt.redis_server is not None
        pids = [rt.nats_server.pid, rt.redis_server.pid]
        assert rt.transport is not None
        cert = rt.transport.admit(f"coordinator-{prefix}", "coordinator", tenant=prefix)
        inbox = Subjects(prefix).inbox_prefix(cert.member_id)
        nc = await nats.connect(rt.nats_url, tls=ssl_context(cert), inbox_prefix=inbox)
        await nc.flush()  # a round trip over mutual TLS
        await nc.close()
        with redis.Redis.from_url(rt.redis_url) as client:
            assert client.ping()
        workdir = rt.workdir

    await rt.close()

    assert not any(pid_alive(pid) for pid in pids if pid is not None)
    assert not workdir.exists()


def interrupt(child: Child, how: str) -> None:
    if how == "SIGKILL":
        child.proc.kill()
    else:
        os.killpg(child.proc.pid, signal.SIGINT)
    child.proc.wait(timeout=30)


@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])
def test_interrupted_runtime_leaves_no_server_behind(
    child_factory: Callable[[str], Child], how: str
):
    child = child_factory("no-ray")
    report = child.ready()
    names = set(process_names(processes_with_marker(child.mark)))
    assert "nats-server" in names and names & {"valkey-server", "redis-server"}, names

    interrupt(child, how)

    survivors = wait_until_gone(child.mark)
    assert survivors == [], process_names(survivors)
    if how == "Ctrl-C":
        assert not Path(report["workdir"]).exists()


@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])
def test_interrupted_runtime_leaves_no_ray_process_behind(
    child_factory: Callable[[str], Child], how: str
):
    child = child_factory("ray")
    report = child.ready()
    assert report["embedded"]["ray"] and report["ray_session"]
    # Ray's agents and workers erase the marker with their process title; they hold files
    # open in the session directory.
    names = process_names(leftovers(child.mark, directory=report["ray_session"]))
    assert {"raylet", "gcs_server"} <= set(names), names
    assert any(name.startswith("ray::") for name in names), names

    interrupt(child, how)

    # Without the reaper Ray's agents linger for about a minute; it should take seconds.
    survivors = wait_until_gone(child.mark, directory=report["ray_session"], timeout=40)
    reaper_log = Path(report["workdir"], "ray-reaper.log")
    log_text = reaper_log.read_text() if reaper_log.exists() else ""
    assert survivors == [], (process_names(survivors), log_text)


@pytest.mark.usefixtures("no_service_env", "ray_session")
async def test_runtime_reuses_an_initialised_ray_and_leaves_it_running():
    import ray

    async with Runtime() as rt:
        assert rt.embedded["ray"] is False
        assert rt.ray_address == ray.get_runtime_context().gcs_address

    assert ray.is_initialized()


def test_runtime_urls_before_start_raise():
    with pytest.raises(RuntimeStartError, match="not started"):
        _ = Runtime().nats_url


def test_runtime_rejects_zero_cpus():
    with pytest.raises(ConfigError, match="0"):
        Runtime(ray_num_cpus=0)


@pytest.mark.usefixtures("no_service_env")
async def test_cancelled_task_still_stops_embedded_servers():
    entered = asyncio.Event()
    holder: dict[str, list[int | None]] = {}

    async def body() -> None:
        async with Runtime(start_ray=False) as rt:
            assert rt.nats_server is not None and rt.redis_server is not None
            holder["pids"] = [rt.nats_server.pid, rt.redis_server.pid]
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert not any(pid_alive(pid) for pid in holder["pids"] if pid is not None)


def test_a_deployment_shows_its_redis_url_without_the_password() -> None:
    from govmesh.config import Deployment

    dep = Deployment(
        tenant="acme",
        nats_url="nats://127.0.0.1:4222",
        redis_url="rediss://govmesh:s3cret@redis.example:6380/0",
        audience="govmesh:acme",
        issuers=(),
    )
    assert "s3cret" not in repr(dep) and "govmesh:***@redis.example:6380" in repr(dep)
    assert dep.redis_url.endswith("s3cret@redis.example:6380/0")  # still usable


def test_a_process_that_exited_unreaped_runs_no_deployment() -> None:
    """A run that exited but whose parent has not waited for it yet (a zombie) still
    answers a signal; its deployment is over all the same, so streams and watchers end."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 30
        while stat.read_text().split(")")[-1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(child.pid, 0)  # it still answers a signal
        assert not _alive(child.pid)
        assert _alive(os.getpid())
    finally:
        child.wait()
