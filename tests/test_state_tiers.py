"""Snapshot tiers: each tier round-trips, limits are clear errors, tampering never opens."""

from __future__ import annotations

import base64
import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import lz4.frame
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from govmesh.errors import ConfigError, StateError
from govmesh.state import (
    ENV_STATE_KEYS,
    GOAL_LIMIT_BYTES,
    REFLECTIONS_LIMIT_BYTES,
    Keyring,
    SealedSnapshot,
    SnapshotState,
    decode_sealed,
    encode_sealed,
    seal,
    unseal,
)

POLICY_HASH = hashlib.sha256(b"policy set").hexdigest()
K1 = bytes(range(32))
K2 = bytes(range(32, 64))


def state(**changes: Any) -> SnapshotState:
    fields: dict[str, Any] = {
        "tenant": "acme",
        "workflow": "wf-1",
        "agent": "procurement-1",
        "version": 3,
        "goal": {"vendor": "Vendor_A", "amount": 4200.5, "items": [1, 2, {"sku": "x"}]},
        "tool": b"\x00tool state\xff",
        "reflections": ("tried Vendor_B: over budget", "asked for approval"),
        "policy_hash": POLICY_HASH,
        "created_at": 1_700_000_000.25,
    }
    fields.update(changes)
    return SnapshotState(**fields)


def key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "state.keys"
    path.write_text(text)
    path.chmod(mode)
    return path


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@pytest.fixture
def keyring() -> Keyring:
    return Keyring({"k1": K1})


# Round trips


def test_every_tier_round_trips_through_seal_encode_decode_unseal(keyring: Keyring) -> None:
    original = state()
    data = encode_sealed(seal(original, keyring))
    assert unseal(decode_sealed(data), keyring) == original


def test_goal_state_is_stored_as_canonical_json_with_sorted_keys(keyring: Keyring) -> None:
    sealed = seal(state(goal={"b": 1, "a": {"d": [], "c": None}}), keyring)
    assert sealed.goal == b'{"a":{"c":null,"d":[]},"b":1}'


def test_tool_snapshot_is_not_stored_in_the_clear(keyring: Keyring) -> None:
    secret = b"api-token-do-not-store-in-the-clear"
    data = encode_sealed(seal(state(tool=secret), keyring))
    assert secret not in data


def test_absent_tiers_stay_absent_and_an_empty_tool_snapshot_stays_empty(
    keyring: Keyring,
) -> None:
    bare = seal(state(tool=None, reflections=(), policy_hash=""), keyring)
    assert bare.tool is None
    assert bare.reflections is None
    opened = unseal(decode_sealed(encode_sealed(bare)), keyring)
    assert (opened.tool, opened.reflections, opened.policy_hash) == (None, (), "")
    assert unseal(seal(state(tool=b""), keyring), keyring).tool == b""


