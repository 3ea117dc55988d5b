"""Child server processes: spawn, wait until ready, stop, and never leave one behind.

Three layers keep a server from outliving the process that started it:

1. `spawn` asks the kernel (``PR_SET_PDEATHSIG``) to SIGKILL the child when its parent dies,
   which covers SIGKILL of the parent, where nothing in Python gets to run.
2. An `atexit` hook stops whatever is still registered when the interpreter exits normally.
3. `EmbeddedServer.stop` (and the Runtime's ``close``) stop children in order on the way out.

Children start in their own session. A terminal's Ctrl-C goes to the whole foreground
process group; if the servers were in it they would die at once, while the parent may still
be flushing audit events to NATS or snapshots to Redis. In their own session they get
SIGTERM from the parent once it is done, and the death signal still covers a parent crash.

``PR_SET_PDEATHSIG`` fires when the *thread* that spawned the child exits, not only the
process. Start servers (and enter a Runtime) on a thread that lives as long as they should:
the main thread in the CLI and in tests. Never start them inside ``asyncio.to_thread``.

Processes this module does not spawn itself (Ray's raylet, agents and workers) are guarded by
a `Reaper`: a sentinel process that, once its owner closes it or dies, kills exactly the
processes carrying the owner's environment marker or holding files in a watched directory.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

from govmesh.errors import RuntimeStartError

__all__ = [
    "REAPER_MARKER_VAR",
    "EmbeddedServer",
    "Reaper",
    "free_port",
    "log_tail",
    "marked_processes",
    "read_log",
    "reaper_main",
    "register_atexit",
    "spawn",
    "terminate",
    "unregister_atexit",
]

log = logging.getLogger(__name__)

STOP_TIMEOUT: Final = 10.0
LOG_TAIL_LINES: Final = 20
_POLL_INTERVAL: Final = 0.05
_PORT_ATTEMPTS: Final = 3
_PR_SET_PDEATHSIG: Final = 1
_BIND_FAILURE: Final = "address already in use"
_RETITLED_PREFIX: Final = "ray::"

REAPER_MARKER_VAR: Final = "GOVMESH_REAPER_MARK"
"""Environment variable whose value ties a process to one `Reaper`."""


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl: Callable[..., int] = libc.prctl
    return prctl


# Resolved once here: the pre-exec hook runs between fork and exec and must not load libraries.
_prctl: Final = _load_prctl()


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path | None = None,
    die_with_parent: bool = True,
    stdin: int | None = subprocess.DEVNULL,
    environ: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child process in its own session, stdout and stderr appended to `log_path`.

    Output goes to a file, never to a pipe: a pipe that nobody reads fills up and blocks the
    server mid-write.

    Args:
        argv: program and arguments.
        log_path: file that receives the child's stdout and stderr.
        cwd: working directory of the child.
        die_with_parent: have the kernel SIGKILL the child when the calling thread exits.
        stdin: what the child reads; ``subprocess.PIPE`` hands the caller the write end.
        environ: variables set for the child on top of this process's environment.

    Raises:
        RuntimeStartError: the program cannot be executed.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    preexec = _die_with_parent(os.getpid()) if die_with_parent else None
    with log_path.open("ab") as out:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, **environ} if environ else None,
                start_new_session=True,
                preexec_fn=preexec,
            )
        except OSError as exc:
            raise RuntimeStartError(f"cannot execute {argv[0]!r}: {exc}") from exc
    log.debug("started %s (pid %d), log %s", argv[0], proc.pid, log_path)
    return proc


def terminate(proc: subprocess.Popen[bytes], *, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM `proc`, wait up to `timeout` seconds, then SIGKILL it and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
        proc.kill()
        proc.wait()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def read_log(path: Path, *, offset: int = 0) -> str:
    """Return the text of `path` from byte `offset` on ("" if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, *, lines: int = LOG_TAIL_LINES, offset: int = 0) -> str:
    """Return the last `lines` lines of `path` written after byte `offset` ("" if none)."""
    return "\n".join(read_log(path, offset=offset).splitlines()[-lines:])


_atexit_cleanups: dict[int, Callable[[], None]] = {}


def register_atexit(owner: object, cleanup: Callable[[], None]) -> None:
    """Run `cleanup` at interpreter exit unless `unregister_atexit(owner)` is called first.

    Cleanups run newest first, so an owner registered after its parts stops them in its order.
    """
    _atexit_cleanups.pop(id(owner), None)
    _atexit_cleanups[id(owner)] = cleanup


def unregister_atexit(owner: object) -> None:
    """Forget the cleanup registered for `owner`, if any."""
    _atexit_cleanups.pop(id(owner), None)


@atexit.register
def _run_atexit_cleanups() -> None:
    while _atexit_cleanups:
        key = next(reversed(_atexit_cleanups))
        cleanup = _atexit_cleanups.pop(key)
        try:
            cleanup()
        except Exception:
            log.exception("cleanup at exit failed")


