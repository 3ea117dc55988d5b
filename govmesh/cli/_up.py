"""``govmesh up``: run the platform until Ctrl-C."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from govmesh.cli._common import console, out, run_async
from govmesh.cli._root import cli

if TYPE_CHECKING:
    from govmesh.runtime import Runtime

_SECRET_NAMES: Final = ("RAY_AUTH_TOKEN",)
"""Joining variables whose whole value is a secret: printed masked, written to the file."""
_ADMISSION_SOCKET: Final = "admission.sock"


@cli.command()
def up() -> None:
    """Run embedded nats-server, Redis-protocol server and Ray until Ctrl-C.

    The nats-server requires mutual TLS, and its CA's key stays in this process: another
    process of this user joins through its admission socket (GOVMESH_NATS_ADMISSION),
    which registers that process's members on the server and signs their certificates
    for keys they make themselves, so `govmesh run` keeps mutual TLS and signed messages.
    The Ray cluster uses Ray's token authentication unless RAY_AUTH_MODE says otherwise.

    Prints what another process needs to join (GOVMESH_NATS_URL, GOVMESH_NATS_ADMISSION,
    GOVMESH_REDIS_URL, RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN), the secrets masked,
    and writes them whole to a file only this user may read. A Ray node joins with those
    variables in its environment and `ray start --address=$RAY_ADDRESS`.
    """
    from govmesh.runtime import AdmissionServer, Runtime

    async def serve() -> None:
        async with Runtime() as rt:
            assert rt.transport is not None  # the embedded server is mutual TLS
            # In the Runtime's own directory (0700), so only this user reaches it.
            async with AdmissionServer(rt.workdir / _ADMISSION_SOCKET, rt.transport):
                _announce(rt)
                await asyncio.Event().wait()

    run_async(serve())


def _announce(rt: Runtime) -> None:
    """Print what a process or a Ray node needs to join `rt`, and write it to a 0600 file."""
    from govmesh.config import public_url
    from govmesh.runtime import ENV_NATS_ADMISSION, ENV_NATS_URL, ENV_RAY_ADDRESS, ENV_REDIS_URL
    from govmesh.runtime._home import write_private

    joining = {
        ENV_NATS_URL: rt.nats_url,
        ENV_NATS_ADMISSION: str(rt.workdir / _ADMISSION_SOCKET),
        ENV_REDIS_URL: rt.redis_url,
    }
    if rt.ray_address:
        joining[ENV_RAY_ADDRESS] = rt.ray_address
    if rt.ray_auth is not None:
        joining |= rt.ray_auth.joining
    env_file = rt.workdir / "join.env"
    write_private(env_file, "".join(f"{k}={v}\n" for k, v in joining.items()).encode())
    for name, value in joining.items():
        shown = "***" if name in _SECRET_NAMES else public_url(value)
        out.print(f"{name}={shown}", soft_wrap=True, highlight=False)
    console.print(
        f"[dim]with the secrets: {env_file} (0600); a process joins with "
        f"`set -a; . {env_file}; set +a`[/]",
        soft_wrap=True,
    )
    if rt.ray_address:
        console.print(
            "[dim]a Ray node joins with the same variables and "
            "`ray start --address=$RAY_ADDRESS`[/]",
            soft_wrap=True,
        )
    if rt.ray_auth is not None and rt.ray_auth.mode != "token":
        console.print(
            f"[yellow]Ray runs with RAY_AUTH_MODE={rt.ray_auth.mode}: whoever reaches it "
            "may run code on it[/]"
        )
    console.print(f"[dim]low latency ({rt.low_latency.mode}): {rt.low_latency.detail}[/]")
    console.print("[green]govmesh services are up[/]; Ctrl-C stops them")
