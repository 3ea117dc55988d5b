"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from nacl.bindings import crypto_sign_seed_keypair

from govmesh.bus import Bus, ensure_event_stream
from govmesh.errors import SecurityError
from govmesh.identity import (
    OPERATOR_MEMBER,
    SOCKET_MEMBERS,
    WATCH_MEMBER,
    ClientCert,
    EnrolmentServer,
    Identity,
    Issuer,
    MemberKeys,
    SigningKey,
    TokenVerifier,
    request_grant,
)
from govmesh.identity._permissions import AUDITOR_ROLE
from govmesh.runtime import JoinedDeployment, NatsServer, RedisServer, Transport, join
from govmesh.scenarios._schema import load_scenario
from govmesh.scenarios._swarm import Swarm

from _deploy import deployment

ROOT = Path(__file__).parent.parent


# ---------------------------------------------------------------------------------------
# 1. The audit index verifies every message of the stream as a live receiver does.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 2. Monitoring survives a malformed message in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 3. The Redis-protocol server needs credentials.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 4. Publishes refused by nats-server become security events.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 5. A decision is readable only by the agent it answers.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 6. Intents are decided only for workflows the deployment started; budget authority is
#    cumulative.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 7. The advertised directory holds nothing that can mint identities.
# ---------------------------------------------------------------------------------------


def _waiting_scenario(path: Path) -> None:
    """Write to `path` the procurement scenario with every purchase over the approval
    threshold and under the limit, so each one waits for an operator."""
    text = (ROOT / "scenarios" / "procurement.yaml").read_text()
    changes = {
        "../policies/": f"{ROOT / 'policies'}/",
        "vendors: {Vendor_A: 0.45, Vendor_B: 0.40, Vendor_C: 0.15}": "vendors: {Vendor_A: 1.0}",
        "amount_usd: {min: 250, max: 12500}": "amount_usd: {min: 5500, max: 9500}",
    }
    for old, new in changes.items():
        assert old in text, f"the procurement scenario no longer says {old!r}"
        text = text.replace(old, new)
    path.write_text(text)


