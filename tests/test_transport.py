"""Transport layer of mTLS-A against a real nats-server: only certificates from the
deployment CA get in, each maps to a user whose role fixes what it may publish and
subscribe, and members join a running server without a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pickle
import re
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from govmesh.bus import Bus, ensure_event_stream
from govmesh.config import Deployment
from govmesh.errors import ConfigError, RuntimeStartError
from govmesh.identity import (
    ClientCert,
    DeploymentCA,
    Issuer,
    Permissions,
    member_dn,
    permissions_for,
    renew_before,
    ssl_context,
)
from govmesh.roles import PLATFORM_ROLES
from govmesh.runtime import (
    ENV_NATS_CA,
    ENV_NATS_CA_KEY,
    ENV_NATS_CERT,
    ENV_NATS_KEY,
    AdmissionServer,
    NatsServer,
    Transport,
    admitted_transport,
)
from govmesh.runtime import Member as RegistryMember
from govmesh.runtime._nats import render_authorization
from govmesh.runtime._process import read_log
from govmesh.subjects import Subjects

WAIT_S = 5.0


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Transport, NatsServer]]:
    """A mutual-TLS nats-server with JetStream and its transport, shared by this module."""
    transport, server = Transport.embedded(tmp_path_factory.mktemp("mtls"))
    with server:
        yield transport, server


@pytest.fixture
def transport(secure: tuple[Transport, NatsServer]) -> Transport:
    return secure[0]


@pytest.fixture
def server(secure: tuple[Transport, NatsServer]) -> NatsServer:
    return secure[1]


class Member:
    """One raw nats-py connection with a certificate; collects the server's async errors."""

    def __init__(self, nc: NATS, errors: asyncio.Queue[Exception], member_id: str) -> None:
        self.nc = nc
        self.errors = errors
        self.member_id = member_id
        self.disconnects = 0

    async def violation(self, expected: str) -> None:
        """Assert the next error the server reported is a permissions violation `expected`.

        nats-py hands it to the error callback as ``nats.errors.Error``, lower-cased.
        """
        err = await asyncio.wait_for(self.errors.get(), WAIT_S)
        assert isinstance(err, nats.errors.Error), err
        assert f"permissions violation for {expected}".lower() in str(err), err


@pytest.fixture
async def connect(server: NatsServer) -> AsyncIterator[Any]:
    """Connect with a certificate; every connection is closed at the end of the test."""
    opened: list[NATS] = []

    async def open_(cert: ClientCert, tenant: str, *, own_inbox: bool = True) -> Member:
        errors: asyncio.Queue[Exception] = asyncio.Queue()

        async def on_error(exc: Exception) -> None:
            errors.put_nowait(exc)

        async def on_disconnect() -> None:
            member.disconnects += 1

        options: dict[str, Any] = {}
        if own_inbox:
            options["inbox_prefix"] = Subjects(tenant).inbox_prefix(cert.member_id)
        nc = await nats.connect(
            server.url,
            tls=ssl_context(cert),
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            allow_reconnect=False,
            connect_timeout=WAIT_S,
            **options,
        )
        opened.append(nc)
        member = Member(nc, errors, cert.member_id)
        return member

    yield open_
    for nc in opened:
        if not nc.is_closed:
            await nc.close()


async def refused(server: NatsServer, cert: ClientCert | None, reason: str) -> None:
    """Assert a connection with `cert` (None: none at all) fails, for `reason` per the log."""
    offset = server.log_path.stat().st_size
    if cert is None:
        assert server.tls is not None
        tls = ssl.create_default_context(cafile=str(server.tls.ca_file))
    else:
        tls = ssl_context(cert)

    async def quiet(_: Exception) -> None:
        pass

    with pytest.raises((OSError, nats.errors.Error)):
        await nats.connect(
            server.url, tls=tls, error_cb=quiet, allow_reconnect=False, connect_timeout=WAIT_S
        )
    deadline = time.monotonic() + WAIT_S
    while reason not in read_log(server.log_path, offset=offset):
        assert time.monotonic() < deadline, read_log(server.log_path, offset=offset)
        await asyncio.sleep(0.01)


