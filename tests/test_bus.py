"""The signed bus against a real nats-server with mutual TLS and per-member permissions:
verified messages reach handlers, nothing else does, and every refusal is reported."""

from __future__ import annotations

import asyncio
import inspect
import os
import time

import msgspec
import pytest

from govmesh.bus import Bus, Codec, Delivery, Sealed, SecurityEvent, Subjects
from govmesh.bus._stream import CAPTURED
from govmesh.errors import ConfigError
from govmesh.identity import Issuer

from _deploy import deployment


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    n: int


class Other(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    text: str


class Harness:
    """A sender, a receiver and a security monitor on one tenant."""

    def __init__(self, nats_url: str, redis_url: str, tenant: str, transport) -> None:
        self.dep, self.issuer = deployment(nats_url, redis_url, tenant, transport)
        self.seen: list[Delivery] = []
        self.events: list[SecurityEvent] = []
        self.sentinel = asyncio.Event()

    async def __aenter__(self) -> Harness:
        self.alice = await Bus.connect(self.dep, self.issuer.identity("alice", "agent"))
        self.bob = await Bus.connect(self.dep, self.issuer.identity("bob", "agent"))
        self.monitor = await Bus.connect(self.dep, self.issuer.identity("monitor", "auditor"))
        self.inbox = self.bob.subjects.msg("bob")

        async def on_ping(d: Delivery) -> None:
            self.seen.append(d)
            if d.body.n == -1:
                self.sentinel.set()

        async def on_event(d: Delivery) -> None:
            self.events.append(d.body)

        await self.bob.subscribe(self.inbox, on_ping, accepts=Ping)
        await self.monitor.subscribe(
            self.monitor.subjects.security, on_event, accepts=SecurityEvent
        )
        await self.bob.flush()
        await self.monitor.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for bus in (self.alice, self.bob, self.monitor):
            await bus.close()

    def sealed(self, n: int, *, subject: str | None = None, now: float | None = None) -> bytes:
        _, data = self.alice.codec.seal(
            self.alice.identity, subject=subject or self.inbox, body=Ping(n=n), now=now
        )
        return data

    async def raw(self, data: bytes, subject: str | None = None) -> None:
        await self.alice.nc.publish(subject or self.inbox, data)

    async def settle(self, refused: int) -> None:
        """Send a valid sentinel after the others, wait for it and for the refusal reports."""
        await self.alice.publish(self.inbox, Ping(n=-1))
        await asyncio.wait_for(self.sentinel.wait(), 10)
        deadline = time.monotonic() + 10
        while len(self.events) < refused and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def handled(self) -> list[int]:
        return [d.body.n for d in self.seen]


@pytest.fixture
async def h(secure_nats, redis_server, prefix):
    transport, server = secure_nats
    async with Harness(server.url, redis_server.url, prefix, transport) as harness:
        yield harness


def _resign(codec: Codec, sealed: Sealed, envelope: bytes, key) -> bytes:
    return codec.encode(Sealed(envelope, sealed.token, key.sign(envelope)))


async def test_valid_message_reaches_handler_with_verified_sender(h: Harness) -> None:
    await h.alice.publish(h.inbox, Ping(n=7), workflow="wf-1")
    await h.settle(refused=0)
    assert h.handled() == [7, -1]
    first = h.seen[0]
    assert first.claims.sub == "alice"
    assert first.envelope.workflow == "wf-1"
    assert first.envelope.kind == "Ping"
    assert h.bob.rejected == {}


def _forged(h: Harness, n: int) -> bytes:
    """Alice's message ``n`` with one bit of its signature flipped."""
    sealed = h.bob.codec.open(h.sealed(n))
    signature = bytearray(sealed.signature)
    signature[0] ^= 0xFF
    return h.bob.codec.encode(Sealed(sealed.envelope, sealed.token, bytes(signature)))


async def test_bad_signature_is_never_seen_by_a_handler(h: Harness) -> None:
    await h.raw(_forged(h, 1))
    await h.settle(refused=1)
    assert h.handled() == [-1]
    assert h.bob.rejected["bad_signature"] == 1
    assert [(e.reason, e.subject, e.receiver) for e in h.events] == [
        ("bad_signature", h.inbox, "bob")
    ]


async def test_tampered_payload_with_stolen_token_is_refused(h: Harness) -> None:
    # An attacker holding alice's token but not her key signs a changed envelope itself.
    sealed = h.bob.codec.open(h.sealed(2))
    from govmesh.identity import SigningKey

    tampered = sealed.envelope.replace(b"\x02", b"\x09", 1)
    await h.raw(_resign(h.bob.codec, sealed, tampered, SigningKey()))
    await h.settle(refused=1)
    assert h.handled() == [-1]
    assert h.bob.rejected["bad_signature"] == 1


async def test_exact_replay_is_refused(h: Harness) -> None:
    data = h.sealed(3)
    await h.raw(data)
    await h.raw(data)
    await h.settle(refused=1)
    assert h.handled() == [3, -1]
    assert h.bob.rejected["replay"] == 1


async def test_refusals_are_counted_by_reason_in_the_security_rejections_metric(
    h: Harness, metric_reader
) -> None:
    metric_reader.read()  # skip what earlier tests recorded
    replayed = h.sealed(4)
    await h.raw(replayed)
    await h.raw(replayed)
    await h.raw(_forged(h, 5))
    await h.settle(refused=2)
    got = metric_reader.read()
    assert h.handled() == [4, -1]
    rejections = "govmesh.security.rejections"
    assert got.total(rejections, {"govmesh.security.reason": "replay"}) == 1
    assert got.total(rejections, {"govmesh.security.reason": "bad_signature"}) == 1
    assert got.total(rejections) == 2


async def test_message_moved_to_another_subject_is_refused(h: Harness) -> None:
    data = h.sealed(4, subject=h.bob.subjects.msg("carol"))
    await h.raw(data)
    await h.settle(refused=1)
    assert h.handled() == [-1]
    assert h.bob.rejected["wrong_subject"] == 1


async def test_stale_and_future_messages_are_refused(h: Harness) -> None:
    await h.raw(h.sealed(5, now=time.time() - 120))
    await h.raw(h.sealed(6, now=time.time() + 120))
    await h.settle(refused=2)
    assert h.handled() == [-1]
    assert h.bob.rejected["stale"] == 1
    assert h.bob.rejected["future"] == 1


async def test_token_from_unknown_issuer_is_refused(h: Harness) -> None:
    rogue = Issuer(name=h.issuer.name, audience=h.issuer.audience)
    mallory = rogue.identity("alice", "agent")
    _, data = h.alice.codec.seal(mallory, subject=h.inbox, body=Ping(n=8))
    await h.raw(data)
    await h.settle(refused=1)
    assert h.handled() == [-1]
    assert h.bob.rejected["token_unknown_issuer"] == 1


async def test_expired_token_is_refused(h: Harness) -> None:
    from govmesh.identity import Identity, SigningKey

    key = SigningKey()
    token = h.issuer.issue(
        sub="alice", role="agent", key=key.public, ttl_s=60, now=time.time() - 120
    )
    old = Identity(agent_id="alice", role="agent", key=key, token=token)
    _, data = h.alice.codec.seal(old, subject=h.inbox, body=Ping(n=9))
    await h.raw(data)
    await h.settle(refused=1)
    assert h.handled() == [-1]
    assert h.bob.rejected["token_expired"] == 1


async def test_garbage_and_unexpected_kinds_are_refused_and_receiver_keeps_running(
    h: Harness,
) -> None:
    await h.raw(os.urandom(200))
    await h.raw(b"")
    await h.alice.publish(h.inbox, Other(text="not a ping"))
    await h.settle(refused=3)
    assert h.handled() == [-1]
    assert h.bob.rejected["malformed"] == 2
    assert h.bob.rejected["unexpected_kind"] == 1
    assert {e.reason for e in h.events} == {"malformed", "unexpected_kind"}


async def test_request_gets_a_verified_reply(h: Harness) -> None:
    service = await Bus.connect(h.dep, h.issuer.identity("state-1", "state"))

    async def echo(d: Delivery) -> None:
        await service.respond(d, Ping(n=d.body.n * 2))

    try:
        subject = service.subjects.ctl("state")
        await service.subscribe(subject, echo, accepts=Ping, concurrent=False)
        await service.flush()
        reply = await h.alice.request(subject, Ping(n=21), accepts=Ping, timeout=5)
    finally:
        await service.close()
    assert reply.body.n == 42
    assert reply.claims.sub == "state-1"


async def test_not_yet_valid_token_is_refused(h: Harness) -> None:
    from govmesh.identity import Identity, SigningKey

    key = SigningKey()
    later = time.time() + 120
    token = h.issuer.issue(sub="alice", role="agent", key=key.public, now=later)
    early = Identity(agent_id="alice", role="agent", key=key, token=token)
    _, data = h.alice.codec.seal(early, subject=h.inbox, body=Ping(n=10))
    await h.raw(data)
    await h.settle(refused=1)
    assert h.handled() == [-1]
    assert h.bob.rejected["token_not_yet_valid"] == 1


async def test_oversized_and_incomplete_messages_are_refused(h: Harness) -> None:
    big = h.sealed(11)
    big_body = h.alice.codec.seal(
        h.alice.identity, subject=h.inbox, body=Other(text="x" * (600 * 1024))
    )[1]
    whole = h.bob.codec.open(big)
    await h.raw(big_body)
    await h.raw(h.bob.codec.encode(Sealed(whole.envelope, "", whole.signature)))
    await h.raw(h.bob.codec.encode([whole.envelope, whole.token]))
    await h.settle(refused=3)
    assert h.handled() == [-1]
    assert h.bob.rejected["oversized"] == 1
    assert h.bob.rejected["token_malformed"] == 1
    assert h.bob.rejected["malformed"] == 1


async def test_a_capability_the_token_lacks_is_refused_before_the_handler(h: Harness) -> None:
    seen: list[int] = []

    async def handler(d: Delivery) -> None:
        seen.append(d.body.n)

    def needs_audit(claims, body: Ping) -> None:
        claims.require("audit.read")

    guarded = await Bus.connect(h.dep, h.issuer.identity("carol", "agent"))
    try:
        await guarded.subscribe(
            guarded.subjects.msg("carol"), handler, accepts=Ping, authorize=needs_audit
        )
        await guarded.flush()
        trusted = await Bus.connect(
            h.dep, h.issuer.identity("dave", "agent", capabilities=("audit.read",))
        )
        try:
            await h.alice.publish(guarded.subjects.msg("carol"), Ping(n=1))
            await trusted.publish(guarded.subjects.msg("carol"), Ping(n=2))
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            await trusted.close()
    finally:
        await guarded.close()
    assert seen == [2]
    assert guarded.rejected == {"capability": 1}


async def test_token_rotation_under_steady_traffic_loses_and_rejects_nothing(
    secure_nats, redis_server, prefix
) -> None:
    from govmesh.authority import TokenAuthority

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    ttl = 2.0  # seconds, so that several rotations happen during the test
    authority = TokenAuthority(dep, issuer, ttl_s=ttl)
    await authority.start()
    alice = await Bus.connect(dep, issuer.identity("alice", "agent", ttl_s=ttl))
    bob = await Bus.connect(dep, issuer.identity("bob", "agent", ttl_s=ttl))
    got: list[int] = []
    done = asyncio.Event()
    total = 400

    async def on_ping(d: Delivery) -> None:
        got.append(d.body.n)
        if len(got) == total:
            done.set()

    try:
        await bob.subscribe(bob.subjects.msg("bob"), on_ping, accepts=Ping)
        await bob.flush()
        first_token = alice.identity.token
        for n in range(total):
            await alice.publish(alice.subjects.msg("bob"), Ping(n=n))
            await asyncio.sleep(0.012)  # about 5 s of steady traffic: two rotations or more
        await asyncio.wait_for(done.wait(), 10)
    finally:
        for member in (alice, bob, authority):
            await member.close()
    assert sorted(got) == list(range(total))
    assert bob.rejected == {} and alice.rejected == {}
    assert alice.rotations >= 2 and bob.rotations >= 2
    assert alice.identity.token != first_token
    assert authority.granted >= 4


async def test_client_certificates_are_renewed_so_a_reconnect_after_expiry_works(
    tmp_path, redis_server, prefix
) -> None:
    import datetime as dt

    from govmesh.authority import TokenAuthority
    from govmesh.runtime import Transport

    transport, server = Transport.embedded(tmp_path)
    short = dt.timedelta(seconds=4)
    with server:
        dep, issuer = deployment(server.url, redis_server.url, prefix)
        authority = TokenAuthority(dep, issuer, ttl_s=3.0, ca=transport.ca, cert_ttl=short)
        transport.enrol([authority.identity], tenant=prefix)
        members = {
            name: issuer.identity(name, "agent", ttl_s=3.0) for name in ("alice", "bob", "carol")
        }
        transport.enrol(members.values(), tenant=prefix, ttl=short)
        await authority.start()
        alice = await Bus.connect(dep, members["alice"])
        bob = await Bus.connect(dep, members["bob"])
        carol = await Bus.connect(dep, members["carol"], rotate=False)  # never renews
        got: list[int] = []

        async def on_ping(d: Delivery) -> None:
            got.append(d.body.n)

        try:
            await bob.subscribe(bob.subjects.msg("bob"), on_ping, accepts=Ping)
            await bob.flush()
            first_cert = members["alice"].cert
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (
                alice.cert_renewals < 2 or bob.cert_renewals < 2
            ):
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # past the first certificates' expiry
            server.restart()  # every client must handshake again
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                alice.nc.is_connected and bob.nc.is_connected
            ):
                await asyncio.sleep(0.1)
            # Core NATS is at-most-once across a reconnect: until bob's subscription is
            # replayed to the restarted server, a publish reaches nobody, so retry.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not got:
                await alice.publish(alice.subjects.msg("bob"), Ping(n=7))
                await asyncio.sleep(0.2)
            carol_connected = carol.nc.is_connected
        finally:
            for member in (alice, bob, carol, authority):
                await member.close()
    assert got and set(got) == {7}
    assert members["alice"].cert != first_cert
    assert authority.renewed_certs >= 4
    assert not carol_connected, "an expired certificate must not get back in"