class EmbeddedServer(ABC):
    """A server binary run as a child process on a free 127.0.0.1 port (or on a Unix
    socket of its own, when `uses_port` is False).

    Subclasses say how to run the binary (`_argv`) and when it is ready (`_is_ready`); this
    class owns the port choice, readiness wait, stop, restart and exit-time cleanup. A
    context manager: entering starts the server (if not running), leaving stops it.

    Attributes:
        workdir: directory owned by this server (config, data, log).
        port: the TCP port; 0 until the first `start`, then kept across restarts; always 0
            for a server that does not listen on TCP.
    """

    name: str = "server"
    """Human-readable name of the binary, used in log lines and errors."""
    uses_port: bool = True
    """Whether the server listens on a TCP port that `start` picks."""

    def __init__(self, *, workdir: Path) -> None:
        """Prepare, but do not start, a server.

        Args:
            workdir: directory owned by this server; created on start if missing.
        """
        self.workdir = Path(workdir)
        self.port = 0
        self._started = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def log_path(self) -> Path:
        """The file that receives the server's log, stdout and stderr."""
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @abstractmethod
    def _argv(self) -> list[str]:
        """Prepare files in `workdir` for `self.port` and return the command line."""

    def _environ(self) -> dict[str, str]:
        """Variables the server runs with on top of this process's environment."""
        return {}

    @abstractmethod
    def _is_ready(self) -> bool:
        """Whether the server, just started, accepts clients; must not block for long."""

    @property
    def address(self) -> str:
        """Where clients connect, for log lines and errors: ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def _require_started(self) -> int:
        if not self._started:
            raise RuntimeStartError(f"{self.name} in {str(self.workdir)!r} was never started")
        return self.port

    def _new_log_text(self) -> str:
        """Log text written since the current process was started."""
        return read_log(self.log_path, offset=self._log_offset)

    def start(self, *, timeout: float = 15.0) -> None:
        """Start the server and block until it accepts clients; no-op when it is running.

        The first start picks a free port and retries with another one if it was taken in
        the meantime; later starts reuse the port so clients can reconnect.

        Raises:
            RuntimeStartError: the server exited or was not ready within `timeout` seconds;
                the message ends with the last lines of its log.
        """
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = _PORT_ATTEMPTS if self.uses_port and not self._started else 1
        for attempt in range(1, attempts + 1):
            if attempts > 1:
                self.port = free_port()
            try:
                self._start_once(timeout)
            except RuntimeStartError:
                bind_failed = _BIND_FAILURE in self._new_log_text().lower()
                if not bind_failed or attempt == attempts:
                    raise
                log.info("%s: port %d was taken, trying another", self.name, self.port)
            else:
                self._started = True
                return

    def _start_once(self, timeout: float) -> None:
        argv = self._argv()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc = spawn(argv, log_path=self.log_path, cwd=self.workdir, environ=self._environ())
        self._proc = proc
        register_atexit(self, self.stop)
        try:
            self._wait_ready(proc, timeout)
        except BaseException:  # includes Ctrl-C while waiting: never keep a half-started server
            self.stop()
            raise
        log.info("%s ready on %s (pid %d)", self.name, self.address, proc.pid)

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._is_ready():
            code = proc.poll()
            if code is not None:
                raise self._start_error(f"exited with code {code}")
            if time.monotonic() > deadline:
                raise self._start_error(f"was not ready after {timeout:g} s")
            time.sleep(_POLL_INTERVAL)

    def _start_error(self, what: str) -> RuntimeStartError:
        tail = log_tail(self.log_path, offset=self._log_offset) or "(log is empty)"
        return RuntimeStartError(
            f"{self.name} on {self.address} {what}; last lines of {str(self.log_path)!r}:\n{tail}"
        )

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait, then SIGKILL. Safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        terminate(proc)
        self._proc = None
        unregister_atexit(self)
        log.debug("%s (pid %d) stopped", self.name, proc.pid)

    def restart(self) -> None:
        """Stop and start again on the same port with the same data directory."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server for good: `stop`, and whatever a subclass keeps only for a
        restart. Safe to call twice."""
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self.port}, pid={self.pid}, workdir={self.workdir})"


def _proc_ids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _start_time(pid: int) -> int | None:
    """The start time of a live process (with its pid, a unique identity); None if gone."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name, which may itself contain spaces.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _has_marker(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path("/proc", str(pid), "environ").read_bytes().split(b"\0")
    except OSError:
        return False  # exited meanwhile, or not ours to read