async def ready(nc: NATS) -> None:
    """Return once the server has every subscription `nc` made so far.

    nats-py's ``flush`` writes its PING straight to the socket while a SUB may still wait in
    the pending buffer for the flusher task, so one PONG does not prove the SUB arrived. The
    flusher runs before the first PONG can be read, so the second PING follows the SUB.
    """
    await nc.flush()
    await nc.flush()


def issue(ca: DeploymentCA, member_id: str, role: str = "agent", **kw: Any) -> ClientCert:
    """A certificate straight from `ca`, bypassing `Transport.admit`."""
    cert_pem, key_pem = ca.client_cert(member_id, role, **kw)
    return ClientCert(
        member_id=member_id, role=role, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca.ca_pem
    )


def ids(prefix: str, *names: str) -> list[str]:
    """Member ids unique to this test: the server's users outlive a test."""
    return [f"{name}-{prefix}" for name in names]


# --- who gets in -------------------------------------------------------------------------


async def test_member_with_a_valid_certificate_connects_and_exchanges_messages(
    transport: Transport, connect: Any, prefix: str
):
    alice_id, bob_id = ids(prefix, "alice", "bob")
    s = Subjects(prefix)
    alice = await connect(transport.admit(alice_id, "agent", tenant=prefix), prefix)
    bob = await connect(transport.admit(bob_id, "agent", tenant=prefix), prefix)

    assert await _sent(bob, alice, s.msg(alice_id), b"hello") == b"hello"
    assert alice.errors.empty() and bob.errors.empty()


async def _sent(sender: Member, receiver: Member, subject: str, data: bytes) -> bytes:
    """What `receiver`, subscribed to `subject`, gets when `sender` publishes `data` there."""
    got: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        got.put_nowait(msg)

    await receiver.nc.subscribe(subject, cb=on_msg)
    await ready(receiver.nc)
    await sender.nc.publish(subject, data)
    return (await asyncio.wait_for(got.get(), WAIT_S)).data


async def test_client_without_a_certificate_is_refused(server: NatsServer):
    await refused(server, None, "client didn't provide a certificate")


async def test_certificate_from_another_ca_is_refused(
    transport: Transport, server: NatsServer, prefix: str
):
    (member_id,) = ids(prefix, "alice")
    transport.admit(member_id, "agent", tenant=prefix)
    forged = msgspec.structs.replace(
        issue(DeploymentCA.create("other-deployment"), member_id), ca_pem=transport.ca.ca_pem
    )

    await refused(server, forged, "certificate signed by unknown authority")


async def test_expired_certificate_is_refused(
    transport: Transport, server: NatsServer, prefix: str
):
    (member_id,) = ids(prefix, "alice")
    transport.admit(member_id, "agent", tenant=prefix)
    two_hours_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    expired = issue(transport.ca, member_id, ttl=dt.timedelta(hours=1), not_before=two_hours_ago)

    await refused(server, expired, "certificate has expired")


async def test_valid_certificate_of_a_member_never_admitted_is_refused(
    transport: Transport, server: NatsServer, prefix: str
):
    (member_id,) = ids(prefix, "stranger")
    await refused(server, issue(transport.ca, member_id), "authentication error")


# --- what members may do -----------------------------------------------------------------