def test_tuples_in_the_goal_come_back_as_lists(keyring: Keyring) -> None:
    opened = unseal(seal(state(goal={"pair": (1, "a")}), keyring), keyring)
    assert opened.goal == {"pair": [1, "a"]}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(goal=st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_any_json_goal_round_trips(goal: dict[str, Any]) -> None:
    keyring = Keyring({"k1": K1})
    opened = unseal(decode_sealed(encode_sealed(seal(state(goal=goal), keyring))), keyring)
    assert opened.goal == goal


@settings(max_examples=200, deadline=None)
@given(
    reflections=st.lists(st.text(), max_size=30).map(tuple),
    tool=st.none() | st.binary(max_size=2048),
)
def test_any_reflection_log_and_tool_snapshot_round_trip(
    reflections: tuple[str, ...], tool: bytes | None
) -> None:
    keyring = Keyring({"k1": K1})
    original = state(reflections=reflections, tool=tool)
    assert unseal(decode_sealed(encode_sealed(seal(original, keyring))), keyring) == original


# Goal state


def test_oversized_goal_state_is_refused_naming_snapshot_size_and_limit(
    keyring: Keyring,
) -> None:
    goal = {"notes": "x" * 12_000}
    size = len(msgspec.json.encode(goal))
    with pytest.raises(StateError) as caught:
        seal(state(goal=goal), keyring)
    assert str(caught.value) == (
        f"goal state of wf-1/procurement-1 is {size:,} bytes; the limit is 10,240"
    )


def test_goal_state_of_exactly_the_limit_is_accepted(keyring: Keyring) -> None:
    padding = GOAL_LIMIT_BYTES - len(b'{"n":""}')
    sealed = seal(state(goal={"n": "x" * padding}), keyring)
    assert len(sealed.goal) == GOAL_LIMIT_BYTES
    with pytest.raises(StateError, match="10,241 bytes"):
        seal(state(goal={"n": "x" * (padding + 1)}), keyring)


@pytest.mark.parametrize(
    ("goal", "path", "reason"),
    [
        ({"a": {"b": {1, 2}}}, "$.a.b", "set value"),
        ({"a": [0, float("nan")]}, "$.a[1]", "nan"),
        ({"a": {"b": float("inf")}}, "$.a.b", "inf"),
        ({"a": {7: "x"}}, "$.a", "key 7 is a int"),
        ({"when": b"raw"}, "$.when", "bytes value"),
        ({"x": [{"y": object()}]}, "$.x[0].y", "object value"),
    ],
)
def test_non_json_goal_value_is_refused_naming_its_path(
    keyring: Keyring, goal: dict[Any, Any], path: str, reason: str
) -> None:
    with pytest.raises(StateError, match=re.escape(f"not JSON at {path}: ")) as caught:
        seal(state(goal=goal), keyring)
    assert reason in str(caught.value)
    assert "wf-1/procurement-1" in str(caught.value)


def test_cyclic_goal_state_is_a_clear_error(keyring: Keyring) -> None:
    goal: dict[str, Any] = {}
    goal["self"] = goal
    with pytest.raises(StateError, match="cannot be encoded as JSON"):
        seal(state(goal=goal), keyring)


def test_goal_state_that_is_not_a_dict_is_refused(keyring: Keyring) -> None:
    with pytest.raises(StateError, match="must be a dict, not list"):
        seal(state(goal=[1, 2]), keyring)


# Tool snapshot: tampering never opens


def test_flipped_ciphertext_bit_fails_authentication(keyring: Keyring) -> None:
    sealed = seal(state(), keyring)
    assert sealed.tool is not None
    flipped = bytearray(sealed.tool.ciphertext)
    flipped[0] ^= 0x01
    tampered = msgspec.structs.replace(
        sealed, tool=msgspec.structs.replace(sealed.tool, ciphertext=bytes(flipped))
    )
    with pytest.raises(StateError) as caught:
        unseal(tampered, keyring)
    assert str(caught.value) == (
        "tool snapshot of wf-1/procurement-1 v3 failed authentication: tampered or wrong key 'k1'"
    )


def test_changed_nonce_fails_authentication(keyring: Keyring) -> None:
    sealed = seal(state(), keyring)
    assert sealed.tool is not None
    tampered = msgspec.structs.replace(
        sealed, tool=msgspec.structs.replace(sealed.tool, nonce=bytes(12))
    )
    with pytest.raises(StateError, match="failed authentication"):
        unseal(tampered, keyring)


def test_truncated_nonce_fails_loudly(keyring: Keyring) -> None:
    sealed = seal(state(), keyring)
    assert sealed.tool is not None
    tampered = msgspec.structs.replace(
        sealed, tool=msgspec.structs.replace(sealed.tool, nonce=sealed.tool.nonce[:4])
    )
    with pytest.raises(StateError, match="failed authentication"):
        unseal(tampered, keyring)
    with pytest.raises(StateError, match=r"sealed snapshot is malformed: .*\$\[7\]\[1\]"):
        decode_sealed(encode_sealed(tampered))


@pytest.mark.parametrize(
    "elsewhere",
    [{"version": 4}, {"workflow": "wf-2"}, {"agent": "procurement-2"}, {"tenant": "other"}],
    ids=["other-version", "other-workflow", "other-agent", "other-tenant"],
)
def test_tool_tier_moved_into_another_snapshot_fails_authentication(
    keyring: Keyring, elsewhere: dict[str, Any]
) -> None:
    donor = seal(state(tool=b"from v3"), keyring)
    target = seal(state(tool=b"the real one", **elsewhere), keyring)
    moved = msgspec.structs.replace(target, tool=donor.tool)
    with pytest.raises(StateError, match="failed authentication: tampered or wrong key 'k1'"):
        unseal(moved, keyring)


def test_tool_tier_relabelled_with_another_key_id_fails_authentication() -> None:
    keyring = Keyring({"k1": K1, "k2": K2}, current="k1")
    sealed = seal(state(), keyring)
    assert sealed.tool is not None
    relabelled = msgspec.structs.replace(
        sealed, tool=msgspec.structs.replace(sealed.tool, key_id="k2")
    )
    with pytest.raises(StateError, match="tampered or wrong key 'k2'"):
        unseal(relabelled, keyring)


def test_same_key_id_with_other_key_material_fails_authentication(keyring: Keyring) -> None:
    sealed = seal(state(), keyring)
    with pytest.raises(StateError, match="failed authentication"):
        unseal(sealed, Keyring({"k1": K2}))


# Key rotation


def test_rotated_keyring_opens_old_snapshots_and_seals_new_ones_with_the_new_key() -> None:
    old_ring = Keyring({"k1": K1})
    old = seal(state(tool=b"sealed under k1"), old_ring)
    ring = old_ring.rotated("k2", K2)
    assert (ring.current, ring.key_ids) == ("k2", ("k1", "k2"))
    assert old_ring.current == "k1"  # rotation leaves the old keyring as it was
    assert unseal(old, ring).tool == b"sealed under k1"
    new = seal(state(tool=b"sealed under k2"), ring)
    assert new.tool is not None
    assert new.tool.key_id == "k2"
    assert unseal(new, ring).tool == b"sealed under k2"


def test_unknown_key_id_is_a_clear_error() -> None:
    sealed = seal(state(), Keyring({"k-retired": K1}))
    with pytest.raises(StateError) as caught:
        unseal(sealed, Keyring({"k2": K2}))
    assert str(caught.value) == (
        "tool snapshot of wf-1/procurement-1 v3: unknown key id 'k-retired'; "
        "this keyring holds ['k2']"
    )


def test_rotating_to_an_existing_key_id_is_refused(keyring: Keyring) -> None:
    with pytest.raises(ConfigError, match="'k1' is already in the keyring"):
        keyring.rotated("k1")


def test_generated_keyrings_have_distinct_random_keys() -> None:
    a, b = Keyring.generate(), Keyring.generate()
    assert a.current == "dev"
    sealed = seal(state(), a)
    with pytest.raises(StateError, match="failed authentication"):
        unseal(sealed, b)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_key_of_the_wrong_length_is_refused_quoting_id_and_length(length: int) -> None:
    with pytest.raises(ConfigError) as caught:
        Keyring({"k1": bytes(length)})
    assert str(caught.value) == f"key 'k1' is {length} bytes; AES-256 needs exactly 32"


def test_keyring_survives_pickling_and_never_shows_its_keys() -> None:
    ring = Keyring({"k1": K1, "k2": K2}, current="k1")
    copy = pickle.loads(pickle.dumps(ring))
    assert (copy.current, copy.key_ids) == ("k1", ("k1", "k2"))
    assert unseal(seal(state(), ring), copy).tool == state().tool
    assert repr(ring) == "Keyring(key_ids=['k1', 'k2'], current='k1')"


# Key file and environment


def test_key_file_lists_keys_and_the_last_one_is_current(tmp_path: Path) -> None:
    path = key_file(tmp_path, f"# state keys\n\nk1: {b64(K1)}\n  k2 :{b64(K2)}  \n")
    ring = Keyring.from_file(path)
    assert (ring.current, ring.key_ids) == ("k2", ("k1", "k2"))
    old = seal(state(), Keyring({"k1": K1}))
    assert unseal(old, ring).tool == state().tool


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o660])
def test_key_file_accessible_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path, f"k1: {b64(K1)}\n", mode)
    with pytest.raises(ConfigError) as caught:
        Keyring.from_file(path)
    assert str(path) in str(caught.value)
    assert f"has mode {mode:04o}" in str(caught.value)


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read key file .*nope\.keys"):
        Keyring.from_file(tmp_path / "nope.keys")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("k2 = c2VjcmV0", "expected 'key_id: base64key' but found no ':'"),
        ("bad id!: " + b64(K2), "key id 'bad id!' must be 1-64 letters"),
        (": " + b64(K2), "key id '' must be"),
        ("k2: not*base64", "key 'k2' is not standard base64 (10 characters, not shown)"),
        ("k2: " + b64(K2[:16]), "key 'k2' is 16 bytes; AES-256 needs exactly 32"),
        ("k1: " + b64(K2), "key id 'k1' is already defined at "),
    ],
    ids=["no-colon", "bad-id", "empty-id", "bad-base64", "short-key", "duplicate"],
)
def test_malformed_key_file_line_names_its_line_number_and_bad_value(
    tmp_path: Path, line: str, message: str
) -> None:
    path = key_file(tmp_path, f"# keys\nk1: {b64(K1)}\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        Keyring.from_file(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert message in str(caught.value)


def test_key_material_never_appears_in_key_file_errors(tmp_path: Path) -> None:
    secret = b64(K2)
    for line in (f"k2 {secret}", f"k2: {secret}!", f"k2: {secret}{secret}"):
        path = key_file(tmp_path, line + "\n")
        with pytest.raises(ConfigError) as caught:
            Keyring.from_file(path)
        assert secret not in str(caught.value)
        assert secret[:8] not in str(caught.value)


def test_key_file_without_keys_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no state keys found"):
        Keyring.from_file(key_file(tmp_path, "# nothing yet\n"))


def test_environment_keys_use_the_file_format_with_commas_allowed() -> None:
    ring = Keyring.from_env({ENV_STATE_KEYS: f"k1: {b64(K1)}, k2: {b64(K2)}"})
    assert ring is not None
    assert (ring.current, ring.key_ids) == ("k2", ("k1", "k2"))
    assert Keyring.from_env({ENV_STATE_KEYS: "  "}) is None
    assert Keyring.from_env({}) is None
    with pytest.raises(ConfigError, match=r"^\$GOVMESH_STATE_KEYS entry 2: key 'k2' is 3 bytes"):
        Keyring.from_env({ENV_STATE_KEYS: f"k1: {b64(K1)},k2: {b64(b'abc')}"})


def test_environment_keys_are_read_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_STATE_KEYS, f"k1: {b64(K1)}")
    ring = Keyring.from_env()
    assert ring is not None
    assert ring.key_ids == ("k1",)


