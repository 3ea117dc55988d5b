"""Low-latency mode: off unless asked for; the CPU latency request is held exactly while
asked for, and explained when it cannot be; the embedded nats-server runs its Go code on the
threads it is given."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from govmesh.errors import ConfigError
from govmesh.runtime import ENV_LOW_LATENCY, CpuLatencyHold, NatsServer, Runtime
from govmesh.runtime._latency import CPU_LATENCY_DEVICE, current_cpu_latency_us, low_latency_mode

# The request covers the whole machine: tests make it only when the user asked for
# low-latency mode, as a deployment does.
may_hold = pytest.mark.skipif(
    low_latency_mode() != "on"
    or not (CPU_LATENCY_DEVICE.exists() and os.access(CPU_LATENCY_DEVICE, os.W_OK)),
    reason=f"holds {CPU_LATENCY_DEVICE} only with {ENV_LOW_LATENCY}=on and write access to it",
)


def test_a_held_request_asks_for_zero_microseconds_until_released(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.touch()
    hold = CpuLatencyHold("on", device=device)
    with hold as state:
        assert state.held and hold.held
        assert str(device) in state.detail
        assert device.read_bytes() == struct.pack("=i", 0)
    assert not hold.held
    hold.release()  # safe twice
    assert hold.acquire().held  # and again after a release
    hold.release()


def test_off_asks_for_nothing(tmp_path: Path) -> None:
    device = tmp_path / "cpu_dma_latency"
    device.touch()
    with CpuLatencyHold("off", device=device) as state:
        assert not state.held
        assert state.detail == f"{ENV_LOW_LATENCY}=off"
    assert device.read_bytes() == b""


def test_the_default_is_off_and_asks_for_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_LOW_LATENCY, raising=False)
    device = tmp_path / "cpu_dma_latency"
    device.touch()
    with CpuLatencyHold(device=device) as state:
        assert state.mode == "off" and not state.held
    assert device.read_bytes() == b""


def test_on_without_the_device_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-device"
    with pytest.raises(ConfigError, match=f"{ENV_LOW_LATENCY}=on: cannot open {missing}"):
        CpuLatencyHold("on", device=missing).acquire()


def test_an_unknown_mode_names_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_LOW_LATENCY, "fast")
    with pytest.raises(ConfigError, match=f"{ENV_LOW_LATENCY}='fast': expected one of on, off"):
        CpuLatencyHold()
    with pytest.raises(ConfigError, match="low_latency='max'"):
        Runtime(low_latency="max")
    # Once the default, now gone: it held the request wherever this process happened to be
    # allowed to (root, containers, CI).
    with pytest.raises(ConfigError, match="low_latency='auto'"):
        CpuLatencyHold("auto")
    monkeypatch.setenv(ENV_LOW_LATENCY, " OFF ")
    assert CpuLatencyHold().mode == "off"


@may_hold
def test_the_kernel_keeps_the_request_while_it_is_held() -> None:
    before = current_cpu_latency_us()
    with CpuLatencyHold("on"):
        assert current_cpu_latency_us() == 0
    assert current_cpu_latency_us() == before


@may_hold
async def test_a_runtime_holds_the_cpus_awake_while_it_runs() -> None:
    before = current_cpu_latency_us()
    async with Runtime(start_ray=False, low_latency="on") as rt:
        assert rt.low_latency.held
        assert current_cpu_latency_us() == 0
        assert rt.nats_server is not None and rt.nats_server.pid is not None
        assert _environ_of(rt.nats_server.pid).get("GOMAXPROCS") == "1"
    assert not rt.low_latency.held
    assert current_cpu_latency_us() == before


async def test_a_runtime_told_off_holds_nothing() -> None:
    async with Runtime(start_ray=False, low_latency="off") as rt:
        assert rt.low_latency.mode == "off"
        assert not rt.low_latency.held


def _environ_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


@pytest.mark.parametrize(("go_threads", "expected"), [(None, None), (1, "1"), (2, "2")])
def test_the_embedded_nats_server_runs_go_on_the_threads_it_is_given(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    go_threads: int | None,
    expected: str | None,
) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    with NatsServer(workdir=tmp_path, jetstream=False, go_threads=go_threads) as server:
        assert server.pid is not None
        assert _environ_of(server.pid).get("GOMAXPROCS") == expected


def test_the_embedded_nats_server_needs_a_thread() -> None:
    with pytest.raises(ConfigError, match="go_threads must be at least 1, got 0"):
        NatsServer(workdir=Path("unused"), go_threads=0)
