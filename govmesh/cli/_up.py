"""``govmesh up``: run the platform until Ctrl-C."""

from __future__ import annotations

import asyncio

from govmesh.cli._common import claim_sigterm, console, out, run_async
from govmesh.cli._root import cli


@cli.command()
def up() -> None:
    """Run embedded nats-server, Redis-protocol server and Ray until Ctrl-C.

    Prints the URLs, the Redis password masked, and writes them whole to a file only this
    user may read, so other processes can join with GOVMESH_NATS_URL, GOVMESH_REDIS_URL
    and RAY_ADDRESS.
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
            env_file = rt.workdir / "join.env"
            write_private(env_file, "".join(f"{k}={v}\n" for k, v in joining.items()).encode())
            for name, value in joining.items():
                out.print(f"{name}={public_url(value)}")
            console.print(
                f"[dim]with the Redis password: {env_file} (0600); join with "
                f"`set -a; . {env_file}; set +a`[/]"
            )
            console.print(f"[dim]low latency ({rt.low_latency.mode}): {rt.low_latency.detail}[/]")
            console.print("[green]govmesh services are up[/]; Ctrl-C stops them")
            await asyncio.Event().wait()

    run_async(serve())