# Reflection log


def test_reflection_log_is_lz4_compressed(keyring: Keyring) -> None:
    log = tuple(f"step {i}: compared the same three vendors again" for i in range(500))
    sealed = seal(state(reflections=log), keyring)
    assert sealed.reflections is not None
    assert lz4.frame.get_frame_info(sealed.reflections)["content_size"] > 20_000
    assert len(sealed.reflections) < 5_000


def test_reflection_log_decompression_bomb_is_refused(keyring: Keyring) -> None:
    bomb = lz4.frame.compress(bytes(REFLECTIONS_LIMIT_BYTES + 1))
    assert len(bomb) < 100_000
    sealed = msgspec.structs.replace(seal(state(), keyring), reflections=bomb)
    with pytest.raises(StateError, match="decompresses to more than 16,777,216 bytes; refused"):
        unseal(sealed, keyring)


def test_reflection_log_over_the_limit_is_refused_on_seal(keyring: Keyring) -> None:
    with pytest.raises(StateError, match=r"reflection log of wf-1/procurement-1 is 16,777,2\d\d"):
        seal(state(reflections=("x" * REFLECTIONS_LIMIT_BYTES,)), keyring)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"not lz4 at all", "is corrupt"),
        (lambda data: data[:-4], "is truncated"),
        (lambda data: data + b"extra", "has 5 bytes after its end"),
        (lambda data: lz4.frame.compress(b"\x92\x01\x02"), "is corrupt: Expected `str`"),
    ],
    ids=["garbage", "truncated", "trailing", "not-strings"],
)
def test_corrupt_reflection_log_is_refused(keyring: Keyring, damage: Any, message: str) -> None:
    sealed = seal(state(), keyring)
    assert sealed.reflections is not None
    broken = msgspec.structs.replace(sealed, reflections=damage(sealed.reflections))
    with pytest.raises(StateError, match=re.escape(message)):
        unseal(broken, keyring)