@pytest.fixture(scope="module")
def waiting_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A live ``govmesh run`` whose every purchase waits for an operator, advertised in a
    home directory of its own; yields its advertised directory once both escalations are
    pending (an operator has enrolled and listed them by then), and stops the run after."""
    base = tmp_path_factory.mktemp("waiting-run")
    scenario = base / "waiting.yaml"
    _waiting_scenario(scenario)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOVMESH_", "RAY_"))}
    env["GOVMESH_HOME"] = str(base / "home")
    govmesh = [sys.executable, "-m", "govmesh.cli"]
    log = base / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*govmesh, "run", str(scenario), "-n", "2", "--manual-approvals"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        listed, pending = base / "pending.json", []
        deadline = time.monotonic() + 180
        while len(pending) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the escalations never became pending"
            got = subprocess.run(
                [*govmesh, "approvals", "list", "--json", str(listed)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                timeout=60,
            )
            if got.returncode == 0:
                pending = json.loads(listed.read_text())
            time.sleep(0.5)
        yield base / "home" / "acme"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Ctrl-C closes the enrolment socket and removes the advertised directory.
    assert proc.returncode == 130, log.read_text()[-3000:]
    assert not (base / "home" / "acme").exists()


def _mints(seed: bytes, joined: JoinedDeployment) -> bool:
    """Whether `seed`, as an Ed25519 issuer key, signs tokens the deployment accepts."""
    dep = joined.deployment
    forger = Issuer(name="forged", audience=dep.audience, key=SigningKey(seed))
    token = forger.issue(sub="governance-1", role="governance", key=SigningKey().public)
    try:
        TokenVerifier(issuers=list(dep.issuers), audience=dep.audience).verify(token)
    except SecurityError:
        return False
    return True


def _decoded(data: bytes) -> list[bytes]:
    """`data` and what the strings of its JSON decode to as base64 or hex."""
    blobs = [data]
    try:
        document = json.loads(data)
    except ValueError:
        return blobs
    for value in document.values() if isinstance(document, dict) else ():
        if isinstance(value, str):
            padded = value + "=" * (-len(value) % 4)
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                with contextlib.suppress(ValueError):
                    blobs.append(decode(padded))
            with contextlib.suppress(ValueError):
                blobs.append(bytes.fromhex(value))
    return blobs


def _key_material(path: Path, joined: JoinedDeployment) -> list[str]:
    """What in the file at `path` could mint a governance identity of the deployment."""
    data = path.read_bytes()
    found = []
    if b"PRIVATE KEY" in data:
        found.append(f"{path.name}: a PEM private key")
    for load in (serialization.load_pem_private_key, serialization.load_der_private_key):
        with contextlib.suppress(ValueError, TypeError, UnsupportedAlgorithm):
            load(data, password=None)
            found.append(f"{path.name}: a private key ({load.__name__})")
    for blob in _decoded(data):
        for at in range(len(blob) - 31):
            if _mints(blob[at : at + 32], joined):
                found.append(f"{path.name}: the token issuer's seed at byte {at}")
    return found


def test_the_advertised_directory_holds_nothing_that_can_mint_an_identity(
    waiting_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(waiting_run.parent))
    joined = join("acme")
    files = [p for p in waiting_run.rglob("*") if p.is_file()]
    assert "deployment.json" in {p.name for p in files}, files
    assert [finding for p in files for finding in _key_material(p, joined)] == []


async def test_the_enrolment_socket_gives_no_governance_gateway_or_agent_identity(
    waiting_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(waiting_run.parent))
    joined = join("acme")
    socket_path = waiting_run / "enrol.sock"
    assert stat.S_IMODE(waiting_run.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    asked = [
        ("governance-1", "governance"),
        ("gateway-1", "gateway"),
        ("procurement-1", "Procurement-Agent-v2"),
        ("requester-1", "Requester"),
        ("budget-1", "budget"),
        ("state-1", "state"),
        ("audit-1", "auditor"),
        ("issuer-acme", "issuer"),
        ("coordinator-attack", "coordinator"),
        (OPERATOR_MEMBER, "governance"),
        (OPERATOR_MEMBER, "auditor"),
        (WATCH_MEMBER, "gateway"),
    ]
    for member, role in asked:
        request = MemberKeys(member, role).request()
        with pytest.raises(SecurityError, match=r"enrolment_refused.*refused member"):
            await request_grant(socket_path, request)
    # What it does grant names the operator or watch member, grants no tool and no budget.
    verifier = TokenVerifier(
        issuers=list(joined.deployment.issuers), audience=joined.deployment.audience
    )
    for member, role in SOCKET_MEMBERS.items():
        identity = await joined.member(member, role)
        claims = verifier.verify(identity.token)
        assert (claims.sub, claims.role, claims.capabilities, claims.budget_usd) == (
            member,
            role,
            (),
            0.0,
        )
        assert identity.cert is not None and (identity.cert.member_id, identity.cert.role) == (
            member,
            role,
        )


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
    reason="runs a client as another user: needs root and a system python3",
)
async def test_the_enrolment_socket_refuses_another_user_even_when_it_may_connect() -> None:
    base = Path(tempfile.mkdtemp(prefix="gm-enrol-", dir="/tmp"))
    try:
        os.chmod(base, 0o711)
        path = base / "enrol.sock"
        issuer = Issuer(name="test:acme", audience="govmesh:acme")
        async with EnrolmentServer(path, issuer=issuer, ca=None, tenant="acme") as server:
            os.chmod(path, 0o666)  # permissions loosened by mistake
            request = msgspec.json.encode(MemberKeys(WATCH_MEMBER, AUDITOR_ROLE).request())
            client = (
                "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "s.sendall(sys.stdin.buffer.read()); print(s.makefile('rb').readline().decode())"
            )
            proc = await asyncio.create_subprocess_exec(
                "/usr/bin/python3",
                "-c",
                client,
                str(path),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                user=65534,
                group=65534,
                cwd="/",
            )
            out, err = await proc.communicate(request + b"\n")
            assert proc.returncode == 0, err
            assert "this client runs as uid 65534" in json.loads(out)["error"]
            assert (server.refused, server.granted) == ({"peer": 1}, {})
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_the_swarm_s_actors_are_given_no_private_key_and_make_their_own(
    secure_nats: tuple[Transport, NatsServer],
    redis_server: RedisServer,
    prefix: str,
    ray_session: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import ray.actor
    from ray import cloudpickle

    shipped: list[tuple[str, tuple[Any, ...], bytes, set[type]]] = []

    class Recording(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO) -> None:
            super().__init__(file, protocol=5)
            self.types: set[type] = set()

        def reducer_override(self, obj: Any) -> Any:
            self.types.add(type(obj))
            return super().reducer_override(obj)

    def record(method: str, args: Any, kwargs: Any) -> None:
        out = io.BytesIO()
        pickler = Recording(out)
        pickler.dump((args, kwargs))
        shipped.append((method, tuple(args or ()), out.getvalue(), pickler.types))

    create, call = ray.actor.ActorClass._remote, ray.actor.ActorHandle._actor_method_call

    def recorded_create(self: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        record("__init__", args, kwargs)
        return create(self, args=args, kwargs=kwargs, **options)

    def recorded_call(
        self: Any, method: str, args: Any = None, kwargs: Any = None, **kw: Any
    ) -> Any:
        record(method, args, kwargs)
        return call(self, method, args=args, kwargs=kwargs, **kw)

    made: list[bytes] = []  # seeds of every Ed25519 key made in this process
    init = SigningKey.__init__

    def recorded_init(self: SigningKey, raw: bytes | None = None) -> None:
        init(self, raw)
        made.append(self.raw)

    monkeypatch.setattr(ray.actor.ActorClass, "_remote", recorded_create)
    monkeypatch.setattr(ray.actor.ActorHandle, "_actor_method_call", recorded_call)
    monkeypatch.setattr(SigningKey, "__init__", recorded_init)
    caplog.set_level(logging.DEBUG)

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    scenario = load_scenario(ROOT / "scenarios" / "procurement.yaml")
    agent = scenario.agents.procurement.id
    coordinator = await Bus.connect(dep, issuer.identity("coordinator-1", "coordinator"))
    await ensure_event_stream(coordinator.nc)
    swarm = Swarm(scenario, dep, issuer, seed=1, transport=transport)
    try:
        await swarm.start()
        os.kill((await swarm.pids())[agent], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while swarm.restarts.get(agent, 0) == 0:
            assert time.monotonic() < deadline, "the agent actor never came back"
            await asyncio.sleep(0.1)
    finally:
        await swarm.close()
        await coordinator.close()
    monkeypatch.undo()

    assert shipped, "nothing was recorded"
    for method, _, data, types in shipped:
        assert not types & {Identity, SigningKey, ClientCert, MemberKeys}, (method, types)
        assert b"PRIVATE KEY" not in data, method
        assert not [seed for seed in made if seed in data], method
    verifier = TokenVerifier(issuers=list(dep.issuers), audience=dep.audience)
    enrolled: dict[str, list[bytes]] = {}
    for method, args, _, _ in shipped:
        if method in ("start", "ensure_started"):
            claims = verifier.verify(args[0].token)
            enrolled.setdefault(claims.sub, []).append(claims.key.raw)
    members = {"governance-1", "gateway-1", "audit-1", "budget-1", "state-1", agent}
    assert members | {scenario.agents.requester.id} == set(enrolled)
    # Each key was made in its actor's process, none here; a restarted actor made new ones.
    made_here = {crypto_sign_seed_keypair(seed)[0] for seed in made}
    assert not [k for keys in enrolled.values() for k in keys if k in made_here]
    assert len(enrolled[agent]) == 2 and enrolled[agent][0] != enrolled[agent][1]
    assert "PRIVATE KEY" not in caplog.text
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert leaked == []


# ---------------------------------------------------------------------------------------
# 8. State stays with its agent, and the tool tier stays sealed in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 9. Stream permissions are least privilege, per tenant.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 10. A message replayed to another governance actor of the group is refused.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 11. Safe defaults: no machine settings changed unasked; bounded subscriptions.
# ---------------------------------------------------------------------------------------
