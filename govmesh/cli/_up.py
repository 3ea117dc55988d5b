"""``govmesh up``: run the platform until Ctrl-C."""

from __future__ import annotations

import asyncio

from govmesh.cli._common import claim_sigterm, console, out, run_async
from govmesh.cli._root import cli

_SECRET_NAMES = ("RAY_AUTH_TOKEN",)
"""Joining variables whose whole value is a secret: printed masked, written to the file."""


@cli.command()
def up() -> None:
    """Run embedded nats-server, Redis-protocol server and Ray until Ctrl-C.

    Prints what another process needs to join (GOVMESH_NATS_URL, GOVMESH_REDIS_URL,
    RAY_ADDRESS, and Ray's RAY_AUTH_MODE and RAY_AUTH_TOKEN: the Ray cluster uses Ray's
    token authentication unless RAY_AUTH_MODE says otherwise), the secrets masked, and
    writes them whole to a file only this user may read. A Ray node joins with those
    variables in its environment and `ray start --address=$RAY_ADDRESS`.
    """
    from govmesh.config import public_url
    from govmesh.runtime import Runtime
    from govmesh.runtime._home import write_private

    async def serve() -> None:
        # Plain NATS: clients of another process get no certificates from this one yet.
        async with Runtime(secure=False) as rt:
            claim_sigterm()
            joining = {"GOVMESH_NATS_URL": rt.nats_url, "GOVMESH_REDIS_URL": rt.redis_url}
            if rt.ray_address:
                joining["RAY_ADDRESS"] = rt.ray_address
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
                    f"[yellow]Ray runs with RAY_AUTH_MODE={rt.ray_auth.mode}: whoever reaches "
                    "it may run code on it[/]"
                )
            console.print(f"[dim]low latency ({rt.low_latency.mode}): {rt.low_latency.detail}[/]")
            console.print("[green]govmesh services are up[/]; Ctrl-C stops them")
            await asyncio.Event().wait()

    run_async(serve())
