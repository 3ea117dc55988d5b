"""The ``govmesh`` command group: logging, telemetry and the low-latency switch."""

from __future__ import annotations

import logging
import os

import click

from govmesh.errors import GovmeshError

__all__ = ["cli"]


def _start_telemetry(choice: str) -> None:
    """Set up where this process's spans and metrics go, and, through the environment its
    Ray workers inherit, where its actors' go; they are sent on when the command ends."""
    if choice == "console":
        os.environ["OTEL_TRACES_EXPORTER"] = os.environ["OTEL_METRICS_EXPORTER"] = "console"
    elif choice == "none":
        os.environ["OTEL_SDK_DISABLED"] = "true"
    if not any(name.startswith("OTEL_") for name in os.environ):
        return  # nothing asked for: spare every command the import
    from govmesh.telemetry import configure_telemetry

    try:
        installed = configure_telemetry(member="cli")
    except GovmeshError as exc:
        raise click.ClickException(str(exc)) from None
    if installed is not None:
        click.get_current_context().call_on_close(installed.close)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="govmesh", prog_name="govmesh", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option(
    "--telemetry",
    type=click.Choice(["env", "console", "none"]),
    default="env",
    show_default=True,
    help="Where spans and metrics go: where the OTEL_* environment says (OTLP when "
    "OTEL_EXPORTER_OTLP_ENDPOINT is set, else nowhere), to stderr, or nowhere.",
)
@click.option(
    "--low-latency",
    type=click.Choice(["on", "off"]),
    default=None,
    help="on: hold this machine's CPUs awake while services run (needs write access to "
    "/dev/cpu_dma_latency), so a message wakes its receiver without waiting for a halted "
    "CPU; idle CPUs then spin, for every program on the machine, and the embedded "
    "nats-server runs on one Go thread. Default: $GOVMESH_LOW_LATENCY, else off.",
)
def cli(verbose: int, telemetry: str, low_latency: str | None) -> None:
    """govmesh: governed multi-agent workflow automation."""
    if low_latency is not None:
        # Through the environment, so every Runtime and benchmark of this command follows.
        os.environ["GOVMESH_LOW_LATENCY"] = low_latency
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # Refused messages are counted and reported in the summary; one line each is noise.
        logging.getLogger("govmesh.bus._bus").setLevel(logging.ERROR)
    _start_telemetry(telemetry)
