"""A Ray cluster of separate ``ray start`` processes on this machine, with Ray's token
authentication on: a head node for govmesh's platform actors and worker nodes for its
agents, started with the commands ``docs/deployment.md`` gives, read from it (plus
``--block``, so each node is one process group the test can kill, free ports, and what two
nodes on one machine need)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

from govmesh.runtime._process import free_port

RAY = str(Path(sysconfig.get_path("scripts")) / "ray")
GUIDE = Path(__file__).parent.parent / "docs" / "deployment.md"
_GUIDE_PORT = 6379
_STARTED = "Ray runtime started"
# A node that dies is noticed after period x threshold (15 s by default); a test waits less.
_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}


def guide_commands() -> dict[str, list[str]]:
    """The arguments of the head's and a worker's ``ray start`` in ``docs/deployment.md``
    ("By hand"), so the test runs what the guide says."""
    starts = [
        shlex.split(line)[2:]
        for line in GUIDE.read_text().splitlines()
        if line.startswith("ray start ")
    ]
    return {
        "head": next(a for a in starts if "--head" in a),
        "worker": next(a for a in starts if any(x.startswith("--address=") for x in a)),
    }


class RayCluster:
    """Ray nodes started with ``ray start --block``, each in a session of its own.

    Use as a context manager: entering starts the head and one worker and sets the token
    variables in this process's environment (for ``ray.init``); leaving kills every node
    and restores the environment, even when the test failed.

    Attributes:
        address: the head's GCS address, what ``RAY_ADDRESS`` names.
        token: the cluster's authentication token.
    """

    def __init__(self) -> None:
        # Ray's Unix sockets live under the temp dir, whose path must stay short.
        self._dir = Path(tempfile.mkdtemp(prefix="gmray-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.address = f"127.0.0.1:{free_port()}"
        self._nodes: list[subprocess.Popen[bytes]] = []
        self._saved: dict[str, str | None] = {}
        self.worker: subprocess.Popen[bytes] | None = None

    @property
    def environ(self) -> dict[str, str]:
        """What every node and every process joining the cluster needs."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _start(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self._dir / f"{name}.log", "wb")  # noqa: SIM115 - the node writes it
        proc = subprocess.Popen(
            [RAY, "start", *argv, "--block", "--disable-usage-stats"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.environ, **_HEALTH_CHECKS},
            start_new_session=True,
        )
        log.close()
        self._nodes.append(proc)
        return proc

    def _log(self, name: str) -> str:
        return (self._dir / f"{name}.log").read_text(errors="replace")

    def _spawn_head(self) -> None:
        """The guide's ``ray start --head``; returns at once."""
        port = self.address.rsplit(":", 1)[1]
        argv = [a.replace(f"={_GUIDE_PORT}", f"={port}") for a in guide_commands()["head"]]
        self._start(
            [
                *argv,
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--include-dashboard=false",
                f"--temp-dir={self._dir}",
            ],
            "head",
        )

    def _spawn_worker(self) -> str:
        """The guide's ``ray start --address``; returns the node's name at once."""
        name = f"worker-{len(self._nodes)}"
        guide = f"=<head>:{_GUIDE_PORT}"
        argv = [a.replace(guide, f"={self.address}") for a in guide_commands()["worker"]]
        self.worker = self._start(
            [
                *argv,
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                # Every node of a machine would take the same default port.
                f"--dashboard-agent-listen-port={free_port()}",
            ],
            name,
        )
        return name

    async def add_worker(self) -> None:
        """Start another worker node and wait, without blocking the event loop, until it
        is up: what the autoscaler does when a worker node is lost."""
        await self.started(self._spawn_worker())

    def _wait_started(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while _STARTED not in self._log(name):
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{self._log(name)[-3000:]}")
            time.sleep(0.1)

    async def started(self, name: str, timeout: float = 60.0) -> None:
        """Wait, without blocking the event loop, until node `name` is up."""
        deadline = time.monotonic() + timeout
        while _STARTED not in self._log(name):
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{self._log(name)[-3000:]}")
            await asyncio.sleep(0.1)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a node: its raylet, its agents and the workers of its actors."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def __enter__(self) -> RayCluster:
        self._saved = {name: os.environ.get(name) for name in self.environ}
        os.environ.update(self.environ)
        _reload_ray_auth()
        try:
            # The worker waits for the head's GCS by itself: both start at once.
            self._spawn_head()
            worker = self._spawn_worker()
            self._wait_started("head")
            self._wait_started(worker)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every node (workers first), remove their files, restore the environment."""
        for proc in reversed(self._nodes):
            self.kill(proc)
        self._nodes.clear()
        shutil.rmtree(self._dir, ignore_errors=True)
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Make this process's Ray read its authentication mode and token from the environment
    again: it reads them once, on import, and a test changes them afterwards (as Ray's own
    ``_enable_token_auth`` does)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
