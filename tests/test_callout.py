"""A NATS cluster that govmesh does not run admits a run's members through the auth callout:
``govmesh nats init`` writes the nodes' files, three real nats-server processes run them as
an operator's machines would, and ``govmesh run`` with the driver's variables finishes over
mutual TLS though no node's configuration names a member. The callout's judgement of
requests and certificates is checked on its own too."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nkeys
import pytest
from cryptography import x509
from test_cli import GOVMESH, ROOT, _env

from govmesh.errors import ConfigError, RuntimeStartError
from govmesh.identity import DeploymentCA
from govmesh.identity._ca import ClientCert, ssl_context
from govmesh.runtime import Member, Transport
from govmesh.runtime._callout import (
    AuthCallout,
    decode_jwt,
    encode_jwt,
    new_issuer_seed,
)
from govmesh.runtime._nats import find_nats_server
from govmesh.runtime._nats_layout import (
    NatsLayout,
    parse_node,
    renew_node_certs,
    write_nats_layout,
)
from govmesh.subjects import Subjects

from _procs import MARK_VAR, port_below_ephemeral_range, wait_until_gone

TENANT = "callout"
ONE_DAY = dt.timedelta(days=1)


def _govmesh(
    args: list[str], *, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """``govmesh ARGS`` from the repository's root, as a user runs it."""
    return subprocess.run(
        [*GOVMESH, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def operator_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsLayout]:
    """Three nats-server processes started from what ``govmesh nats init`` wrote, as an
    operator starts them on machines of their own."""
    where = tmp_path_factory.mktemp("operator") / "nats"
    nodes = [
        f"n{i}=127.0.0.1:{port_below_ephemeral_range()}:{port_below_ephemeral_range()}"
        for i in (1, 2, 3)
    ]
    made = _govmesh(
        [
            *("nats", "init", str(where), "--listen", "127.0.0.1"),
            *("--json", str(where.parent / "layout.json")),
            *(arg for node in nodes for arg in ("--node", node)),
        ],
        env=_env(uuid.uuid4().hex),
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    layout = msgspec.json.decode((where.parent / "layout.json").read_bytes())
    mark = uuid.uuid4().hex
    servers = [
        _start_node(Path(node["config"]), Path(node["config"]).parent / "nats.log", mark)
        for node in layout["nodes"]
    ]
    try:
        _wait_for_leader([Path(n["config"]).parent / "nats.log" for n in layout["nodes"]])
        yield NatsLayout(
            directory=Path(layout["directory"]),
            nodes=tuple(parse_node(f"{n['name']}={n['url'][6:]}") for n in layout["nodes"]),
            env_file=Path(layout["env_file"]),
            environment=layout["environment"],
            issuer=layout["issuer"],
            ca_expires=dt.datetime.fromisoformat(layout["ca_expires"]),
            node_expires=dt.datetime.fromisoformat(layout["node_certificates_expire"]),
        )
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(timeout=30)
        assert wait_until_gone(mark, timeout=30) == []


def _start_node(config: Path, log: Path, mark: str) -> subprocess.Popen[bytes]:
    """A nats-server started from `config`, as an operator starts one, logging to `log`."""
    with open(log, "w") as sink:
        return subprocess.Popen(
            [str(find_nats_server()), "-c", str(config)],
            env=os.environ | {MARK_VAR: mark},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def _wait_for_leader(logs: list[Path], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = [p.read_text() if p.exists() else "" for p in logs]
        if all("JetStream cluster" in t and "leader" in t for t in texts):
            return
        time.sleep(0.1)
    raise AssertionError("no JetStream leader: " + texts[0][-2000:])


def test_nats_init_keeps_the_keys_that_mint_identities_with_the_driver_only(
    operator_cluster: NatsLayout,
) -> None:
    where = operator_cluster.directory
    private = sorted(
        str(p.relative_to(where))
        for p in where.rglob("*")
        if p.is_file() and (b"PRIVATE KEY" in p.read_bytes() or p.read_bytes().startswith(b"SA"))
    )
    assert private == [
        "driver/ca-key.pem",
        "driver/callout.nk",
        "n1/server-key.pem",
        "n2/server-key.pem",
        "n3/server-key.pem",
    ]
    for name in private:
        assert stat.S_IMODE((where / name).stat().st_mode) == 0o600, name
    # A node's files name no member: only the callout service, and a user no one maps to.
    users = (where / "n1" / "authorization.conf").read_text()
    assert users.count('"user"') == 2 and operator_cluster.issuer in users
    assert (where / "n1" / "nats-server.conf").read_text().count("verify: true") == 1
    # A year for the nodes' certificates, three for the CA, unless asked otherwise.
    now = dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=364) < operator_cluster.node_expires - now <= dt.timedelta(days=365)
    assert dt.timedelta(days=1094) < operator_cluster.ca_expires - now <= dt.timedelta(days=1095)


def test_nats_init_refuses_a_directory_with_files_and_names_a_bad_node(tmp_path: Path) -> None:
    (tmp_path / "keys.pem").write_text("an operator's file")
    with pytest.raises(ConfigError, match="never overwrites"):
        write_nats_layout(tmp_path, [parse_node("n1=nats1")])
    assert [p.name for p in tmp_path.iterdir()] == ["keys.pem"]
    for spec, what in [
        ("nats1", "NAME=HOST"),
        ("n1=h:4222:6222:1", "NAME=HOST"),
        ("n1=h:port", "'port' is not a port"),
        ("n1=h:70000", "'70000' is not a port"),
        ("n 1=h", "NAME=HOST"),
    ]:
        with pytest.raises(ConfigError, match=what):
            parse_node(spec)
    assert parse_node("n1=[::1]:4300").url == "tls://[::1]:4300"
    with pytest.raises(ConfigError, match="share a name"):
        write_nats_layout(tmp_path / "new", [parse_node("a=h1"), parse_node("a=h2")])
    run = _govmesh(
        ["nats", "init", str(tmp_path / "cli"), "--node", "n1=h:99999"],
        env=_env(uuid.uuid4().hex),
        timeout=60,
    )
    assert run.returncode == 2 and "'99999' is not a port" in run.stderr


def test_a_run_on_nodes_govmesh_does_not_run_admits_its_members_through_the_callout(
    operator_cluster: NatsLayout, tmp_path: Path
) -> None:
    mark = uuid.uuid4().hex
    out = tmp_path / "report.json"
    run = _govmesh(
        ["run", "scenarios/procurement.yaml", "-n", "3", "--json", str(out)],
        env=_env(mark, tmp_path / "home") | operator_cluster.environment | {"COLUMNS": "200"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["workflows"]["finished"] == report["workflows"]["total"] == 3
    runtime = report["runtime"]
    assert runtime["embedded"]["nats"] is False
    assert runtime["mutual_tls"] is True and runtime["insecure_bus"] is False
    admitted = runtime["auth_callout"]["admitted"]
    # Every platform member and every agent connected as a user the callout made.
    assert {"governance", "gateway", "budget", "state", "coordinator"} <= set(admitted)
    assert {"Requester", "Procurement-Agent-v2"} <= set(admitted), admitted
    assert f"{sum(admitted.values())} connections admitted, none refused" in run.stdout
    assert report["security_rejections"] == {}
    assert wait_until_gone(mark, timeout=60) == []


def _layout_env(layout: NatsLayout, monkeypatch: pytest.MonkeyPatch) -> Transport:
    for name, value in layout.environment.items():
        monkeypatch.setenv(name, value)
    transport = Transport.from_environment()
    assert transport is not None and transport.callout is not None
    return transport


async def _connect(url: str, tls: ssl.SSLContext, errors: list[str], **options: Any) -> Any:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(
        url, tls=tls, error_cb=on_error, allow_reconnect=False, connect_timeout=5, **options
    )


async def test_the_callout_grants_a_member_its_roles_permissions_on_every_node(
    operator_cluster: NatsLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = _layout_env(operator_cluster, monkeypatch)
    callout = transport.callout
    assert callout is not None
    callout.start(operator_cluster.environment["GOVMESH_NATS_URL"])
    try:
        cert = transport.admit("buyer-1", "Buyer", tenant=TENANT, agent=True)
        subjects = Subjects(TENANT)
        for node in operator_cluster.nodes:
            errors: list[str] = []
            nc = await _connect(
                node.url, ssl_context(cert), errors, inbox_prefix=subjects.inbox_prefix("buyer-1")
            )
            await nc.publish(subjects.intent("buyer-1"), b"mine")
            await nc.publish(subjects.intent("buyer-2"), b"another agent's")
            await nc.flush()
            await asyncio.sleep(0.2)
            await nc.close()
            assert errors == [
                f'nats: permissions violation for publish to "{subjects.intent("buyer-2")}"'
            ]
        assert callout.admitted["Buyer"] == 3
        # A certificate of the deployment's CA that no driver registered: no answer, so the
        # node refuses it after its auth timeout.
        stranger = transport.ca.member_cert("buyer-9", "Buyer", tenant=TENANT)
        assert not await _admitted(operator_cluster.nodes[0].url, ssl_context(stranger))
        assert callout.refused["not_registered"] >= 1
        # A certificate of another CA never gets past TLS.
        other = DeploymentCA.create("other").member_cert("buyer-1", "Buyer", tenant=TENANT)
        assert not await _admitted(operator_cluster.nodes[1].url, ssl_context(other))
        assert await _admitted(operator_cluster.nodes[2].url, ssl_context(cert))
    finally:
        callout.close()
    # With the callout gone, even a registered member is refused.
    assert not await _admitted(operator_cluster.nodes[2].url, ssl_context(cert))


async def _admitted(url: str, tls: ssl.SSLContext) -> bool:
    """Whether a client with `tls` is connected to the node at `url` and gets an answer to
    a ping: a node answers none before it admits the client, and cuts off a client it
    refuses once its auth timeout passes."""
    try:
        nc = await _connect(url, tls, [])
    except Exception:  # what TLS or the node refused it with
        return False
    try:
        await nc.flush(timeout=5)
    except Exception:  # the node closed the connection
        return False
    finally:
        await nc.close()
    return True


def _served_certificate(url: str, client: ClientCert) -> x509.Certificate:
    """The certificate the node at `url` serves now, seen through the TLS handshake a
    client starts after the node's plain-text INFO line."""
    host, port = url.removeprefix("tls://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        info = b""
        while not info.endswith(b"\r\n"):
            info += raw.recv(1)
        assert info.startswith(b"INFO ") and b'"tls_required":true' in info
        with ssl_context(client).wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_nats_renew_issues_certificates_a_running_node_serves_after_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = parse_node(f"n1=127.0.0.1:{port_below_ephemeral_range()}")
    layout = write_nats_layout(tmp_path / "nats", [node], listen="127.0.0.1", node_ttl=ONE_DAY)
    ca = DeploymentCA.load(
        (layout.directory / "ca.pem").read_bytes(),
        Path(layout.environment["GOVMESH_NATS_CA_KEY"]).read_bytes(),
    )
    client = ca.member_cert("operator-1", "operator")
    log = tmp_path / "n1.log"
    mark = uuid.uuid4().hex
    server = _start_node(layout.config_of(node), log, mark)
    transport = _layout_env(layout, monkeypatch)
    assert transport.callout is not None
    try:
        _wait_for(log, "Server is ready")
        before = _served_certificate(node.url, client)
        assert before.not_valid_after_utc == layout.node_expires
        transport.callout.start(node.url)
        member = transport.admit("agent-1", "Buyer", tenant=TENANT, agent=True)
        connected = await nats.connect(
            node.url,
            tls=ssl_context(member),
            inbox_prefix=Subjects(TENANT).inbox_prefix("agent-1"),
            reconnect_time_wait=0.2,
        )
        run = _govmesh(
            ["nats", "renew", str(layout.directory), "--node-days", "400"],
            env=_env(uuid.uuid4().hex),
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        written = x509.load_pem_x509_certificate((layout.directory / "n1/server.pem").read_bytes())
        assert written.serial_number != before.serial_number
        assert f"{written.not_valid_after_utc:%Y-%m-%d %H:%M}" in run.stdout
        server.send_signal(signal.SIGHUP)
        _wait_for(log, "Reloaded server configuration")
        after = _served_certificate(node.url, client)
        assert after.serial_number == written.serial_number
        assert after.not_valid_after_utc - before.not_valid_after_utc > dt.timedelta(days=398)
        # The reload closed the connection of the member the callout admitted (the node's
        # configuration does not list it); it reconnected and was admitted again.
        deadline = time.monotonic() + 10
        while connected.stats["reconnects"] < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await connected.flush(timeout=5)
        assert connected.stats["reconnects"] == 1 and connected.is_connected
        assert transport.callout.admitted["Buyer"] == 2
        await connected.close()
    finally:
        transport.callout.close()
        server.terminate()
        server.wait(timeout=30)
    assert wait_until_gone(mark, timeout=30) == []
    # Where the CA key is not, nothing is renewed, and the message says where to run it.
    (layout.directory / "driver" / "ca-key.pem").unlink()
    with pytest.raises(ConfigError, match="renew on the driver's machine"):
        renew_node_certs(layout.directory)


def _wait_for(log: Path, line: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)


async def test_a_member_admitted_by_the_callout_is_cut_off_when_its_certificate_expires(
    operator_cluster: NatsLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = _layout_env(operator_cluster, monkeypatch)
    assert transport.callout is not None
    transport.callout.start(operator_cluster.environment["GOVMESH_NATS_URL"])
    subjects = Subjects(TENANT)
    try:
        brief = transport.admit(
            "brief-1", "Buyer", tenant=TENANT, agent=True, ttl=dt.timedelta(seconds=3)
        )
        lasting = transport.admit("lasting-1", "Buyer", tenant=TENANT, agent=True)
        url = operator_cluster.nodes[0].url
        nc_brief = await _connect(
            url, ssl_context(brief), [], inbox_prefix=subjects.inbox_prefix("brief-1")
        )
        nc_lasting = await _connect(
            url, ssl_context(lasting), [], inbox_prefix=subjects.inbox_prefix("lasting-1")
        )
        await nc_brief.flush(timeout=5)
        deadline = time.monotonic() + 15
        while nc_brief.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Cut off when its certificate expired, not before; the other member stays.
        assert not nc_brief.is_connected
        assert time.time() >= brief.expires.timestamp() - 0.5
        await nc_lasting.flush(timeout=5)
        assert nc_lasting.is_connected
        await nc_brief.close()
        await nc_lasting.close()
    finally:
        transport.callout.close()


def test_driver_variables_are_checked_before_anything_starts(
    operator_cluster: NatsLayout, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in operator_cluster.environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GOVMESH_NATS_CA_KEY")
    with pytest.raises(ConfigError, match="set GOVMESH_NATS_CA_KEY"):
        Transport.from_environment()
    monkeypatch.setenv("GOVMESH_NATS_CA_KEY", operator_cluster.environment["GOVMESH_NATS_CA_KEY"])
    bad = tmp_path / "callout.nk"
    bad.write_text("SUnotaseed\n")
    monkeypatch.setenv("GOVMESH_NATS_CALLOUT_KEY", str(bad))
    with pytest.raises(ConfigError, match=r"GOVMESH_NATS_CALLOUT_KEY: .*not an nkey seed"):
        Transport.from_environment()
    user_seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    bad.write_bytes(bytes(user_seed))
    with pytest.raises(ConfigError, match="must be an account nkey"):
        Transport.from_environment()


def test_a_callout_whose_nodes_do_not_list_it_fails_to_start_clearly(
    operator_cluster: NatsLayout,
) -> None:
    ca = DeploymentCA.create("elsewhere")
    callout = AuthCallout(ca=ca, issuer_seed=new_issuer_seed(), permissions_of=lambda dn: None)
    with pytest.raises(RuntimeStartError, match=r"CERTIFICATE_VERIFY_FAILED.*auth_users"):
        callout.start(operator_cluster.nodes[0].url, timeout=2)


# The callout's judgement, request by request: pure logic over real keys and certificates.

CA = DeploymentCA.create("judged")
SERVER = nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_SERVER))
SEED = new_issuer_seed()
MEMBER = CA.member_cert("agent-1", "Buyer", tenant=TENANT)
PERMISSIONS = Transport(CA)
PERMISSIONS.register([Member(member_id="agent-1", role="Buyer", tenant=TENANT, agent=True)])


def _callout() -> AuthCallout:
    return AuthCallout(ca=CA, issuer_seed=SEED, permissions_of=PERMISSIONS.permissions_of)


def _request(cert_pem: bytes | None, **override: Any) -> bytes:
    callout = _callout()
    claims: dict[str, Any] = {
        "aud": "nats-authorization-request",
        "sub": callout.issuer,
        "iss": SERVER.public_key.decode(),
        "iat": int(time.time()),
        "exp": int(time.time()) + 2,
        "nats": {
            "server_id": {"id": SERVER.public_key.decode(), "name": "n1", "host": "127.0.0.1"},
            "user_nkey": "UCLIENTKEY",
            "client_info": {},
            "connect_opts": {"protocol": 1},
            "client_tls": {"verified_chains": [[cert_pem.decode(), CA.ca_pem.decode()]]}
            if cert_pem
            else None,
            "type": "authorization_request",
            "version": 2,
        },
    }
    claims.update(override)
    return encode_jwt(claims, SERVER).encode()


def _answer(data: bytes) -> dict[str, Any]:
    claims = decode_jwt(_callout().answer(data).decode())
    assert claims["iss"] == _callout().issuer and claims["sub"] == "UCLIENTKEY"
    assert claims["aud"] == SERVER.public_key.decode()
    nats_claims: dict[str, Any] = claims["nats"]
    return nats_claims


def test_a_registered_member_gets_a_user_with_its_permissions_until_its_cert_expires() -> None:
    answer = _answer(_request(MEMBER.cert_pem))
    assert "error" not in answer
    user = decode_jwt(answer["jwt"])
    assert user["sub"] == "UCLIENTKEY" and user["aud"] == "$G"
    assert user["name"] == "CN=agent-1,OU=Buyer,O=callout"
    assert user["exp"] == int(MEMBER.expires.timestamp())
    expected = PERMISSIONS.permissions_of(user["name"])
    assert expected is not None
    assert user["nats"]["pub"]["allow"] == expected["publish"]["allow"]
    assert user["nats"]["sub"]["allow"] == expected["subscribe"]["allow"]


def test_the_callout_refuses_what_it_can_judge_and_is_silent_on_other_drivers_members() -> None:
    foreign = DeploymentCA.create("foreign").member_cert("agent-1", "Buyer", tenant=TENANT)
    assert "not issued by the deployment CA" in _answer(_request(foreign.cert_pem))["error"]
    assert "no client certificate" in _answer(_request(None))["error"]
    assert "not this callout's issuer" in _answer(_request(MEMBER.cert_pem, sub="AOTHER"))["error"]
    assert "expired" in _answer(_request(MEMBER.cert_pem, exp=int(time.time()) - 5))["error"]
    expired = CA.member_cert("agent-1", "Buyer", tenant=TENANT, ttl=dt.timedelta(seconds=1))
    time.sleep(1.1)
    assert "not valid now" in _answer(_request(expired.cert_pem))["error"]
    callout = _callout()
    with pytest.raises(Exception, match="agent-2"):
        callout.answer(_request(CA.member_cert("agent-2", "Buyer", tenant=TENANT).cert_pem))
    # A request whose signature does not verify is no node's: dropped, counted.
    token = _request(MEMBER.cert_pem).decode()
    head, body, sig = token.split(".")
    forged_claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    forged_claims["nats"]["user_nkey"] = "UATTACKER"
    forged = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).rstrip(b"=").decode()
    assert callout.answer(f"{head}.{forged}.{sig}".encode()) == b""
    assert callout.refused["malformed_request"] == 1
