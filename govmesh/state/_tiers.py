"""Hierarchical snapshot tiers: one version of an agent's state, sealed for storage.

A snapshot of (workflow, agent) at one version has four tiers:

1. goal state: a JSON object, stored as canonical JSON (sorted keys), at most
   `GOAL_LIMIT_BYTES` encoded;
2. tool snapshot: opaque bytes, AES-256-GCM encrypted under the current key of a `Keyring`,
   authenticated together with (tenant, workflow, agent, version, key id) so a tier moved to
   another snapshot fails to open;
3. reflection log: strings, lz4-compressed, at most `REFLECTIONS_LIMIT_BYTES` uncompressed;
4. policy hash: sha256 hex of the policy set in force.

`seal` turns a `SnapshotState` into a `SealedSnapshot`, `unseal` turns it back;
`encode_sealed` and `decode_sealed` give the msgpack bytes a store keeps.

Keys come from a key file (`Keyring.from_file`) or `$GOVMESH_STATE_KEYS` (`Keyring.from_env`),
one key per line::

    # comments and blank lines are ignored
    k2024-01: <standard base64 of 32 random bytes>
    k2024-07: <standard base64 of 32 random bytes>

The last key listed is current: it encrypts new snapshots, the others still decrypt old ones,
so rotating is appending a line. In the environment variable, entries may also be separated
by commas. Error messages quote key ids, never key material.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final

import lz4.frame
import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from govmesh.errors import ConfigError, StateError

__all__ = [
    "ENV_STATE_KEYS",
    "GOAL_LIMIT_BYTES",
    "REFLECTIONS_LIMIT_BYTES",
    "Keyring",
    "SealedSnapshot",
    "SealedTool",
    "SnapshotState",
    "decode_sealed",
    "encode_goal",
    "encode_sealed",
    "seal",
    "unseal",
]

GOAL_LIMIT_BYTES: Final = 10 * 1024
"""Largest goal state, in bytes of canonical JSON."""

REFLECTIONS_LIMIT_BYTES: Final = 16 * 1024 * 1024
"""Largest reflection log, in uncompressed bytes; a bigger one is refused on seal and unseal."""

ENV_STATE_KEYS: Final = "GOVMESH_STATE_KEYS"
"""Environment variable holding state keys, in the key file format."""

_KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 12
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_ID_RULE: Final = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
_POLICY_HASH = re.compile(r"(?:[0-9a-f]{64})?")
# Domain separation: these associated data can never be mistaken for another use of a key.
_AD_LABEL: Final = "govmesh/state/tool/v1"
# msgspec raises DecodeError for bad structure but UnicodeDecodeError (a ValueError) for a
# string with invalid UTF-8; both mean a corrupt record.
_BAD_INPUT = (msgspec.DecodeError, ValueError)


class SnapshotState(msgspec.Struct, frozen=True, kw_only=True):
    """One version of an agent's state, in the clear: what `seal` takes and `unseal` returns.

    Attributes:
        tenant: the tenant the workflow runs in.
        workflow: the workflow id.
        agent: the agent id.
        version: the snapshot version, 1 or more.
        goal: the goal state; str keys and JSON values only (tuples come back as lists).
        tool: the tool snapshot, or None for none; JSON is best encoded with
            ``msgspec.json.encode``.
        reflections: the reflection log.
        policy_hash: sha256 hex of the policy set in force, or "" for none.
        created_at: when the snapshot was taken, in seconds since the epoch.
    """

    tenant: str
    workflow: str
    agent: str
    version: int
    goal: dict[str, Any]
    tool: bytes | None = None
    reflections: tuple[str, ...] = ()
    policy_hash: str = ""
    created_at: float = msgspec.field(default_factory=time.time)


class SealedTool(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """An encrypted tool snapshot: AES-256-GCM ciphertext (with its tag) and what opens it."""

    key_id: str
    nonce: Annotated[bytes, msgspec.Meta(min_length=_NONCE_BYTES, max_length=_NONCE_BYTES)]
    ciphertext: bytes


class SealedSnapshot(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A snapshot ready for storage: goal as canonical JSON, tool encrypted, log compressed.

    Fields are positional on the wire; new fields go last, with defaults.
    """

    tenant: str
    workflow: str
    agent: str
    version: Annotated[int, msgspec.Meta(ge=1)]
    created_at: float
    goal: Annotated[bytes, msgspec.Meta(max_length=GOAL_LIMIT_BYTES)]
    policy_hash: str = ""
    tool: SealedTool | None = None
    reflections: bytes | None = None


