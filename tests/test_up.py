"""``govmesh up`` in one terminal and ``govmesh run`` with what it prints in another, as a
user runs them: mutual TLS and signed messages on the bus, Ray's token authentication on,
nothing left running afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import nats
import pytest

from govmesh.errors import ConfigError
from govmesh.runtime import NatsServer
from govmesh.runtime._rayauth import (
    ENV_RAY_AUTH_MODE,
    ENV_RAY_AUTH_TOKEN,
    ENV_RAY_AUTH_TOKEN_PATH,
    RayAuth,
)

from _procs import MARK_VAR, wait_until_gone

ROOT = Path(__file__).parent.parent
GOVMESH = [sys.executable, "-m", "govmesh.cli"]


def _env(mark: str, home: Path) -> dict[str, str]:
    """This environment without govmesh's and Ray's own variables (a Ray initialised by
    the tests sets some), as a fresh terminal has it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOVMESH_", "RAY_"))}
    return env | {MARK_VAR: mark, "GOVMESH_HOME": str(home)}


async def _plain_client(url: str) -> None:
    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    await nc.close()


def _joining(up: subprocess.Popen[str]) -> tuple[dict[str, str], Path, list[str]]:
    """What `govmesh up` wrote to its join file, once its services are up, the file, and
    what it said on stderr until then."""
    assert up.stderr is not None
    said = []
    for line in up.stderr:
        said.append(line)
        if "services are up" in line:
            break
    assert any("services are up" in line for line in said), "".join(said)[-3000:]
    env_file = next(
        Path(w.strip("`;")) for line in said for w in line.split() if w.endswith("join.env")
    )
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    joining = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    return joining, env_file, said


def test_a_run_joins_govmesh_up_with_what_it_prints_over_mutual_tls_and_ray_token_auth(
    tmp_path: Path,
) -> None:
    mark = uuid.uuid4().hex
    up = subprocess.Popen(
        [*GOVMESH, "up"],
        cwd=ROOT,
        env=_env(mark, tmp_path / "up-home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        joining, env_file, said = _joining(up)
        token = joining["RAY_AUTH_TOKEN"]
        assert joining["RAY_AUTH_MODE"] == "token" and len(token) >= 32
        assert joining["RAY_ADDRESS"] and joining["GOVMESH_NATS_URL"]
        # The bus is mutual TLS: a client without a certificate of its CA gets nothing.
        with pytest.raises(Exception):  # noqa: B017  (nats-py raises what TLS failed with)
            asyncio.run(_plain_client(joining["GOVMESH_NATS_URL"]))
        # Nothing that can mint a certificate is written: the only private key in its
        # directory is the server's own.
        keys = [
            p.relative_to(env_file.parent)
            for p in env_file.parent.rglob("*")
            if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
        ]
        assert keys == [Path("nats/tls/server-key.pem")]
        out = tmp_path / "report.json"
        run = subprocess.run(
            [*GOVMESH, "run", "scenarios/procurement.yaml", "-n", "3", "--json", str(out)],
            cwd=ROOT,
            env=_env(mark, tmp_path / "run-home") | joining,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        up.send_signal(signal.SIGINT)
        stdout, stderr = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
    report = json.loads(out.read_text())
    assert report["workflows"]["finished"] == report["workflows"]["total"] == 3
    assert report["runtime"]["embedded"] == {"nats": False, "redis": False, "ray": False}
    assert report["runtime"]["mutual_tls"] is True and report["runtime"]["insecure_bus"] is False
    assert report["security_rejections"] == {}
    # The token is a secret: in the 0600 file only, never on the screen.
    assert "RAY_AUTH_TOKEN=***" in stdout
    assert token not in stdout + "".join(said) + stderr + run.stdout + run.stderr
    assert wait_until_gone(mark, timeout=60) == []


def test_a_new_ray_cluster_gets_a_private_token_of_its_own_unless_one_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (ENV_RAY_AUTH_MODE, ENV_RAY_AUTH_TOKEN, ENV_RAY_AUTH_TOKEN_PATH):
        monkeypatch.delenv(name, raising=False)
    own = RayAuth.for_new_cluster(tmp_path)
    path = Path(own.start_environ[ENV_RAY_AUTH_TOKEN_PATH])
    assert path.read_text() == own.token and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert own.joining == {ENV_RAY_AUTH_MODE: "token", ENV_RAY_AUTH_TOKEN: own.token}
    assert RayAuth.for_new_cluster(tmp_path).token != own.token

    monkeypatch.setenv(ENV_RAY_AUTH_TOKEN, "the-users-token")
    given = RayAuth.for_new_cluster(tmp_path)
    assert (given.token, given.start_environ) == ("the-users-token", {})

    monkeypatch.setenv(ENV_RAY_AUTH_MODE, "disabled")
    assert RayAuth.for_new_cluster(tmp_path).joining == {ENV_RAY_AUTH_MODE: "disabled"}


def test_an_empty_ray_token_file_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    monkeypatch.delenv(ENV_RAY_AUTH_MODE, raising=False)
    monkeypatch.delenv(ENV_RAY_AUTH_TOKEN, raising=False)
    monkeypatch.setenv(ENV_RAY_AUTH_TOKEN_PATH, str(empty))

    with pytest.raises(ConfigError, match=f"RAY_AUTH_TOKEN_PATH='{empty}'.*empty"):
        RayAuth.for_new_cluster(tmp_path)


def test_an_external_nats_without_mutual_tls_is_refused_unless_the_run_accepts_it(
    tmp_path: Path,
) -> None:
    with NatsServer(workdir=tmp_path / "nats") as plain:
        env = _env(uuid.uuid4().hex, tmp_path / "home") | {"GOVMESH_NATS_URL": plain.url}
        args = [*GOVMESH, "run", "scenarios/procurement.yaml", "-n", "2"]
        refused = subprocess.run(
            args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        out = tmp_path / "report.json"
        accepted = subprocess.run(
            [*args, "--insecure-bus", "--json", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "without mutual TLS" in refused.stderr and "--insecure-bus" in refused.stderr
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["runtime"]["insecure_bus"] is True and report["runtime"]["mutual_tls"] is False
    assert "INSECURE (--insecure-bus)" in accepted.stdout
