"""Ray's token authentication, for the Ray cluster a Runtime starts and for whoever joins it.

Ray 2.59 and later start a local cluster with token authentication on unless
``RAY_AUTH_MODE=disabled``: every process and node that joins must then present the
cluster's token, and Ray asks for it only when ``RAY_AUTH_MODE=token`` is set in the
joining process's environment (``RAY_AUTH_TOKEN``, or a file named by
``RAY_AUTH_TOKEN_PATH``; see https://docs.ray.io/en/latest/ray-security/token-auth.html).
A cluster a Runtime starts gets a token of its own, in a file only this user can read in
the Runtime's directory, so nothing is written to ``~/.ray`` and the token ends with the
cluster; `RayAuth.joining` is what another process or ``ray start`` needs to join it.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from govmesh.errors import ConfigError
from govmesh.runtime._home import write_private

__all__ = [
    "ENV_RAY_AUTH_MODE",
    "ENV_RAY_AUTH_TOKEN",
    "ENV_RAY_AUTH_TOKEN_PATH",
    "RayAuth",
    "joining_hint",
]

ENV_RAY_AUTH_MODE: Final = "RAY_AUTH_MODE"
ENV_RAY_AUTH_TOKEN: Final = "RAY_AUTH_TOKEN"
ENV_RAY_AUTH_TOKEN_PATH: Final = "RAY_AUTH_TOKEN_PATH"
_TOKEN_FILE: Final = "ray-auth-token"


@dataclass(frozen=True, kw_only=True)
class RayAuth:
    """How the Ray cluster of a Runtime authenticates who joins it.

    Attributes:
        mode: Ray's ``RAY_AUTH_MODE``: ``token``, or what the user chose instead
            (``disabled``: anyone who reaches the cluster may run code on it).
        token: the cluster's token in ``token`` mode; a secret, like a password.
        start_environ: what the Runtime sets while it starts the cluster.
    """

    mode: str
    token: str = ""
    start_environ: dict[str, str]

    @classmethod
    def for_new_cluster(cls, workdir: Path) -> RayAuth:
        """The authentication of a cluster about to be started with `workdir` as the
        Runtime's directory: ``$RAY_AUTH_MODE`` if the user chose one other than
        ``token``; else token mode with ``$RAY_AUTH_TOKEN``, the token in
        ``$RAY_AUTH_TOKEN_PATH``, or a new one written 0600 to `workdir`.

        Raises:
            ConfigError: ``$RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is
                empty.
        """
        mode = os.environ.get(ENV_RAY_AUTH_MODE, "").strip().lower() or "token"
        if mode != "token":
            return cls(mode=mode, start_environ={})
        # RAY_AUTH_MODE stays as the user left it: when unset, Ray turns token mode on
        # itself for a new local cluster, and only then does this process follow it.
        token = os.environ.get(ENV_RAY_AUTH_TOKEN, "").strip()
        if token:
            return cls(mode=mode, token=token, start_environ={})
        given = os.environ.get(ENV_RAY_AUTH_TOKEN_PATH, "").strip()
        if given:
            try:
                token = Path(given).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"{ENV_RAY_AUTH_TOKEN_PATH}={given!r}: cannot read Ray's token: {exc.strerror}"
                ) from None
            if not token:
                raise ConfigError(f"{ENV_RAY_AUTH_TOKEN_PATH}={given!r}: the file is empty")
            return cls(mode=mode, token=token, start_environ={})
        token = secrets.token_hex(32)
        path = workdir / _TOKEN_FILE
        write_private(path, token.encode())
        return cls(mode=mode, token=token, start_environ={ENV_RAY_AUTH_TOKEN_PATH: str(path)})

    @property
    def joining(self) -> dict[str, str]:
        """What a process (``RAY_ADDRESS`` and these) or a node (``ray start --address``
        with these in its environment) needs to join the cluster; the token among them
        is a secret."""
        if self.mode != "token":
            return {ENV_RAY_AUTH_MODE: self.mode}
        return {ENV_RAY_AUTH_MODE: "token", ENV_RAY_AUTH_TOKEN: self.token}


def joining_hint() -> str:
    """What to say when joining a Ray cluster failed and this process did not present a
    token; empty when it did."""
    if os.environ.get(ENV_RAY_AUTH_MODE, "").strip().lower() == "token":
        return ""
    return (
        f"; a cluster with Ray's token authentication (the default of Ray's local clusters "
        f"and of `govmesh up`) needs {ENV_RAY_AUTH_MODE}=token and {ENV_RAY_AUTH_TOKEN} (or "
        f"{ENV_RAY_AUTH_TOKEN_PATH}) in the environment: `govmesh up` writes them to its join "
        "file, and a cluster started with `ray start` takes them from whoever started it "
        "(`ray get-auth-token`)"
    )
