"""The Runtime: embedded nats-server, Redis-protocol server and Ray, or external ones."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from govmesh.config import MAX_REPLICAS, nats_servers, public_url
from govmesh.errors import ConfigError, RuntimeStartError
from govmesh.runtime._admission import ENV_NATS_ADMISSION, admitted_transport
from govmesh.runtime._latency import CpuLatencyHold, LowLatency
from govmesh.runtime._nats import NatsServer
from govmesh.runtime._process import Reaper, register_atexit, unregister_atexit
from govmesh.runtime._rayauth import RayAuth, joining_hint
from govmesh.runtime._redis import RedisServer
from govmesh.runtime._transport import ENV_NATS_CA, ENV_NATS_CA_KEY, Transport

__all__ = [
    "ENV_NATS_REPLICAS",
    "ENV_NATS_URL",
    "ENV_RAY_ADDRESS",
    "ENV_REDIS_NO_AUTH",
    "ENV_REDIS_URL",
    "Runtime",
]

log = logging.getLogger(__name__)

ENV_NATS_URL: Final = "GOVMESH_NATS_URL"
ENV_NATS_REPLICAS: Final = "GOVMESH_NATS_REPLICAS"
"""JetStream replicas of the streams a deployment creates on external NATS (default 1; 3 on
a three-node NATS cluster)."""
ENV_REDIS_URL: Final = "GOVMESH_REDIS_URL"
ENV_RAY_ADDRESS: Final = "RAY_ADDRESS"
ENV_REDIS_NO_AUTH: Final = "GOVMESH_REDIS_NO_AUTH"
"""Set to ``1`` to accept an external Redis URL without a password (see `Runtime`)."""
_NATS_SCHEMES: Final = ("nats://", "tls://", "ws://", "wss://")
_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")
_T = TypeVar("_T")


def _external_url(var: str, schemes: tuple[str, ...]) -> str | None:
    """The URL in environment variable `var`, None when unset or empty."""
    value = os.environ.get(var, "").strip()
    if not value:
        return None
    # A NATS cluster's servers are comma-separated (see nats_servers); each must be a URL.
    for part in nats_servers(value) if var == ENV_NATS_URL else [value]:
        if not part.startswith(schemes):
            raise ConfigError(
                f"{var}={public_url(value)!r}: expected a URL starting with {' or '.join(schemes)}"
            )
    return value


def _replicas(external: bool) -> int:
    """``$GOVMESH_NATS_REPLICAS`` (external NATS only; an embedded server is one node)."""
    value = os.environ.get(ENV_NATS_REPLICAS, "").strip()
    if not value:
        return 1
    if not external:
        raise ConfigError(
            f"{ENV_NATS_REPLICAS}={value!r} needs {ENV_NATS_URL}: the embedded nats-server is "
            "one node and keeps one replica"
        )
    if not value.isdigit() or not 1 <= int(value) <= MAX_REPLICAS:
        raise ConfigError(
            f"{ENV_NATS_REPLICAS}={value!r}: expected a number of replicas from 1 to "
            f"{MAX_REPLICAS} (3 on a three-node NATS cluster)"
        )
    return int(value)


def _check_redis_auth(url: str) -> None:
    """Refuse an external Redis URL without a password unless ``GOVMESH_REDIS_NO_AUTH=1``
    says that is meant, and warn then: whoever reaches such a server can rewrite committed
    spend, approvals and the ledger, which voids every limit governance enforces."""
    if urlsplit(url).password:
        return
    if os.environ.get(ENV_REDIS_NO_AUTH, "").strip() != "1":
        raise ConfigError(
            f"{ENV_REDIS_URL}={url!r} has no password: whoever reaches that server can "
            "rewrite committed spend, approvals and the ledger. Give the credentials of an "
            "ACL user (redis://USER:PASSWORD@HOST:PORT/0, rediss://... for TLS, or "
            f"unix://USER:PASSWORD@/PATH?db=0), or set {ENV_REDIS_NO_AUTH}=1 to run on it "
            "anyway"
        )
    log.warning(
        "%s=%r has no password and %s=1 accepts that: anyone who reaches that server can "
        "rewrite committed spend, approvals and the ledger",
        ENV_REDIS_URL,
        url,
        ENV_REDIS_NO_AUTH,
    )


@contextlib.contextmanager
def _environ(updates: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


_RAY_AUTH_LOG: Final = "ray._private.authentication.authentication_token_setup"
"""Ray's logger that warns, on every start, that token authentication is on: govmesh
says how to join instead (`RayAuth.joining`)."""


def _init_ray(**options: Any) -> None:
    """``ray.init(**options)``, so that a Ctrl-C or SIGTERM that comes while Ray starts
    waits until it is up, then stops govmesh in order as at any other moment.

    ``ray.init`` handles SIGTERM itself, twice over (measured by SIGTERMs at random moments
    of ``govmesh run``'s start):

    - it sets a Python handler that raises `SystemExit` wherever the process is: the run
      exits with status 15, half started;
    - the driver's core worker installs Abseil's failure-signal handler, for SIGTERM too,
      which prints a stack trace and aborts (status -6): nothing is stopped in order.

    Ray has no setting for the first, so its handler is not set while this runs; the
    second is turned off by Ray's own switch, read when the core worker starts (Ray's
    workers keep theirs). A SIGTERM then only wakes the event loop, whose handler (see
    ``govmesh.cli``) cancels the run once this returns.

    Not on a thread of its own, where Ray sets no handler either: measured here, its
    ``ray.shutdown`` then takes 5 s instead of 1.4 s, and right after the start it could
    wait forever for its error listener. Nor with the signals blocked there: the servers
    Ray starts would inherit the mask, and ``ray.shutdown``'s SIGTERM would not stop them.
    """
    import ray
    from ray._private import ray_constants, utils

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    own = utils.set_sigterm_handler
    utils.set_sigterm_handler = _keep_sigterm
    try:
        ray.init(**options)
    finally:
        utils.set_sigterm_handler = own


def _keep_sigterm(handler: Any) -> None:
    """Ray's handler is not set: govmesh's own stops what it started (`_init_ray`)."""


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Only errors of `logger` for the duration of the block."""
    log_ = logging.getLogger(logger)
    level = log_.level
    log_.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log_.setLevel(level)


