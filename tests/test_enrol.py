"""Enrolment: members make their own keys, the CA signs their requests, and the enrolment
socket of a running deployment answers only what it should, and cleans up after itself."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import stat
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from govmesh.config import Deployment
from govmesh.errors import ConfigError, SecurityError
from govmesh.identity import (
    OPERATOR_MEMBER,
    WATCH_MEMBER,
    DeploymentCA,
    EnrolmentServer,
    Issuer,
    MemberKeys,
    TokenVerifier,
    certify,
    request_grant,
)
from govmesh.identity._enrol import MAX_REQUEST_BYTES
from govmesh.roles import AUDITOR_ROLE, OPERATOR_ROLE
from govmesh.runtime import Member, NatsServer, RedisServer, Transport, advertise, join

from _deploy import deployment


def _deployment(issuer: Issuer, *, tls: bool = True) -> Deployment:
    return issuer.deployment(
        tenant="acme", nats_url="nats://127.0.0.1:4222", redis_url="redis://127.0.0.1:6379", tls=tls
    )


def _issuer() -> Issuer:
    return Issuer(name="test:acme", audience="govmesh:acme")


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = "someone") -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


async def _raw(path: Path, data: bytes) -> dict[str, object]:
    """Send `data` as it is and read the one-line answer."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        await writer.drain()
        return dict(json.loads(await reader.readuntil(b"\n")))
    finally:
        writer.close()


def test_a_member_s_keys_never_leave_its_process_by_pickling() -> None:
    with pytest.raises(TypeError, match="stay in the process that made them"):
        pickle.dumps(MemberKeys("procurement-1", "Procurement-Agent-v2"))


def test_a_grant_is_for_the_member_s_own_keys_and_fits_no_other() -> None:
    issuer, ca = _issuer(), DeploymentCA.create("test-enrol")
    dep = _deployment(issuer)
    keys = MemberKeys("procurement-1", "Procurement-Agent-v2")
    granted = certify(
        keys.request(),
        issuer=issuer,
        ca=ca,
        tenant="acme",
        capabilities=("erp.create_purchase_order",),
        budget_usd=25_000,
    )
    identity = keys.accept(granted, dep)
    claims = TokenVerifier(issuers=[issuer.public_key], audience=dep.audience).verify(
        identity.token
    )
    assert (claims.sub, claims.role, claims.budget_usd) == (
        "procurement-1",
        "Procurement-Agent-v2",
        25_000,
    )
    assert claims.key.raw == identity.key.public.raw
    assert identity.cert is not None and identity.cert.member_id == "procurement-1"
    cert = x509.load_pem_x509_certificate(identity.cert.cert_pem)
    own = serialization.load_pem_private_key(identity.cert.key_pem, password=None)
    assert cert.public_key() == own.public_key()
    assert cert.subject.rfc4514_string() == "CN=procurement-1,OU=Procurement-Agent-v2,O=acme"

    # Keys made by another process (say, the actor Ray started in place of a dead one).
    with pytest.raises(SecurityError, match="bad_grant"):
        MemberKeys("procurement-1", "Procurement-Agent-v2").accept(granted, dep)
    # A mutual-TLS bus needs the certificate.
    bare = msgspec.structs.replace(granted, cert_pem=b"")
    with pytest.raises(SecurityError, match="no client certificate"):
        keys.accept(bare, dep)


def test_the_ca_signs_only_a_sound_request_and_names_the_member_itself() -> None:
    ca = DeploymentCA.create("test-enrol")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = x509.load_pem_x509_certificate(
        ca.sign_request(_csr(key, cn="governance-1"), "watch", "auditor", tenant="acme")
    )
    assert cert.subject.rfc4514_string() == "CN=watch,OU=auditor,O=acme"
    assert cert.public_key() == key.public_key()

    with pytest.raises(ConfigError, match="EC P-256"):
        ca.sign_request(_csr(ec.generate_private_key(ec.SECP384R1())), "watch", "auditor")
    with pytest.raises(ConfigError, match="EC P-256"):
        ca.sign_request(_csr(rsa.generate_private_key(65537, 2048)), "watch", "auditor")
    with pytest.raises(ConfigError, match="not a PEM certificate signing request"):
        ca.sign_request(b"-----BEGIN NONSENSE-----", "watch", "auditor")
    # Another key's request with this key's signature does not prove possession.
    other = _csr(ec.generate_private_key(ec.SECP256R1()))
    forged = x509.load_pem_x509_csr(other)
    tampered = forged.public_bytes(serialization.Encoding.DER)
    signature = forged.signature
    flipped = tampered.replace(signature, bytes([signature[0] ^ 1]) + signature[1:])
    pem = x509.load_der_x509_csr(flipped).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ConfigError, match="not signed by its own key"):
        ca.sign_request(pem, "watch", "auditor")


