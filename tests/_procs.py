"""Find processes by an environment marker or by open files, to prove nothing was left running.

An environment marker (``GOVMESH_TEST_MARK=<uuid>`` in a child's environment) is inherited by
everything the child starts. Some programs overwrite their environment block with their
process title, though: Ray's agents and workers (``ray::…``) do, so find those by the files
they hold open in Ray's session directory instead.
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

MARK_VAR = "GOVMESH_TEST_MARK"


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def processes_with_marker(mark: str, *, var: str = MARK_VAR) -> list[int]:
    """Pids of live processes whose environment has ``var=mark`` (zombies have none)."""
    entry = f"{var}={mark}".encode()
    found = []
    for pid in _pids():
        try:
            environ = Path("/proc", str(pid), "environ").read_bytes()
        except OSError:
            continue
        if entry in environ.split(b"\0"):
            found.append(pid)
    return found


def processes_using(directory: str | Path) -> list[int]:
    """Pids of live processes with a file open, or their working directory, under `directory`."""
    prefix = os.path.join(os.path.realpath(directory), "")
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid == me:
            continue
        proc = Path("/proc", str(pid))
        try:
            targets = [os.readlink(proc / "cwd")]
            targets += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(os.path.join(target, "").startswith(prefix) for target in targets):
            found.append(pid)
    return found


def process_names(pids: list[int]) -> list[str]:
    """The command names (``/proc/PID/comm``) of those `pids` that are still alive."""
    names = []
    for pid in pids:
        try:
            names.append(Path("/proc", str(pid), "comm").read_text().strip())
        except OSError:
            continue
    return names


def leftovers(mark: str, *, directory: str | Path | None = None) -> list[int]:
    """Processes carrying `mark`, plus those using `directory` when given."""
    pids = set(processes_with_marker(mark))
    if directory is not None:
        pids.update(processes_using(directory))
    return sorted(pids)


def wait_until_gone(
    mark: str, *, directory: str | Path | None = None, timeout: float = 30.0
) -> list[int]:
    """Poll until `leftovers` is empty; return what is still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (pids := leftovers(mark, directory=directory)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def port_below_ephemeral_range() -> int:
    """A port free now and outside the kernel's ephemeral range, which the servers and
    Ray's processes the run starts meanwhile take their own ports from (port 0): one from
    that range was taken by them before the run bound it."""
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for port in random.sample(range(20_000, min(low, 32_000)), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")