async def test_agent_cannot_publish_on_another_agents_intent_subject(
    transport: Transport, connect: Any, prefix: str
):
    alice_id, mallory_id, gov_id = ids(prefix, "alice", "mallory", "governance")
    s = Subjects(prefix)
    mallory = await connect(transport.admit(mallory_id, "agent", tenant=prefix), prefix)
    governance = await connect(transport.admit(gov_id, "governance", tenant=prefix), prefix)
    transport.admit(alice_id, "agent", tenant=prefix)
    intents: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_intent(msg: Msg) -> None:
        intents.put_nowait(msg)

    await governance.nc.subscribe(s.all("intent"), queue="governance", cb=on_intent)
    await ready(governance.nc)

    await mallory.nc.publish(s.intent(alice_id), b"forged")
    await mallory.nc.publish(s.intent(mallory_id), b"own")
    await mallory.nc.flush()

    await mallory.violation(f'publish to "{s.intent(alice_id)}"')
    # One connection's messages arrive in order: had the forged one passed, it came first.
    first = await asyncio.wait_for(intents.get(), WAIT_S)
    assert (first.subject, first.data) == (s.intent(mallory_id), b"own")
    assert mallory.errors.empty() and not mallory.nc.is_closed


async def test_agent_cannot_subscribe_to_another_agents_inboxes(
    transport: Transport, connect: Any, prefix: str
):
    alice_id, mallory_id = ids(prefix, "alice", "mallory")
    s = Subjects(prefix)
    alice = await connect(transport.admit(alice_id, "agent", tenant=prefix), prefix)
    mallory = await connect(transport.admit(mallory_id, "agent", tenant=prefix), prefix)
    stolen: list[Msg] = []

    async def steal(msg: Msg) -> None:
        stolen.append(msg)

    await mallory.nc.subscribe(s.msg(alice_id), cb=steal)
    await mallory.violation(f'subscription to "{s.msg(alice_id)}"')
    await mallory.nc.subscribe(s.inboxes(alice_id), cb=steal)
    await mallory.violation(f'subscription to "{s.inboxes(alice_id)}"')

    received: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        received.put_nowait(msg)

    await alice.nc.subscribe(s.msg(alice_id), cb=on_msg)
    await ready(alice.nc)
    await mallory.nc.publish(s.msg(alice_id), b"for alice")
    await mallory.nc.flush()
    assert (await asyncio.wait_for(received.get(), WAIT_S)).data == b"for alice"
    await mallory.nc.flush()  # anything routed to mallory would precede this PONG
    assert stolen == []


async def test_request_reply_through_the_gateway_uses_the_callers_own_inbox(
    transport: Transport, connect: Any, prefix: str
):
    agent_id, gateway_id = ids(prefix, "proc", "gateway")
    s = Subjects(prefix)
    agent = await connect(
        transport.admit(agent_id, "Procurement-Agent-v2", tenant=prefix, agent=True), prefix
    )
    gateway = await connect(transport.admit(gateway_id, "gateway", tenant=prefix), prefix)
    reply_subjects: list[str] = []

    async def serve(msg: Msg) -> None:
        reply_subjects.append(msg.reply)
        await msg.respond(b"done:" + msg.data)

    await gateway.nc.subscribe(s.all("tool"), queue="gateway", cb=serve)
    await ready(gateway.nc)

    reply = await agent.nc.request(s.tool("erp.create_po"), b"po-1", timeout=WAIT_S)

    assert reply.data == b"done:po-1"
    assert reply_subjects[0].startswith(s.inbox_prefix(agent_id) + ".")
    # Responses only: the gateway cannot publish on its own initiative.
    await gateway.nc.publish(s.decision(agent_id, "w1"), b"forged decision")
    await gateway.violation(f'publish to "{s.decision(agent_id, "w1")}"')


async def test_requests_without_the_member_inbox_prefix_get_no_reply(
    transport: Transport, connect: Any, prefix: str
):
    agent_id, gateway_id = ids(prefix, "proc", "gateway")
    s = Subjects(prefix)
    agent = await connect(
        transport.admit(agent_id, "agent", tenant=prefix), prefix, own_inbox=False
    )
    gateway = await connect(transport.admit(gateway_id, "gateway", tenant=prefix), prefix)

    async def serve(msg: Msg) -> None:
        await msg.respond(b"done")

    await gateway.nc.subscribe(s.all("tool"), cb=serve)
    await ready(gateway.nc)

    with pytest.raises(nats.errors.TimeoutError):
        await agent.nc.request(s.tool("erp.create_po"), b"po-1", timeout=0.5)
    await agent.violation('subscription to "_inbox.')


