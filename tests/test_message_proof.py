"""Message proof as a pure function: what verifies and what never does."""

from __future__ import annotations

import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from govmesh.bus import Codec, MessageVerifier, Sealed
from govmesh.errors import SecurityError
from govmesh.identity import Identity, Issuer, SigningKey, TokenVerifier

SUBJECT = "gm.acme.msg.bob"


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    n: int
    note: str = ""


ISSUER = Issuer(name="test", audience="govmesh:acme")
# A day, not the default ten minutes: minted at import, and a slow suite reaches these tests
# more than ten minutes after it imported them.
ALICE = ISSUER.identity("alice", "agent", capabilities=("erp.read",), ttl_s=86_400)
CODEC = Codec()


def verifier() -> MessageVerifier:
    tokens = TokenVerifier(issuers=[ISSUER.public_key], audience=ISSUER.audience)
    return MessageVerifier(tokens=tokens, codec=CODEC)


def sealed(body: msgspec.Struct | None = None, *, who: Identity = ALICE, **kw: float) -> bytes:
    return CODEC.seal(who, subject=SUBJECT, body=body or Ping(n=1), **kw)[1]


def reason(data: bytes, subject: str = SUBJECT, v: MessageVerifier | None = None) -> str:
    with pytest.raises(SecurityError) as info:
        (v or verifier()).verify(subject, data)
    return info.value.reason


def good() -> bytes:
    """A fresh valid message (built per test: a module-level one would go stale)."""
    return sealed(Ping(n=42, note="a note long enough to matter"))


def test_a_good_message_verifies_with_its_claims() -> None:
    verified = verifier().verify(SUBJECT, good())
    assert verified.envelope.sender == "alice"
    assert verified.claims.capabilities == ("erp.read",)
    assert CODEC.body(verified.envelope, Ping) == Ping(n=42, note="a note long enough to matter")


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_no_mutation_of_a_signed_message_verifies(data: st.DataObject) -> None:
    original = good()
    raw = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    i = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[i] ^= data.draw(st.integers(1, 255))
    elif kind == "insert":
        raw.insert(i, data.draw(st.integers(0, 255)))
    elif kind == "delete":
        del raw[i]
    else:
        del raw[i:]
    assert bytes(raw) != original
    with pytest.raises(SecurityError):
        verifier().verify(SUBJECT, bytes(raw))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_without_crashing(data: bytes) -> None:
    with pytest.raises(SecurityError):
        verifier().verify(SUBJECT, data)


def test_exact_replay_and_replay_onto_another_subject_are_refused() -> None:
    v, message = verifier(), good()
    v.verify(SUBJECT, message)
    assert reason(message, v=v) == "replay"
    assert reason(message, subject="gm.acme.msg.carol") == "wrong_subject"


def test_stale_and_future_timestamps_are_refused() -> None:
    assert reason(sealed(now=time.time() - 31)) == "stale"
    assert reason(sealed(now=time.time() + 6)) == "future"


def test_a_message_carried_inside_another_is_checked_for_its_signer_not_its_age() -> None:
    old = sealed(now=time.time() - 120)
    assert reason(old) == "stale"
    # A decision inside a retried tool call: its expiry and one use are checked elsewhere.
    assert verifier().verify(SUBJECT, old, replay=False).envelope.sender == "alice"
    assert reason(sealed(now=time.time() + 6)) == "future"
    with pytest.raises(SecurityError):
        verifier().verify(SUBJECT, old[:-1] + bytes([old[-1] ^ 1]), replay=False)


def test_token_time_and_issuer_checks() -> None:
    key = SigningKey()

    def with_token(token: str) -> bytes:
        return sealed(who=Identity(agent_id="alice", role="agent", key=key, token=token))

    past = time.time() - 61
    expired = ISSUER.issue(sub="alice", role="agent", key=key.public, ttl_s=60, now=past)
    assert reason(with_token(expired)) == "token_expired"
    early = ISSUER.issue(sub="alice", role="agent", key=key.public, ttl_s=600, now=time.time() + 60)
    assert reason(with_token(early)) == "token_not_yet_valid"
    rogue = Issuer(name=ISSUER.name, audience=ISSUER.audience)
    assert reason(with_token(rogue.issue(sub="alice", role="agent", key=key.public))) == (
        "token_unknown_issuer"
    )
    other_aud = Issuer(name=ISSUER.name, audience="govmesh:other", key=ISSUER.key)
    assert reason(with_token(other_aud.issue(sub="alice", role="agent", key=key.public))) == (
        "token_wrong_audience"
    )


def test_a_token_used_with_another_key_is_refused() -> None:
    thief = Identity(agent_id="alice", role="agent", key=SigningKey(), token=ALICE.token)
    assert reason(sealed(who=thief)) == "bad_signature"


def test_a_sender_claiming_another_name_is_refused() -> None:
    impostor = Identity(agent_id="bob", role="agent", key=ALICE.key, token=ALICE.token)
    assert reason(sealed(who=impostor)) == "sender_mismatch"


def test_missing_parts_are_refused() -> None:
    whole = CODEC.open(good())
    assert reason(CODEC.encode(Sealed(whole.envelope, "", whole.signature))) == "token_malformed"
    assert reason(CODEC.encode(Sealed(whole.envelope, whole.token, b""))) == "bad_signature"
    # A validly signed envelope that lacks fields.
    partial = CODEC.encode(["id-only"])
    assert reason(CODEC.encode(Sealed(partial, ALICE.token, ALICE.key.sign(partial)))) == (
        "malformed"
    )
    assert reason(CODEC.encode([whole.envelope, whole.token])) == "malformed"


def test_an_oversized_message_is_refused_before_parsing() -> None:
    big = sealed(Ping(n=1, note="x" * (600 * 1024)))
    assert reason(big) == "oversized"