class Runtime:
    """The services a govmesh deployment needs: NATS, a Redis-protocol server and Ray.

    Each service is external when configured (``GOVMESH_NATS_URL``, ``GOVMESH_REDIS_URL``,
    ``RAY_ADDRESS``) and embedded otherwise. ``GOVMESH_NATS_URL`` may name every server of
    a NATS cluster, comma-separated, and ``GOVMESH_NATS_REPLICAS`` how many JetStream
    replicas the deployment's streams get there (`nats_replicas`). Embedded are a
    nats-server with JetStream on a free 127.0.0.1 port, a Valkey (or redis-server) on a
    private Unix socket with a password (see `RedisServer`), and a local Ray instance. A
    Ray that is already initialised in this process is reused and left running. An
    external Redis URL must carry credentials (``redis://USER:PASSWORD@...``); one without
    is refused unless ``GOVMESH_REDIS_NO_AUTH=1``, and then warned about on every start.
    `redis_url` holds the password: log it only through `govmesh.config.public_url`.

    With ``secure=True`` (the default) the embedded nats-server requires mutual TLS and maps
    each client certificate to a user with its role's permissions; members join through
    `transport` (``rt.transport.admit(...)``). With external NATS, `transport` comes from
    the admission socket of the ``govmesh up`` that serves it (``GOVMESH_NATS_ADMISSION``,
    see `admitted_transport`) or from the operator's files (``GOVMESH_NATS_CA`` and
    friends, see `Transport`); external NATS with neither is refused unless
    ``insecure_bus=True``.

    Asked to (``low_latency="on"``, `CpuLatencyHold`), the Runtime holds this machine's CPUs
    awake while it runs, and its embedded nats-server runs its Go code on one thread: a
    message then wakes the process it is for without waiting for a halted CPU. Otherwise
    it changes nothing of the machine's power state and nats-server uses Go's default
    thread count. Other machines of a cluster get the same from their operating system's
    tuning (tuned's latency-performance profile).

    Use ``async with Runtime() as rt:``. Entering blocks the event loop while the services
    start (a few seconds with Ray): the servers are spawned from the calling thread on
    purpose, because the kernel kills them when that thread exits, so enter a Runtime on a
    long-lived thread (the main thread in the CLI and tests), never in ``asyncio.to_thread``.

    Nothing it starts outlives it: leaving the block, Ctrl-C or task cancellation stop
    everything (`close` does not await, so a cancellation cannot cut it short); if the process
    is SIGKILLed, the servers get SIGKILL from the kernel and Ray's processes are killed by a
    sentinel process (see `Reaper`).

    Attributes:
        embedded: which of ``"nats"``, ``"redis"`` and ``"ray"`` this Runtime started itself.
        ray_address: the Ray cluster in use (GCS address or ``RAY_ADDRESS``); None without Ray.
        ray_session_dir: session directory (logs) of the Ray instance this Runtime started.
        ray_auth: how the Ray instance this Runtime started authenticates who joins it
            (Ray's token authentication unless ``RAY_AUTH_MODE`` says otherwise); None
            when it joined a cluster or reused Ray, or runs without Ray.
        nats_server: the embedded nats-server, None when NATS is external.
        transport: the deployment CA and member registry; None when not secure, or on an
            insecure bus.
        insecure_bus: this Runtime runs on external NATS without mutual TLS, as the
            caller accepted (``insecure_bus=True``).
        redis_server: the embedded Redis-protocol server, None when Redis is external.
        nats_replicas: JetStream replicas of the deployment's streams (1 unless
            ``GOVMESH_NATS_REPLICAS`` says otherwise for external NATS).
    """

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        start_ray: bool = True,
        ray_num_cpus: int | None = None,
        secure: bool = True,
        low_latency: str | None = None,
        insecure_bus: bool = False,
    ) -> None:
        """Configure, but do not start, a Runtime.

        Args:
            workdir: directory for embedded servers' config, data and logs; by default a
                fresh temporary directory, removed on close.
            start_ray: connect to or start Ray; False for processes that only use the bus
                and the state store.
            ray_num_cpus: CPUs for a local Ray instance; default all of this machine's.
            secure: run the embedded nats-server with mutual TLS and per-role permissions;
                False serves plain NATS to anyone on 127.0.0.1.
            low_latency: hold this machine's CPUs awake while the Runtime runs (see
                `CpuLatencyHold`): ``on`` or ``off``; default ``$GOVMESH_LOW_LATENCY``,
                else ``off``.
            insecure_bus: accept external NATS without mutual TLS (neither
                ``GOVMESH_NATS_ADMISSION`` nor ``GOVMESH_NATS_CA``), which is refused
                otherwise; `insecure_bus` then says so for every report.

        Raises:
            ConfigError: `ray_num_cpus` is less than 1, or `low_latency` is not a mode.
        """
        if ray_num_cpus is not None and ray_num_cpus < 1:
            raise ConfigError(f"ray_num_cpus must be at least 1, got {ray_num_cpus!r}")
        self._hold = CpuLatencyHold(low_latency)
        self._workdir_option = workdir
        self._start_ray = start_ray
        self._secure = secure
        self._insecure_bus = insecure_bus
        self.insecure_bus = False
        self._ray_num_cpus = ray_num_cpus
        self._stack = ExitStack()
        self._entered = False
        self._workdir: Path | None = None
        self._nats_url: str | None = None
        self._redis_url: str | None = None
        self.embedded: dict[str, bool] = {"nats": False, "redis": False, "ray": False}
        self.ray_address: str | None = None
        self.ray_session_dir: Path | None = None
        self.ray_auth: RayAuth | None = None
        self.nats_server: NatsServer | None = None
        self.transport: Transport | None = None
        self.redis_server: RedisServer | None = None
        self.nats_replicas = 1

    @property
    def low_latency(self) -> LowLatency:
        """Whether this Runtime holds the machine's CPUs awake now, and why (not)."""
        return self._hold.state

    @property
    def nats_url(self) -> str:
        """URL of the NATS server(s) in use; valid once entered."""
        return self._require(self._nats_url)

    @property
    def redis_url(self) -> str:
        """URL of the Redis-protocol server in use, with its password; valid once entered.
        Never log it as it is (`govmesh.config.public_url` masks the password)."""
        return self._require(self._redis_url)

    @property
    def workdir(self) -> Path:
        """Directory of the embedded servers' config, data and logs; valid once entered."""
        return self._require(self._workdir)

    @staticmethod
    def _require(value: _T | None) -> _T:
        if value is None:
            raise RuntimeStartError("Runtime is not started; use `async with Runtime() as rt:`")
        return value

    async def __aenter__(self) -> Runtime:
        """Start or connect to every service.

        Raises:
            ConfigError: an external service URL in the environment is malformed.
            RuntimeStartError: a service failed to start; whatever had started is stopped.
        """
        if self._entered:
            raise RuntimeStartError("a Runtime can be entered only once")
        self._entered = True
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        register_atexit(self, self._close_now)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop everything this Runtime started, newest first. Safe to call twice.

        Blocks the event loop until done (about a second with Ray) and awaits nothing, so
        cancelling the calling task cannot leave a service half-stopped.
        """
        self._close_now()

    def _close_now(self) -> None:
        unregister_atexit(self)
        self._stack.close()

    def _start(self) -> None:
        # Read before starting anything so a malformed URL starts nothing.
        nats_url = _external_url(ENV_NATS_URL, _NATS_SCHEMES)
        redis_url = _external_url(ENV_REDIS_URL, _REDIS_SCHEMES)
        self.nats_replicas = _replicas(external=nats_url is not None)
        if redis_url is not None:
            _check_redis_auth(redis_url)
        if nats_url is not None and self._secure:
            admission = os.environ.get(ENV_NATS_ADMISSION, "").strip()
            if admission:
                self.transport = admitted_transport(Path(admission))
            else:
                self.transport = Transport.from_environment()
            if self.transport is None:
                self._refuse_or_accept_insecure_bus(nats_url)
        workdir = self._make_workdir()
        if nats_url is not None and self.transport and self.transport.callout:
            self._stack.callback(self.transport.callout.close)
            self.transport.callout.start(nats_url)
        self._hold.acquire()
        self._stack.callback(self._hold.release)

        if nats_url is None:
            if self._secure:
                self.transport, nats = Transport.embedded(workdir / "nats")
            else:
                nats = NatsServer(workdir=workdir / "nats")
            if self._hold.held:
                # On one thread a message passes from the connection that read it to the one
                # that writes it without waking another core (docs/policies.md).
                nats.go_threads = 1
            self._stack.callback(nats.stop)
            nats.start()
            self.nats_server, self.embedded["nats"], nats_url = nats, True, nats.url
        self._nats_url = nats_url

        if redis_url is None:
            redis = RedisServer(workdir=workdir / "redis")
            self._stack.callback(redis.close)
            redis.start()
            self.redis_server, self.embedded["redis"], redis_url = redis, True, redis.url
        self._redis_url = redis_url

        if self._start_ray:
            self._start_or_join_ray(workdir)
        log.info(
            "runtime ready: nats %s, redis %s, ray %s (embedded: %s); low latency %s",
            self._nats_url,
            public_url(self._redis_url),
            self.ray_address,
            ", ".join(name for name, own in self.embedded.items() if own) or "none",
            self.low_latency.detail,
        )

    def _refuse_or_accept_insecure_bus(self, nats_url: str) -> None:
        """External NATS without mutual TLS: refused unless the caller accepted it
        (``insecure_bus``), and warned about on every start then."""
        risk = (
            "any client that reaches it reads every message of every workflow and may "
            "publish on any subject (signatures still expose forgeries, not eavesdropping)"
        )
        if not self._insecure_bus:
            raise ConfigError(
                f"{ENV_NATS_URL}={public_url(nats_url)!r} without mutual TLS: {risk}. Join a "
                f"`govmesh up` with the {ENV_NATS_ADMISSION} it prints, give its operator's "
                f"CA in {ENV_NATS_CA} (with {ENV_NATS_CA_KEY} to admit members), or pass "
                "--insecure-bus (insecure_bus=True from Python) to run on it anyway"
            )
        log.warning("insecure bus: NATS at %s without mutual TLS: %s", nats_url, risk)
        self.insecure_bus = True

    def _make_workdir(self) -> Path:
        if self._workdir_option is not None:
            workdir = Path(self._workdir_option)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(tempfile.mkdtemp(prefix="govmesh-"))
            # Pushed first, so it runs last: after every server has stopped writing there.
            self._stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        self._workdir = workdir
        return workdir

    def _start_or_join_ray(self, workdir: Path) -> None:
        import ray  # deferred: a second of import time that bus-only commands do not need

        if ray.is_initialized():
            self.ray_address = ray.get_runtime_context().gcs_address
            return
        address = os.environ.get(ENV_RAY_ADDRESS, "").strip()
        if address:
            self._stack.callback(ray.shutdown)
            # A cluster's workers do not inherit this process's environment (the embedded
            # instance's do): hand on where their telemetry goes (see configure_telemetry).
            telemetry = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
            try:
                _init_ray(
                    address=address,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                    configure_logging=False,
                    runtime_env={"env_vars": telemetry} if telemetry else None,
                )
            except ConnectionError as exc:
                raise RuntimeStartError(
                    f"cannot join the Ray cluster at {ENV_RAY_ADDRESS}={address!r}: {exc}"
                    + joining_hint()
                ) from None
            self.ray_address = address
            return
        auth = RayAuth.for_new_cluster(workdir)
        # Ray keeps the token it loaded first for the life of the process; a cluster
        # started after another one here must be joined with its own. (Ray's own
        # `ray get-auth-token --generate` resets it the same way; Ray before 2.52 has no
        # token authentication.)
        from ray import _raylet

        loader = getattr(_raylet, "AuthenticationTokenLoader", None)
        if loader is not None:
            loader.instance().reset_cache()
        # Ray's raylet starts agents and workers that outlive a killed driver by about a
        # minute; each inherits this environment, so the reaper can find exactly them.
        reaper = Reaper(log_path=workdir / "ray-reaper.log")
        self._stack.callback(reaper.close)
        self._stack.callback(ray.shutdown)
        with _environ(reaper.environ | auth.start_environ), _quiet(_RAY_AUTH_LOG):
            try:
                _init_ray(
                    # A new instance even when a node of another cluster runs on this
                    # machine: Ray would join the one `ray start` last recorded in its
                    # temporary directory, without RAY_ADDRESS naming it.
                    address="local",
                    num_cpus=self._ray_num_cpus or os.cpu_count(),
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                    configure_logging=False,
                )
            except Exception as exc:
                raise RuntimeStartError(f"local Ray instance failed to start: {exc}") from exc
        self.embedded["ray"] = True
        self.ray_auth = auth
        self.ray_address = ray.get_runtime_context().gcs_address
        self.ray_session_dir = _ray_session_dir()
        if self.ray_session_dir is not None:
            reaper.watch(self.ray_session_dir)


def _ray_session_dir() -> Path | None:
    """The session directory of the Ray instance this process started, if Ray says."""
    # Ray has no public accessor; this private one has been stable across 2.x releases.
    try:
        from ray._private import worker

        node: Any = getattr(worker, "_global_node", None)
        return Path(node.get_session_dir_path())
    except Exception:
        log.warning("cannot find Ray's session directory; its agents may outlive a crash")
        return None