async def test_coordinator_may_create_the_event_stream_and_an_agent_may_not(
    transport: Transport, connect: Any, prefix: str
):
    coordinator_id, agent_id = ids(prefix, "coordinator", "agent")
    coordinator = await connect(
        transport.admit(coordinator_id, "coordinator", tenant=prefix), prefix
    )
    agent = await connect(transport.admit(agent_id, "agent", tenant=prefix), prefix)

    config = await ensure_event_stream(coordinator.nc, prefix)
    assert (await coordinator.nc.jetstream().stream_info(config.name)).config.name == config.name

    with pytest.raises(nats.errors.TimeoutError):
        await agent.nc.jetstream(timeout=0.5).stream_info(config.name)
    await agent.violation('publish to "$js.api.stream.info.')


async def test_bus_connect_with_a_client_cert_joins_over_tls_with_the_member_inbox(
    transport: Transport, server: NatsServer, prefix: str
):
    (agent_id,) = ids(prefix, "agent")
    issuer = Issuer(name=f"test:{prefix}", audience=f"govmesh:{prefix}")
    dep = Deployment(
        tenant=prefix,
        nats_url=server.url,
        redis_url="",
        audience=issuer.audience,
        issuers=(issuer.public_key,),
        tls=True,
    )
    cert = transport.admit(agent_id, "agent", tenant=prefix)

    bus = await Bus.connect(dep, issuer.identity(agent_id, "agent"), client_cert=cert)
    try:
        assert bus.nc.is_connected
        assert bus.nc.new_inbox().startswith(Subjects(prefix).inbox_prefix(agent_id) + ".")
    finally:
        await bus.close()


# --- joining a running server --------------------------------------------------------------


def reloads(server: NatsServer) -> int:
    return read_log(server.log_path).count("Reloaded server configuration")


async def test_admitting_a_member_reloads_without_restart_and_keeps_connections(
    transport: Transport, server: NatsServer, connect: Any, prefix: str
):
    alice_id, carol_id = ids(prefix, "alice", "carol")
    s = Subjects(prefix)
    pid, before = server.pid, reloads(server)
    alice = await connect(transport.admit(alice_id, "agent", tenant=prefix), prefix)
    got: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        got.put_nowait(msg)

    await alice.nc.subscribe(s.msg(alice_id), cb=on_msg)
    await ready(alice.nc)

    carol = await connect(transport.admit(carol_id, "agent", tenant=prefix), prefix)
    await carol.nc.publish(s.msg(alice_id), b"from carol")

    assert (await asyncio.wait_for(got.get(), WAIT_S)).data == b"from carol"
    assert server.pid == pid
    assert reloads(server) == before + 2
    assert alice.nc.is_connected and alice.disconnects == 0
    assert alice.nc.stats["reconnects"] == 0


async def test_admitting_again_renews_the_certificate_without_a_reload(
    transport: Transport, server: NatsServer, connect: Any, prefix: str
):
    (alice_id,) = ids(prefix, "alice")
    first = transport.admit(alice_id, "agent", tenant=prefix)
    before = reloads(server)

    second = transport.admit(alice_id, "agent", tenant=prefix)

    assert second.cert_pem != first.cert_pem
    assert reloads(server) == before
    member = await connect(second, prefix)
    assert member.nc.is_connected


def test_admitting_a_member_again_with_another_role_is_refused(transport: Transport, prefix: str):
    (alice_id,) = ids(prefix, "alice")
    transport.admit(alice_id, "agent", tenant=prefix)

    with pytest.raises(ConfigError, match=re.escape("'governance'")):
        transport.admit(alice_id, "governance", tenant=prefix)
    assert transport.members[(prefix, alice_id)].role == "agent"