_encoder = msgspec.msgpack.Encoder()
_sealed_decoder = msgspec.msgpack.Decoder(SealedSnapshot)
_reflections_decoder = msgspec.msgpack.Decoder(tuple[str, ...])


class Keyring:
    """Named AES-256 keys: the current one encrypts, every one decrypts.

    Immutable; `rotated` returns a new keyring. Picklable (as its keys), so Ray can ship it to
    the state actor. Each key should encrypt fewer than 2**32 snapshots (random 96-bit
    nonces); rotate long before that.
    """

    __slots__ = ("_aead", "_current", "_keys")

    def __init__(self, keys: Mapping[str, bytes], *, current: str | None = None) -> None:
        """Build a keyring from ``{key_id: 32-byte key}``.

        Args:
            keys: the keys, in the order they were added.
            current: the key that encrypts; the last of ``keys`` if None.

        Raises:
            ConfigError: no keys, a bad key id, a key that is not 32 bytes, or an unknown
                ``current``.
        """
        if not keys:
            raise ConfigError("a keyring needs at least one key")
        for key_id, key in keys.items():
            _check_key(key_id, key)
        if current is None:
            current = list(keys)[-1]
        elif current not in keys:
            raise ConfigError(f"current key {current!r} is not in the keyring {sorted(keys)}")
        self._keys = dict(keys)
        self._aead = {key_id: AESGCM(key) for key_id, key in self._keys.items()}
        self._current = current

    @classmethod
    def generate(cls, key_id: str = "dev") -> Keyring:
        """A keyring with one fresh random key, for embedded and development runs."""
        return cls({key_id: AESGCM.generate_key(bit_length=256)})

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """Load the keys of a key file (format in the module docstring).

        Raises:
            ConfigError: the file is missing or unreadable, group or others have any access
                to it, or a line is malformed (the error names the line).
        """
        where = Path(path)
        try:
            with open(where, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
                    raise ConfigError(
                        f"key file {str(where)!r} has mode {stat.S_IMODE(mode):04o}; group and "
                        f"others must have no access (chmod 600 {where})"
                    )
                raw = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read key file {str(where)!r}: {e.strerror}") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"key file {str(where)!r} is not UTF-8 text") from e
        return cls._parse(
            (f"{where}:{n}", line) for n, line in enumerate(text.splitlines(), start=1)
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring | None:
        """Load the keys of ``$GOVMESH_STATE_KEYS``; None if it is unset or blank.

        Raises:
            ConfigError: an entry is malformed (the error names the entry).
        """
        value = (os.environ if environ is None else environ).get(ENV_STATE_KEYS, "")
        if not value.strip():
            return None
        entries = re.split(r"[,\n]", value)
        return cls._parse((f"${ENV_STATE_KEYS} entry {n}", e) for n, e in enumerate(entries, 1))

    @classmethod
    def _parse(cls, lines: Iterable[tuple[str, str]]) -> Keyring:
        keys: dict[str, bytes] = {}
        seen_at: dict[str, str] = {}
        for where, line in lines:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            key_id, colon, encoded = (part.strip() for part in text.partition(":"))
            if not colon:
                # The line may be a key with a typo in it: say what is wrong, never show it.
                raise ConfigError(
                    f"{where}: expected 'key_id: base64key' but found no ':' "
                    f"({len(text)} characters, not shown as they may be a key)"
                )
            if not _KEY_ID.fullmatch(key_id):
                raise ConfigError(f"{where}: key id {key_id!r} must be {_KEY_ID_RULE}")
            if key_id in keys:
                first = seen_at[key_id]
                raise ConfigError(f"{where}: key id {key_id!r} is already defined at {first}")
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(
                    f"{where}: key {key_id!r} is not standard base64 "
                    f"({len(encoded)} characters, not shown)"
                ) from None
            if len(key) != _KEY_BYTES:
                raise ConfigError(
                    f"{where}: key {key_id!r} is {len(key)} bytes; AES-256 needs exactly "
                    f"{_KEY_BYTES}"
                )
            keys[key_id] = key
            seen_at[key_id] = where
        if not keys:
            raise ConfigError("no state keys found: expected lines of 'key_id: base64key'")
        return cls(keys)

    @property
    def current(self) -> str:
        """The id of the key that encrypts new snapshots."""
        return self._current

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Ids of every key that can decrypt, oldest first."""
        return tuple(self._keys)

    def rotated(self, key_id: str, key: bytes | None = None) -> Keyring:
        """A keyring with ``key`` (random if None) added as current; old keys still decrypt.

        Raises:
            ConfigError: ``key_id`` is already in the keyring, malformed, or the key is not
                32 bytes.
        """
        if key_id in self._keys:
            raise ConfigError(f"key id {key_id!r} is already in the keyring")
        fresh = AESGCM.generate_key(bit_length=256) if key is None else key
        return Keyring({**self._keys, key_id: fresh}, current=key_id)

    def key_file_text(self) -> str:
        """The keyring in key-file form (`from_file` reads it back), current key last.
        It holds key material: write it only to a file only its owner can read."""
        order = [k for k in self._keys if k != self._current] + [self._current]
        lines = [f"{k}: {base64.b64encode(self._keys[k]).decode()}" for k in order]
        return "\n".join(["# govmesh snapshot keys; the last one is current", *lines, ""])

    def _encrypt(self, plaintext: bytes, ad: tuple[str, str, str, int]) -> SealedTool:
        key_id = self._current
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = self._aead[key_id].encrypt(nonce, plaintext, _associated(ad, key_id))
        return SealedTool(key_id=key_id, nonce=nonce, ciphertext=ciphertext)

    def _decrypt(self, tool: SealedTool, ad: tuple[str, str, str, int], what: str) -> bytes:
        aead = self._aead.get(tool.key_id)
        if aead is None:
            raise StateError(
                f"{what}: unknown key id {tool.key_id!r}; this keyring holds {list(self._keys)}"
            )
        try:
            return aead.decrypt(tool.nonce, tool.ciphertext, _associated(ad, tool.key_id))
        except (InvalidTag, ValueError):
            # ValueError: a nonce of a length AES-GCM refuses, i.e. a corrupt record.
            raise StateError(
                f"{what} failed authentication: tampered or wrong key {tool.key_id!r}"
            ) from None

    def __repr__(self) -> str:
        return f"Keyring(key_ids={list(self._keys)!r}, current={self._current!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_keyring, (self._keys, self._current))


def _rebuild_keyring(keys: dict[str, bytes], current: str) -> Keyring:
    return Keyring(keys, current=current)


def _check_key(key_id: object, key: object) -> None:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ConfigError(f"key id {key_id!r} must be {_KEY_ID_RULE}")
    if not isinstance(key, bytes):
        raise ConfigError(f"key {key_id!r} must be bytes, not {type(key).__name__}")
    if len(key) != _KEY_BYTES:
        raise ConfigError(f"key {key_id!r} is {len(key)} bytes; AES-256 needs exactly {_KEY_BYTES}")


def _associated(ad: tuple[str, str, str, int], key_id: str) -> bytes:
    # msgpack is length-prefixed, so no two different tuples encode to the same bytes.
    return _encoder.encode((_AD_LABEL, *ad, key_id))


def seal(state: SnapshotState, keyring: Keyring) -> SealedSnapshot:
    """Seal ``state`` for storage: canonical JSON goal, encrypted tool, compressed log.

    Args:
        state: the snapshot in the clear.
        keyring: its current key encrypts the tool snapshot.

    Raises:
        StateError: the version is below 1, the goal state is not a JSON object or is larger
            than `GOAL_LIMIT_BYTES`, the reflection log is larger than
            `REFLECTIONS_LIMIT_BYTES`, or the policy hash is not sha256 hex.
    """
    where = f"{state.workflow}/{state.agent}"
    if isinstance(state.version, bool) or not isinstance(state.version, int) or state.version < 1:
        raise StateError(f"snapshot of {where} has version {state.version!r}; versions start at 1")
    _check_policy_hash(state.policy_hash, where)
    goal = encode_goal(state.goal, where)
    tool = None
    if state.tool is not None:
        ad = (state.tenant, state.workflow, state.agent, state.version)
        tool = keyring._encrypt(state.tool, ad)
    reflections = None
    if state.reflections:
        if isinstance(state.reflections, str):
            raise StateError(f"reflection log of {where} must be a sequence of strings, not a str")
        for i, entry in enumerate(state.reflections):
            if not isinstance(entry, str):
                raise StateError(
                    f"reflection log of {where} holds a {type(entry).__name__} at [{i}]: "
                    f"{_short_repr(entry)}; entries must be strings"
                )
        log = _encoder.encode(state.reflections)
        if len(log) > REFLECTIONS_LIMIT_BYTES:
            raise StateError(
                f"reflection log of {where} is {len(log):,} bytes; the limit is "
                f"{REFLECTIONS_LIMIT_BYTES:,}"
            )
        reflections = lz4.frame.compress(log)
    return SealedSnapshot(
        tenant=state.tenant,
        workflow=state.workflow,
        agent=state.agent,
        version=state.version,
        created_at=state.created_at,
        goal=goal,
        policy_hash=state.policy_hash,
        tool=tool,
        reflections=reflections,
    )


def unseal(sealed: SealedSnapshot, keyring: Keyring) -> SnapshotState:
    """Open a sealed snapshot: every tier is checked, none is returned half-read.

    Args:
        sealed: the stored snapshot.
        keyring: must hold the key the tool snapshot was encrypted with.

    Raises:
        StateError: the tool snapshot fails authentication (tampered, moved from another
            snapshot, or the wrong key), its key id is unknown, the reflection log is corrupt
            or would decompress beyond `REFLECTIONS_LIMIT_BYTES`, or another tier is corrupt.
    """
    where = f"{sealed.workflow}/{sealed.agent}"
    if len(sealed.goal) > GOAL_LIMIT_BYTES:
        raise StateError(
            f"goal state of {where} v{sealed.version} is {len(sealed.goal):,} bytes; the limit "
            f"is {GOAL_LIMIT_BYTES:,}"
        )
    try:
        goal = msgspec.json.decode(sealed.goal)
    except _BAD_INPUT as e:
        raise StateError(f"goal state of {where} v{sealed.version} is corrupt: {e}") from None
    if not isinstance(goal, dict):
        raise StateError(
            f"goal state of {where} v{sealed.version} is a JSON {type(goal).__name__}, "
            "not an object"
        )
    _check_policy_hash(sealed.policy_hash, where)
    tool = None
    if sealed.tool is not None:
        ad = (sealed.tenant, sealed.workflow, sealed.agent, sealed.version)
        tool = keyring._decrypt(sealed.tool, ad, f"tool snapshot of {where} v{sealed.version}")
    reflections: tuple[str, ...] = ()
    if sealed.reflections is not None:
        reflections = _decode_reflections(sealed.reflections, f"{where} v{sealed.version}")
    return SnapshotState(
        tenant=sealed.tenant,
        workflow=sealed.workflow,
        agent=sealed.agent,
        version=sealed.version,
        goal=goal,
        tool=tool,
        reflections=reflections,
        policy_hash=sealed.policy_hash,
        created_at=sealed.created_at,
    )


def encode_sealed(sealed: SealedSnapshot) -> bytes:
    """The msgpack bytes of a sealed snapshot, as a store keeps them."""
    return _encoder.encode(sealed)


def decode_sealed(data: bytes) -> SealedSnapshot:
    """Decode `encode_sealed` bytes; checks structure, not content (`unseal` does that).

    Raises:
        StateError: the bytes are not a sealed snapshot; the message names the field.
    """
    try:
        return _sealed_decoder.decode(data)
    except _BAD_INPUT as e:
        raise StateError(f"sealed snapshot is malformed: {e}") from None


def _check_policy_hash(value: object, where: str) -> None:
    if not isinstance(value, str) or not _POLICY_HASH.fullmatch(value):
        raise StateError(
            f"policy hash of {where} is {value!r}; expected 64 lowercase hex characters "
            "(sha256) or empty"
        )


def encode_goal(goal: object, where: str) -> bytes:
    """The goal state as canonical JSON, checked: a dict of JSON values, at most
    `GOAL_LIMIT_BYTES` encoded. Agents call it before sending a snapshot, so a goal the
    state actor would refuse fails in the agent, with the same message.

    Args:
        goal: the goal state.
        where: ``workflow/agent``, for the error message.

    Raises:
        StateError: naming `where`, and the size and limit or the path of a non-JSON value.
    """
    if not isinstance(goal, dict):
        raise StateError(f"goal state of {where} must be a dict, not {type(goal).__name__}")
    failure = ""
    try:
        data: bytes | None = msgspec.json.encode(goal, order="sorted")
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        data, failure = None, str(e)
    if data is not None and len(data) > GOAL_LIMIT_BYTES:
        raise StateError(
            f"goal state of {where} is {len(data):,} bytes; the limit is {GOAL_LIMIT_BYTES:,}"
        )
    # msgspec also encodes sets, bytes, datetimes, NaN (as null) and int keys (as strings),
    # none of which would come back as they went in; only JSON values round-trip.
    problem = _first_non_json(goal)
    if problem is not None:
        path, reason = problem
        raise StateError(f"goal state of {where} is not JSON at {path}: {reason}")
    if data is None:
        raise StateError(f"goal state of {where} cannot be encoded as JSON: {failure}")
    return data


def _first_non_json(value: object) -> tuple[str, str] | None:
    # Iterative, and each container is visited once: a deep or cyclic goal must end in a
    # clear error, not a RecursionError or an endless loop.
    stack: list[tuple[str, object]] = [("$", value)]
    seen: set[int] = set()
    while stack:
        path, item = stack.pop()
        if item is None or isinstance(item, str | bool | int):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return path, f"{item!r} has no JSON form"
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return path, f"key {key!r} is a {type(key).__name__}, not a str"
                stack.append((f"{path}.{key}", child))
        elif isinstance(item, list | tuple):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
        else:
            return path, f"{type(item).__name__} value {_short_repr(item)} is not JSON"
    return None


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _decode_reflections(data: bytes, where: str) -> tuple[str, ...]:
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        # One byte past the limit is enough to know the log is too big, without inflating
        # the rest of a decompression bomb.
        log = decompressor.decompress(data, max_length=REFLECTIONS_LIMIT_BYTES + 1)
    except RuntimeError as e:
        raise StateError(f"reflection log of {where} is corrupt: {e}") from None
    if len(log) > REFLECTIONS_LIMIT_BYTES:
        raise StateError(
            f"reflection log of {where} decompresses to more than {REFLECTIONS_LIMIT_BYTES:,} "
            "bytes; refused"
        )
    if not decompressor.eof:
        raise StateError(f"reflection log of {where} is truncated")
    if decompressor.unused_data:
        raise StateError(
            f"reflection log of {where} has {len(decompressor.unused_data):,} bytes after its end"
        )
    try:
        return _reflections_decoder.decode(log)
    except _BAD_INPUT as e:
        raise StateError(f"reflection log of {where} is corrupt: {e}") from None