async def test_the_socket_is_private_grants_short_lived_credentials_and_is_removed(
    tmp_path: Path,
) -> None:
    issuer, ca = _issuer(), DeploymentCA.create("test-enrol")
    dep = _deployment(issuer)
    path = tmp_path / "enrol.sock"
    server = EnrolmentServer(path, issuer=issuer, ca=ca, tenant="acme")
    await server.start()
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for member, role in ((OPERATOR_MEMBER, OPERATOR_ROLE), (WATCH_MEMBER, AUDITOR_ROLE)):
            keys = MemberKeys(member, role)
            identity = keys.accept(await request_grant(path, keys.request()), dep)
            claims = TokenVerifier(issuers=[issuer.public_key], audience=dep.audience).verify(
                identity.token
            )
            assert claims.exp - claims.iat == pytest.approx(600)
            assert (claims.capabilities, claims.budget_usd) == ((), 0.0)
            assert identity.cert is not None
            assert (identity.cert.expires.timestamp() - claims.iat) < 600 + 5
        assert server.granted == {OPERATOR_MEMBER: 1, WATCH_MEMBER: 1}
    finally:
        await server.close()
        await server.close()
    assert not path.exists()
    with pytest.raises(ConfigError, match="serves no enrolment here"):
        await request_grant(path, MemberKeys(OPERATOR_MEMBER, OPERATOR_ROLE).request())


async def test_malformed_oversized_and_silent_requests_get_a_clear_refusal(tmp_path: Path) -> None:
    issuer, ca = _issuer(), DeploymentCA.create("test-enrol")
    path = tmp_path / "enrol.sock"
    async with EnrolmentServer(path, issuer=issuer, ca=ca, tenant="acme", timeout_s=0.3) as server:
        garbage = await _raw(path, b"hello\n")
        assert "not an enrolment request" in str(garbage["error"]), garbage

        request = msgspec.to_builtins(MemberKeys(OPERATOR_MEMBER, OPERATOR_ROLE).request()) | {
            "admin": True
        }
        unknown = await _raw(path, json.dumps(request).encode() + b"\n")
        assert "admin" in str(unknown["error"]), unknown

        no_csr = msgspec.to_builtins(MemberKeys(OPERATOR_MEMBER, OPERATOR_ROLE).request())
        del no_csr["csr_pem"]
        missing = await _raw(path, json.dumps(no_csr).encode() + b"\n")
        assert "csr_pem" in str(missing["error"]), missing

        large = await _raw(path, b"x" * (MAX_REQUEST_BYTES + 1) + b"\n")
        assert f"larger than {MAX_REQUEST_BYTES} bytes" in str(large["error"]), large

        silent = await _raw(path, b"")
        assert "no request within" in str(silent["error"]), silent
        cut = await _raw(path, b'{"member_id": "operator"')
        assert "no request within" in str(cut["error"]), cut

        assert set(server.refused) == {"malformed", "bad_keys", "too_large", "timeout"}
        assert server.granted == {}


async def test_a_socket_left_by_a_killed_process_is_replaced_and_a_live_one_is_an_error(
    tmp_path: Path,
) -> None:
    issuer = _issuer()
    path = tmp_path / "enrol.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # what a SIGKILL leaves: the file, nobody listening
    async with EnrolmentServer(path, issuer=issuer, ca=None, tenant="acme"):
        keys = MemberKeys(WATCH_MEMBER, AUDITOR_ROLE)
        keys.accept(await request_grant(path, keys.request()), _deployment(issuer, tls=False))
        with pytest.raises(ConfigError, match="another live process serves this socket"):
            await EnrolmentServer(path, issuer=issuer, ca=None, tenant="acme").start()
    assert not path.exists()

    long = tmp_path / ("d" * 120) / "enrol.sock"
    with pytest.raises(ConfigError, match="too long for a Unix socket"):
        await EnrolmentServer(long, issuer=issuer, ca=None, tenant="acme").start()