def test_admit_rejects_ids_that_are_not_subject_tokens(transport: Transport, prefix: str):
    with pytest.raises(ConfigError, match=re.escape("'bad.id'")):
        transport.admit("bad.id", "agent", tenant=prefix)
    with pytest.raises(ConfigError, match=re.escape("'a,b'")):
        transport.admit(f"ok-{prefix}", "a,b", tenant=prefix)
    assert (prefix, f"ok-{prefix}") not in transport.members


def test_a_reload_the_server_refuses_raises_with_its_log(tmp_path: Path):
    _, server = Transport.embedded(tmp_path, jetstream=False)
    with server:
        server.authorization_path.write_text("authorization { users = [ {user: broken")

        with pytest.raises(RuntimeStartError, match="refused the new configuration") as err:
            server.reload()
        assert "authorization.conf" in str(err.value)
        assert server.running


def test_users_need_a_server_with_tls(tmp_path: Path):
    with pytest.raises(ConfigError, match="no tls"):
        NatsServer(workdir=tmp_path).authorize({})


# --- external NATS: the operator's files ---------------------------------------------------


def test_external_transport_without_the_ca_key_cannot_admit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    ca = DeploymentCA.create("operator-ca")
    cert_pem, key_pem = ca.client_cert("worker-1", "agent")
    for name, data in {"ca.pem": ca.ca_pem, "me.pem": cert_pem, "me-key.pem": key_pem}.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setenv(ENV_NATS_CA, str(tmp_path / "ca.pem"))
    monkeypatch.setenv(ENV_NATS_CERT, str(tmp_path / "me.pem"))
    monkeypatch.setenv(ENV_NATS_KEY, str(tmp_path / "me-key.pem"))
    monkeypatch.delenv(ENV_NATS_CA_KEY, raising=False)

    transport = Transport.from_environment()

    assert transport is not None and transport.own_cert is not None
    assert (transport.own_cert.member_id, transport.own_cert.role) == ("worker-1", "agent")
    with pytest.raises(ConfigError, match=ENV_NATS_CA_KEY):
        transport.admit("worker-2", "agent", tenant="acme")


def test_external_transport_with_the_ca_key_admits_and_renders_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    ca = DeploymentCA.create("operator-ca")
    (tmp_path / "ca.pem").write_bytes(ca.ca_pem)
    (tmp_path / "ca-key.pem").write_bytes(ca.key_pem)
    monkeypatch.setenv(ENV_NATS_CA, str(tmp_path / "ca.pem"))
    monkeypatch.setenv(ENV_NATS_CA_KEY, str(tmp_path / "ca-key.pem"))
    monkeypatch.delenv(ENV_NATS_CERT, raising=False)
    monkeypatch.delenv(ENV_NATS_KEY, raising=False)

    transport = Transport.from_environment()
    assert transport is not None
    cert = transport.admit("worker-2", "agent", tenant="acme")

    assert cert.ca_pem == ca.ca_pem
    assert '"user": "CN=worker-2,OU=agent,O=acme"' in transport.authorization()


def test_external_transport_names_an_unreadable_file(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENV_NATS_CA, "/nonexistent/ca.pem")

    with pytest.raises(ConfigError, match=re.escape("'/nonexistent/ca.pem'")):
        Transport.from_environment()


# --- certificates (pure) -------------------------------------------------------------------


def test_member_dn_is_what_verify_and_map_matches():
    assert member_dn("proc-1", "Requester") == "CN=proc-1,OU=Requester,O=govmesh"
    assert member_dn("proc-1", "Requester", "acme") == "CN=proc-1,OU=Requester,O=acme"


def test_member_dn_refuses_characters_a_dn_would_escape():
    with pytest.raises(ConfigError, match=re.escape("'x=y'")):
        member_dn("x=y", "agent")


def test_renew_before_is_half_way_through_the_lifetime_from_issue():
    ca = DeploymentCA.create("test")
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert_pem, _ = ca.client_cert("a", "agent", ttl=dt.timedelta(hours=24))
    after = dt.datetime.now(dt.UTC)
    half = dt.timedelta(hours=12)
    # Certificate times have whole-second precision.
    assert before + half - dt.timedelta(seconds=1) <= renew_before(cert_pem) <= after + half