@pytest.mark.parametrize("bound", ["max_handlers", "pending_msgs_limit", "pending_bytes_limit"])
async def test_a_subscription_bound_below_one_is_a_clear_error(h: Harness, bound: str) -> None:
    # nats-py would read 0 or -1 as "no limit".
    with pytest.raises(ConfigError, match=rf"{bound} of the subscription to '{h.inbox}'.*got 0"):
        await h.bob.subscribe(h.inbox, _ignore, accepts=Ping, **{bound: 0})


async def _ignore(d: Delivery) -> None:
    pass


def test_the_event_stream_records_every_area_of_a_tenant_but_state() -> None:
    s = Subjects("acme")
    areas = {s.security.split(".")[2]}
    # Every builder of one subject, so an area added later is checked too.
    for name, build in inspect.getmembers(Subjects, inspect.isfunction):
        if name.startswith("_") or name == "all":
            continue
        if len(inspect.signature(build).parameters) == 2:
            subject = build(s, "a")
            if subject.startswith(f"{s.prefix}."):
                areas.add(subject.split(".")[2])
    captured = {pattern.split(".")[0] for pattern in CAPTURED}
    assert areas - captured == {"state"}
    assert captured <= areas


async def test_a_nats_without_jetstream_is_a_clear_error_after_the_wait(tmp_path) -> None:
    import nats

    from govmesh.bus._stream import ensure_event_stream
    from govmesh.errors import BusError
    from govmesh.runtime import NatsServer

    with NatsServer(workdir=tmp_path / "nats", jetstream=False) as server:
        nc = await nats.connect(server.url)
        try:
            with pytest.raises(BusError, match=r"JetStream did not answer .* within 1s"):
                await ensure_event_stream(nc, "acme", wait_s=1.0)
        finally:
            await nc.close()