def _holds_file_under(pid: int, directories: Sequence[str]) -> bool:
    fd_dir = Path("/proc", str(pid), "fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if any(target.startswith(directory) for directory in directories):
            return True
    return False


def marked_processes(value: str, *, directories: Sequence[str] = ()) -> list[int]:
    """Pids of the processes a `Reaper` with marker `value` and watched `directories` owns.

    A process is owned when its environment holds ``REAPER_MARKER_VAR=value``, or when its
    name starts with ``ray::`` and it holds a file open under one of `directories`: Ray's
    agents and workers write their title over their environment block, erasing the marker.
    """
    entry = f"{REAPER_MARKER_VAR}={value}".encode()
    prefixes = [os.path.join(directory, "") for directory in directories]
    found = []
    for pid in _proc_ids():
        if _has_marker(pid, entry):
            found.append(pid)
            continue
        if not prefixes:
            continue
        try:
            name = Path("/proc", str(pid), "comm").read_text()
        except OSError:
            continue
        if name.startswith(_RETITLED_PREFIX) and _holds_file_under(pid, prefixes):
            found.append(pid)
    return found


def _reap(value: str, directories: Sequence[str], *, spare: set[int], grace: float) -> None:
    """SIGTERM every owned process, give them `grace` seconds, SIGKILL what is left.

    Each process is tracked by pid and start time, so a process that rewrites its environment
    while shutting down is still followed, and a recycled pid is never signalled. Rescans
    each round, so a worker forked while its raylet was dying is caught too.
    """
    started = time.monotonic()
    known: dict[int, int] = {}
    while time.monotonic() - started < grace + STOP_TIMEOUT:
        late = time.monotonic() - started > grace
        for pid in marked_processes(value, directories=directories):
            start_time = _start_time(pid)
            if pid in spare or pid in known or start_time is None:
                continue
            known[pid] = start_time
            log.info("terminating pid %d", pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        known = {pid: st for pid, st in known.items() if _start_time(pid) == st}
        if not known:
            return
        if late:
            for pid in known:
                log.warning("pid %d outlived SIGTERM by %.0f s; killing it", pid, grace)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    log.error("pids %s survived SIGKILL; giving up", sorted(known))


def reaper_main() -> None:
    """Entry point of the reaper process; arguments: marker value, grace seconds.

    Reads directories to watch, one per line, from stdin until end of file, which comes when
    the owner closes the pipe or dies; then kills every process the owner owns.
    """
    value, grace = sys.argv[1], float(sys.argv[2])
    owner = os.getppid()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s reaper[%(process)d] %(levelname)s %(message)s"
    )
    # Ctrl-C belongs to the owner; the reaper must survive it to clean up after it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log.info("watching processes of pid %d marked %s=%s", owner, REAPER_MARKER_VAR, value)
    directories = []
    for line in sys.stdin.buffer:
        directories.append(line.rstrip(b"\n").decode())
        log.info("watching files under %s", directories[-1])
    log.info("owner closed the pipe or died; killing what it owned")
    _reap(value, directories, spare={os.getpid(), owner}, grace=grace)
    log.info("done")


class Reaper:
    """A sentinel process that kills this owner's processes once the owner is done or dead.

    For processes the owner cannot give a death signal itself because a library spawns them:
    Ray's raylet, agents and workers, which outlive a SIGKILLed driver by about a minute.
    Start them with `environ` in their environment and pass Ray's session directory to
    `watch`. The reaper holds the read end of a pipe whose write end only the owner has; when
    the owner calls `close`, or dies by any means, the pipe reports end of file and the reaper
    SIGTERMs, then SIGKILLs, exactly those processes (see `marked_processes`) and nothing else.

    Attributes:
        marker: the value of ``REAPER_MARKER_VAR`` that this reaper owns.
    """

    def __init__(self, *, log_path: Path, grace: float = 2.0) -> None:
        """Start the sentinel process.

        Args:
            log_path: file for the sentinel's log.
            grace: seconds between SIGTERM and SIGKILL for the owned processes.
        """
        self.marker = uuid.uuid4().hex
        package_root = str(Path(__file__).resolve().parents[2])
        code = (
            f"import sys; sys.path.insert(0, {package_root!r}); "
            "from govmesh.runtime._process import reaper_main; reaper_main()"
        )
        argv = [sys.executable, "-c", code, self.marker, str(grace)]
        # No death signal: the reaper's job starts when the owner dies.
        self._proc: subprocess.Popen[bytes] | None = spawn(
            argv, log_path=log_path, die_with_parent=False, stdin=subprocess.PIPE
        )
        register_atexit(self, self.close)

    @property
    def environ(self) -> dict[str, str]:
        """The environment entry that marks a process as this reaper's."""
        return {REAPER_MARKER_VAR: self.marker}

    def watch(self, directory: Path) -> None:
        """Also reap ``ray::`` processes holding files open under `directory`."""
        pipe = self._proc.stdin if self._proc is not None else None
        if pipe is None:
            raise RuntimeStartError(f"reaper {self.marker} is closed; cannot watch {directory}")
        pipe.write(f"{directory}\n".encode())
        pipe.flush()

    def close(self, *, timeout: float = STOP_TIMEOUT * 2) -> None:
        """Have the reaper kill the owned processes now, and wait for it. Safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        pipe: IO[bytes] | None = proc.stdin
        if pipe is not None:
            pipe.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("reaper (pid %d) still busy after %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()
        self._proc = None
        unregister_atexit(self)