def test_a_short_lived_certificate_is_not_due_for_renewal_when_issued():
    ca = DeploymentCA.create("test")
    cert_pem, _ = ca.client_cert("a", "agent", ttl=dt.timedelta(seconds=8))
    assert renew_before(cert_pem) > dt.datetime.now(dt.UTC)


def test_client_cert_pickles_and_its_repr_hides_the_key():
    cert = issue(DeploymentCA.create("test"), "a")

    assert pickle.loads(pickle.dumps(cert)) == cert
    assert "PRIVATE" not in repr(cert)


def test_ssl_context_leaves_no_key_file_behind():
    cert = issue(DeploymentCA.create("test"), "a")
    before = set(os.listdir(tempfile.gettempdir()))

    ssl_context(cert)

    assert {n for n in set(os.listdir(tempfile.gettempdir())) - before if "govmesh" in n} == set()


def test_a_ca_without_its_key_issues_nothing():
    ca = DeploymentCA.load(DeploymentCA.create("test").ca_pem)

    with pytest.raises(ConfigError, match="no private key"):
        ca.client_cert("a", "agent")


# --- permissions (pure) --------------------------------------------------------------------


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def may(perms: Permissions, direction: str, subject: str) -> bool:
    rules = perms[direction]  # type: ignore[literal-required]
    allowed = any(matches(p, subject) for p in rules["allow"])
    return allowed and not any(matches(p, subject) for p in rules["deny"])


S = Subjects("acme")


def test_agent_publishes_intent_usage_and_state_only_under_its_own_id():
    perms = permissions_for("alice", "Requester", S, agent=True)

    for own in (S.intent("alice"), S.usage("alice"), S.state("alice")):
        assert may(perms, "publish", own)
    for other in (S.intent("bob"), S.usage("bob"), S.state("bob")):
        assert not may(perms, "publish", other)
    for allowed in (S.msg("bob"), S.tool("erp.create_po"), S.ctl("budget"), S.security):
        assert may(perms, "publish", allowed)
    for denied in (S.decision("alice", "w1"), S.approval("w1"), "$JS.API.STREAM.DELETE.X"):
        assert not may(perms, "publish", denied)
    # One reply to a request it received, and nothing more (nats-server allow_responses).
    assert perms["allow_responses"]


def test_agent_subscribes_only_to_its_inbox_its_decisions_and_its_reply_inboxes():
    perms = permissions_for("alice", "agent", S)

    for allowed in (S.msg("alice"), S.decision("alice", "w1"), S.inbox_prefix("alice") + ".x.y"):
        assert may(perms, "subscribe", allowed)
    for denied in (S.msg("bob"), S.all("msg"), S.intent("alice"), S.inbox_prefix("bob") + ".x"):
        assert not may(perms, "subscribe", denied)
    for denied in (S.decision("bob", "w1"), S.decisions("bob"), S.all("decision")):
        assert not may(perms, "subscribe", denied)
    assert not may(perms, "subscribe", "_INBOX.x.y")


@pytest.mark.parametrize(
    ("role", "subscribes", "publishes", "responds"),
    [
        ("governance", ["intent.a", "approval.w"], ["decision.a.w", "approval.w"], True),
        ("gateway", ["tool.erp.create_po"], ["result.a"], True),
        ("budget", ["usage.a", "ctl.budget"], [], True),
        ("state", ["state.a", "ctl.state"], ["msg.a", "snapshot.a"], True),
        ("issuer", ["ctl.identity"], [], True),
        ("operator", ["approval.w"], ["approval.w"], False),
        ("coordinator", ["msg.coordinator-1"], ["msg.a", "ctl.budget"], False),
        ("sentinel", [], ["security"], False),
    ],
)
def test_platform_roles_get_what_their_actor_does(
    role: str, subscribes: list[str], publishes: list[str], responds: bool
):
    perms = permissions_for(f"{role}-1" if role != "coordinator" else "coordinator-1", role, S)

    for area in subscribes:
        assert may(perms, "subscribe", f"{S.prefix}.{area}")
    for area in publishes:
        assert may(perms, "publish", f"{S.prefix}.{area}")
    assert perms["allow_responses"] is responds
    assert not may(perms, "publish", S.intent("a"))
    assert not may(perms, "subscribe", S.msg("a"))