def test_reflection_log_entries_must_be_strings(keyring: Keyring) -> None:
    with pytest.raises(StateError, match=r"holds a int at \[1\]: 7; entries must be strings"):
        seal(state(reflections=("ok", 7)), keyring)


# Policy hash, version and the sealed form


@pytest.mark.parametrize("bad", ["abc", POLICY_HASH.upper(), POLICY_HASH + "0", "g" * 64])
def test_policy_hash_must_be_lowercase_sha256_hex_or_empty(keyring: Keyring, bad: str) -> None:
    with pytest.raises(
        StateError, match=re.escape(f"policy hash of wf-1/procurement-1 is {bad!r}")
    ):
        seal(state(policy_hash=bad), keyring)


@pytest.mark.parametrize("version", [0, -1, True])
def test_version_below_one_is_refused(keyring: Keyring, version: int) -> None:
    with pytest.raises(StateError, match=f"has version {version!r}; versions start at 1"):
        seal(state(version=version), keyring)


def test_malformed_sealed_bytes_are_refused_naming_the_field(keyring: Keyring) -> None:
    with pytest.raises(StateError, match="sealed snapshot is malformed"):
        decode_sealed(b"\xc1garbage")
    fields = list(msgspec.msgpack.decode(encode_sealed(seal(state(), keyring))))
    fields[3] = 0
    with pytest.raises(StateError, match=r"malformed: Expected `int` >= 1 - at `\$\[3\]`"):
        decode_sealed(msgspec.msgpack.encode(fields))


def test_stored_goal_state_over_the_limit_is_refused_on_unseal(keyring: Keyring) -> None:
    huge = msgspec.json.encode({"n": "x" * GOAL_LIMIT_BYTES})
    sealed = msgspec.structs.replace(seal(state(), keyring), goal=huge)
    with pytest.raises(StateError, match="goal state of wf-1/procurement-1 v3 is 10,248 bytes"):
        unseal(sealed, keyring)
    with pytest.raises(StateError, match="malformed"):
        decode_sealed(encode_sealed(sealed))


def test_sealed_snapshot_is_one_compact_msgpack_array(keyring: Keyring) -> None:
    sealed = seal(state(), keyring)
    raw = msgspec.msgpack.decode(encode_sealed(sealed))
    assert isinstance(raw, list)
    assert raw[:5] == ["acme", "wf-1", "procurement-1", 3, 1_700_000_000.25]
    assert isinstance(sealed, SealedSnapshot)


def test_seal_does_not_reuse_nonces(keyring: Keyring) -> None:
    nonces = set()
    for _ in range(100):
        tool = seal(state(), keyring).tool
        assert tool is not None
        nonces.add(tool.nonce)
    assert len(nonces) == 100
