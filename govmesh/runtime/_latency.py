"""Low-latency mode: the machine's CPUs stay awake while a deployment runs.

Every message on the decision path wakes another process (nats-server, a governance actor,
the Redis-protocol server, the agent). When the CPU that process is to run on is idle and has
halted, waking it costs far more than the work the message brings, above all in a virtual
machine, where a halted CPU is handed back to the host. Linux lets a process ask for a bound
on that cost through its PM QoS interface: while ``/dev/cpu_dma_latency`` is held open with a
latency of 0 µs, idle CPUs poll for work instead of halting, and a wake-up is a flag the
polling CPU sees at once (`Linux PM QoS
<https://docs.kernel.org/power/pm_qos_interface.html>`_; it is what tuned's
latency-performance profile sets).

The price is CPU time: idle CPUs spin while the request is held, and the request covers the
whole machine, every other program on it included. The kernel drops the request when the
file is closed, and closes it when the holding process exits however it exits, so nothing
outlives the deployment.

So it is the user's choice, never a default: ``GOVMESH_LOW_LATENCY`` (or ``govmesh
--low-latency``) is ``off`` unless set to ``on``, which requires the request and fails
clearly where it cannot be made. There is no mode that holds it wherever this process
happens to be allowed to (root, containers, CI): the same command would then change a
shared machine's power state for one user and not for another.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Final, Literal, cast, get_args

import msgspec

from govmesh.errors import ConfigError

__all__ = ["CPU_LATENCY_DEVICE", "ENV_LOW_LATENCY", "CpuLatencyHold", "LowLatency", "Mode"]

log = logging.getLogger(__name__)

Mode = Literal["on", "off"]
ENV_LOW_LATENCY: Final = "GOVMESH_LOW_LATENCY"
CPU_LATENCY_DEVICE: Final = Path("/dev/cpu_dma_latency")
_REQUEST_US: Final = 0
"""No wake-up latency at all: idle CPUs poll rather than enter any halted state."""


class LowLatency(msgspec.Struct, frozen=True, kw_only=True):
    """Whether this process holds the CPUs awake, and why (not).

    Attributes:
        mode: the mode asked for: ``on`` or ``off``.
        held: the PM QoS request is in force.
        detail: what is held, or why nothing is.
    """

    mode: Mode
    held: bool
    detail: str


def low_latency_mode(value: str | None = None) -> Mode:
    """`value`, else ``$GOVMESH_LOW_LATENCY``, else ``off``, checked.

    Raises:
        ConfigError: not one of ``on``, ``off``.
    """
    source = "low_latency" if value is not None else ENV_LOW_LATENCY
    chosen = (value if value is not None else os.environ.get(ENV_LOW_LATENCY, "")).strip()
    chosen = chosen.lower() or "off"
    if chosen not in get_args(Mode):
        raise ConfigError(f"{source}={chosen!r}: expected one of {', '.join(get_args(Mode))}")
    return cast(Mode, chosen)


class CpuLatencyHold:
    """Holds the CPUs awake (a 0 µs PM QoS CPU latency request) from `acquire` to `release`.

    Use ``with CpuLatencyHold() as state:``; `state` says whether the request is held.
    `release` is safe to call twice; a released hold can be acquired again.

    Args:
        mode: ``on`` or ``off``; default ``$GOVMESH_LOW_LATENCY``, else ``off``.
        device: the PM QoS device; another path only in tests.

    Raises:
        ConfigError: `mode` is not a mode.
    """

    def __init__(self, mode: str | None = None, *, device: Path = CPU_LATENCY_DEVICE) -> None:
        self.mode = low_latency_mode(mode)
        self._device = device
        self._fd: int | None = None
        self.state = LowLatency(mode=self.mode, held=False, detail="not acquired")

    @property
    def held(self) -> bool:
        """The request is in force."""
        return self._fd is not None

    def acquire(self) -> LowLatency:
        """Ask the kernel to keep idle CPUs polling if the mode is ``on``; returns the outcome.

        Raises:
            ConfigError: mode ``on`` and the request cannot be made (no PM QoS device, or
                no permission to write it), naming the device and the reason.
        """
        if self._fd is not None:
            return self.state
        if self.mode == "off":
            self.state = LowLatency(mode="off", held=False, detail=f"{ENV_LOW_LATENCY}=off")
            return self.state
        fd: int | None = None
        try:
            fd = os.open(self._device, os.O_WRONLY | os.O_CLOEXEC)
            os.write(fd, struct.pack("=i", _REQUEST_US))
        except OSError as exc:
            step = "open" if fd is None else "write"
            if fd is not None:
                os.close(fd)
            raise ConfigError(
                f"{ENV_LOW_LATENCY}=on: cannot {step} {self._device}: "
                f"{exc.strerror or exc}; run as a user that may write it (root, or a udev rule "
                f"granting write access), or set {ENV_LOW_LATENCY}=off"
            ) from None
        self._fd = fd
        self.state = LowLatency(
            mode=self.mode,
            held=True,
            detail=f"idle CPUs poll instead of halting ({self._device} held at {_REQUEST_US} µs)",
        )
        log.info("low latency held: %s", self.state.detail)
        return self.state

    def release(self) -> None:
        """Let idle CPUs halt again. Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            self.state = LowLatency(mode=self.mode, held=False, detail="released")

    def __enter__(self) -> LowLatency:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def current_cpu_latency_us(device: Path = CPU_LATENCY_DEVICE) -> int:
    """The CPU latency bound in force on this machine, in µs: the smallest request held by
    any process, or the kernel's default (2,000,000,000, no bound) when none is.

    Raises:
        OSError: the device cannot be read.
    """
    with open(device, "rb") as f:
        raw = f.read(4)
    return int(struct.unpack("=i", raw)[0])