def test_only_the_coordinator_may_create_the_tenants_stream_and_nobody_may_delete_it():
    own, other = S.event_stream, Subjects("globex").event_stream
    for role in PLATFORM_ROLES:
        perms = permissions_for("m", role, S)
        assert may(perms, "publish", f"$JS.API.STREAM.CREATE.{own}") is (role == "coordinator")
        for op in ("CREATE", "INFO", "UPDATE", "DELETE", "PURGE"):
            assert not may(perms, "publish", f"$JS.API.STREAM.{op}.{other}")
        for op in ("UPDATE", "DELETE", "PURGE", "MSG.DELETE.x"):
            assert not may(perms, "publish", f"$JS.API.STREAM.{op}.{own}")
        for api in ("STREAM.NAMES", "STREAM.LIST", "INFO", f"CONSUMER.DELETE.{own}.audit-acme"):
            assert not may(perms, "publish", f"$JS.API.{api}")


def test_the_coordinator_inspects_its_tenants_stream_and_its_consumers():
    perms = permissions_for("coordinator-1", "coordinator", S)
    stream = S.event_stream
    assert may(perms, "publish", f"$JS.API.STREAM.INFO.{stream}")
    assert may(perms, "publish", f"$JS.API.CONSUMER.INFO.{stream}.audit-acme")
    assert not may(perms, "publish", f"$JS.API.CONSUMER.CREATE.{stream}.c1.{S.everything}")
    assert not may(perms, "publish", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.audit-acme")


def test_the_auditor_reads_everything_and_may_only_replay_its_tenants_stream():
    perms = permissions_for("audit-1", "auditor", S)
    own, other = S.event_stream, Subjects("globex").event_stream
    assert may(perms, "subscribe", S.intent("anyone"))
    assert may(perms, "subscribe", S.security)
    assert may(perms, "subscribe", S.snapshot("anyone"))
    # A snapshot in transit holds its tool tier in the clear.
    assert not may(perms, "subscribe", S.state("anyone"))
    # What nats-py sends to create, resume and read a consumer, and to acknowledge.
    for api in (
        f"$JS.API.STREAM.INFO.{own}",
        f"$JS.API.CONSUMER.CREATE.{own}.audit-acme.{S.everything}",
        f"$JS.API.CONSUMER.CREATE.{own}.watch1",
        f"$JS.API.CONSUMER.INFO.{own}.audit-acme",
        f"$JS.API.CONSUMER.MSG.NEXT.{own}.audit-acme",
        f"$JS.ACK.{own}.audit-acme.1.2.3.1700000000.0",
    ):
        assert may(perms, "publish", api), api
    for api in (
        f"$JS.API.STREAM.INFO.{other}",
        f"$JS.API.CONSUMER.CREATE.{other}.audit-acme.gm.globex.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{other}.audit-globex",
        f"$JS.ACK.{other}.audit-globex.1.2.3.1700000000.0",
        f"$JS.API.CONSUMER.DELETE.{own}.audit-acme",
        f"$JS.API.STREAM.CREATE.{own}",
    ):
        assert not may(perms, "publish", api), api
    for denied in (S.intent("audit-1"), S.msg("a"), S.decision("a", "w"), S.tool("erp.x")):
        assert not may(perms, "publish", denied)


def test_every_known_role_reports_security_events_and_reads_its_own_replies():
    for role, agent in [*[(r, False) for r in PLATFORM_ROLES], ("Requester", True)]:
        perms = permissions_for("m", role, S, agent=agent)
        assert may(perms, "publish", S.security)
        assert may(perms, "publish", S.ctl("identity"))
        assert may(perms, "subscribe", S.inbox_prefix("m") + ".abc.1")


def test_unknown_role_may_only_publish_security_events():
    perms = permissions_for("m", "goverance", S)

    assert perms["publish"] == {"allow": [S.security], "deny": []}
    assert perms["subscribe"] == {"allow": [], "deny": [">"]}
    assert not perms["allow_responses"]


def test_an_agent_role_may_not_reuse_a_platform_role_name():
    with pytest.raises(ConfigError, match=re.escape("'gateway'")):
        permissions_for("m", "gateway", S, agent=True)


def test_platform_role_names_match_the_actors_that_use_them():
    from govmesh.roles import COORDINATOR_ROLE, GOVERNANCE_ROLE, ISSUER_ROLE, OPERATOR_ROLE

    assert {GOVERNANCE_ROLE, OPERATOR_ROLE, ISSUER_ROLE, COORDINATOR_ROLE} <= PLATFORM_ROLES


def test_rendered_users_never_allow_everything_by_omission():
    perms = permissions_for("m", "agent", S)
    perms["subscribe"] = {"allow": [], "deny": []}

    with pytest.raises(ConfigError, match="allow nothing"):
        render_authorization({"CN=m,OU=agent,O=govmesh": perms})


# --- joining a bus another process serves -------------------------------------------------


@pytest.fixture
async def admitted(transport: Transport, tmp_path: Path) -> AsyncIterator[Transport]:
    """A process's view of the server through the admission socket the serving one keeps."""
    async with AdmissionServer(tmp_path / "admission.sock", transport) as server:
        # The joining side blocks on the socket, as it does in its own process.
        yield await asyncio.to_thread(admitted_transport, server.path)


async def test_a_joining_process_admits_its_members_through_the_admission_socket(
    transport: Transport, admitted: Transport, connect: Any, prefix: str
):
    alice_id, bob_id = ids(prefix, "alice", "bob")
    s = Subjects(prefix)
    # It trusts the serving process's CA, and holds no key of it.
    assert admitted.ca.ca_pem == transport.ca.ca_pem
    with pytest.raises(ConfigError):
        _ = admitted.ca.key_pem
    certs = await asyncio.to_thread(
        admitted.admit_many,
        [
            RegistryMember(member_id=alice_id, role="agent", tenant=prefix),
            RegistryMember(member_id=bob_id, role="agent", tenant=prefix),
        ],
    )
    # The serving process registered them: its server knows them, with their permissions.
    assert (prefix, alice_id) in transport.members and (prefix, bob_id) in transport.members
    alice = await connect(certs[alice_id], prefix)
    bob = await connect(certs[bob_id], prefix)
    assert await _sent(bob, alice, s.msg(alice_id), b"hello") == b"hello"
    # Their permissions are their role's: an agent may not read another's inbox.
    await bob.nc.subscribe(s.msg(alice_id))
    await bob.violation(f'subscription to "{s.msg(alice_id)}"')


async def test_admission_signs_only_for_a_member_registered_in_that_role(
    admitted: Transport, prefix: str
):
    (carol_id,) = ids(prefix, "carol")
    with pytest.raises(ConfigError, match=f"{carol_id!r} .* is not registered in role 'agent'"):
        await asyncio.to_thread(admitted.ca.client_cert, carol_id, "agent", tenant=prefix)
    await asyncio.to_thread(
        admitted.register, [RegistryMember(member_id=carol_id, role="auditor", tenant=prefix)]
    )
    with pytest.raises(ConfigError, match="is not registered in role 'governance'"):
        await asyncio.to_thread(admitted.ca.client_cert, carol_id, "governance", tenant=prefix)


def test_a_stopped_admission_socket_is_named_in_the_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"GOVMESH_NATS_ADMISSION=.*stopped"):
        admitted_transport(tmp_path / "admission.sock")