async def test_advertise_leaves_only_the_record_and_the_socket_and_removes_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(tmp_path))
    issuer, ca = _issuer(), DeploymentCA.create("test-enrol")
    dep = _deployment(issuer)
    where = tmp_path / "acme"
    with pytest.raises(RuntimeError, match="boom"):
        async with advertise(dep, issuer, ca=ca, what="test") as advertised:
            assert advertised == where
            assert stat.S_IMODE(where.stat().st_mode) == 0o700
            assert sorted(p.name for p in where.iterdir()) == ["deployment.json", "enrol.sock"]
            joined = join()
            # Without the Redis URL, which holds the deployment's Redis password.
            assert joined.deployment == msgspec.structs.replace(dep, redis_url="")
            assert joined.what == "test"
            identity = await joined.member(WATCH_MEMBER, AUDITOR_ROLE)
            assert identity.cert is not None and identity.cert.member_id == WATCH_MEMBER
            record = (where / "deployment.json").read_bytes()
            raise RuntimeError("boom")
    assert not where.exists()

    # What a killed deployment left behind, with the keys an older govmesh wrote there.
    gone = subprocess.Popen(["true"])
    gone.wait()
    where.mkdir(mode=0o700)
    (where / "deployment.json").write_text(json.dumps(json.loads(record) | {"pid": gone.pid}))
    with pytest.raises(ConfigError, match="which is gone"):
        join("acme")
    # An older govmesh's record, without today's fields.
    left = {"pid": gone.pid, "tenant": "acme", "issuer_name": "test:acme"}
    (where / "deployment.json").write_text(json.dumps(left))
    (where / "issuer.key").write_bytes(os.urandom(32))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(where / "enrol.sock"))
    stale.close()
    with pytest.raises(ConfigError, match="cannot read the deployment"):
        join("acme")
    async with advertise(dep, issuer, ca=ca, what="again"):
        assert sorted(p.name for p in where.iterdir()) == ["deployment.json", "enrol.sock"]
        assert join("acme").what == "again"
    assert not where.exists()


async def test_a_member_renews_its_token_and_certificate_over_the_bus_keeping_its_own_keys(
    secure_nats: tuple[Transport, NatsServer], redis_server: RedisServer, prefix: str
) -> None:
    import datetime as dt

    from govmesh.authority import TokenAuthority
    from govmesh.bus import Bus

    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    authority = TokenAuthority(
        dep, issuer, ttl_s=2.0, ca=transport.ca, cert_ttl=dt.timedelta(seconds=3)
    )
    keys = MemberKeys("alice", "agent")
    transport.register([Member.for_role("alice", "agent", tenant=prefix)])
    granted = certify(
        keys.request(), issuer=issuer, ca=transport.ca, tenant=prefix, ttl_s=2.0, cert_ttl_s=3.0
    )
    identity = keys.accept(granted, dep)
    assert identity.cert is not None
    first_cert, key_pem = identity.cert.cert_pem, identity.cert.key_pem
    await authority.start()
    alice = await Bus.connect(dep, identity)
    try:
        deadline = time.monotonic() + 30
        while alice.rotations < 2 or alice.cert_renewals < 1:
            assert time.monotonic() < deadline, (alice.rotations, alice.cert_renewals)
            await asyncio.sleep(0.1)
    finally:
        await alice.close()
        await authority.close()
    claims = alice.tokens.verify(identity.token)
    assert identity.token != granted.token and claims.key.raw == identity.key.public.raw
    assert identity.cert.cert_pem != first_cert and identity.cert.key_pem == key_pem
    renewed = x509.load_pem_x509_certificate(identity.cert.cert_pem)
    own = serialization.load_pem_private_key(key_pem, password=None)
    assert renewed.public_key() == own.public_key()
