"""The audit index: every event of a tenant's bus, hash-chained per workflow, in Redis.

The index records what was on the event stream, after checking every message as a live
receiver does (`StreamVerifier`): the stream holds whatever an agent's permissions let it
publish, forged or not. A message that fails is kept apart as a `RefusedMessage` (a security
event), never in a workflow's chain; so is an event id stored already from another place in
the stream (a replay). What the index adds is retrieval (one workflow's whole
causal trace in one round trip) and tamper evidence: per workflow, record ``n`` carries
``seq = n``, the hash of record ``n - 1`` and its own hash, a sha256 over the canonical
encoding of all its fields including that previous hash. Signed checkpoints of the chain
heads catch what a chain alone cannot: a tail cut off together with the head.

Keys, under the tenant's key prefix ``<p>`` (``gm:<tenant>``)::

    <p>:audit:chain:<workflow>  LIST  encoded `AuditRecord` s in seq order
    <p>:audit:ids:<workflow>    HASH  event id -> "<seq>:<stream seq>" (each event is stored once)
    <p>:audit:heads             HASH  workflow -> "<seq>:<hash>" of its last record
    <p>:audit:workflows         ZSET  workflow, scored by the time of its latest event
    <p>:audit:agent:<sender>    LIST  "<seq>:<workflow>" of each event the agent sent
    <p>:audit:kind:<kind>       LIST  "<seq>:<workflow>" of each event of that kind
    <p>:audit:checkpoints       LIST  signed checkpoints of all heads, oldest first
    <p>:audit:pruned            HASH  workflow -> its `PruneMark`, once retention removed it
    <p>:audit:refused           HASH  stream seq -> `RefusedMessage` of a message refused
    <p>:audit:refused:<wf>      HASH  the same, of those that claimed workflow <wf>
    <p>:audit:issuers           HASH  token issuer key (hex) -> when the index first trusted it
    <p>:audit:refused_pruned    STRING refused messages retention removed (a count)

Events without a workflow go to the chain of the empty workflow ``""``.

Retention (`AuditIndex.prune`) removes a finished workflow's chain, ids and head whole and
records a `PruneMark` with the head it had, so `AuditIndex.verify` counts it as pruned
rather than reporting it missing; a record removed from a chain that was not pruned is still
reported. A prune mark is recorded, not signed: whoever can write the index can also write
one, which is why verify reports how many workflows were pruned.

Why the hash is computed in Python, not in Lua: Redis scripts offer ``redis.sha1hex`` but no
sha256, and sha1 no longer resists chosen collisions; sha256 written in Lua would cost more
than the rest of the append. So a batch is hashed in Python from the heads it read, and one
script stores every workflow's part only if that workflow's head is still the one read and
none of its event ids is stored yet; a workflow that fails the check (a concurrent writer,
or a redelivered event) is read again and retried. A batch costs two round trips however many
workflows it touches, which is what makes ingest fast.

The script and the indexes assume one Redis (or a Redis-protocol server) per deployment, not
a Redis Cluster: a batch touches keys of many workflows, and the script derives the
per-workflow key names from the prefix itself (declaring each one cost more than the rest).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Final, Literal, TypeAlias, cast

import msgspec
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

# Submodules, not the package: the bus traces through govmesh.observability, and importing
# the package from here would go round in a circle.
from govmesh._tasks import raise_if_cancelled
from govmesh.bus._envelope import Envelope
from govmesh.bus._stream import ensure_event_stream
from govmesh.errors import StateError
from govmesh.identity import SigningKey, VerifyKey
from govmesh.observability._stored import RefusedMessage, StoredMessage, StreamVerifier
from govmesh.subjects import Subjects, inbox_owner

__all__ = [
    "GENESIS",
    "WORKFLOW_END",
    "WORKFLOW_STARTS",
    "AuditCheckpoint",
    "AuditConsumer",
    "AuditIndex",
    "AuditProblem",
    "AuditRecord",
    "AuditTrace",
    "IngestReport",
    "Problem",
    "PruneMark",
    "SignedCheckpoint",
    "VerifyReport",
    "answers_starter",
    "declared_fields",
    "in_summary_order",
    "summarize_body",
    "workflow_end",
]

log = logging.getLogger(__name__)

Scalar: TypeAlias = str | int | float | bool | None
Problem = Literal["changed", "removed", "reordered", "inserted", "truncated", "bad_checkpoint"]

GENESIS: Final = "0" * 64
"""The previous hash of every workflow's first record."""

WORKFLOW_STARTS: Final = ("StartRecord", "WorkflowStart")
"""Event kinds whose first sender in a workflow is whoever started it: the coordinator
records the start with governance, then sends the entry agent its `WorkflowStart`."""
WORKFLOW_END: Final = "Outcome"
"""The event kind that ends a workflow when it answers whoever started it."""

_MAX_ATTEMPTS: Final = 20
_MAX_SUMMARY_FIELDS: Final = 6
_MAX_TEXT: Final = 120
_VERIFY_CHUNK: Final = 200
# Workflows per append script: small enough that hashing the next part overlaps storing this
# one, large enough that a batch is a few round trips.
_SCRIPT_GROUPS: Final = 250

# The fields worth a glance for each kind of body; other kinds show their first scalar fields.
# A dotted name reads a field of a nested mapping and shows under its last part.
_SUMMARY_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "StartRecord": ("agents",),
    "WorkflowStart": ("kind",),
    "Outcome": ("result", "first_decision", "shown.tool", "approval_id", "approved_by"),
    "ToolIntent": ("tool", "step"),
    "Decision": ("outcome", "policy_hash", "approval_id", "approved_by", "final", "intent_hash"),
    "ApprovalRequest": ("approval_id", "tool", "escalation", "policy_hash"),
    "ApprovalAnswer": ("approval_id", "approved", "by"),
    "ToolCall": ("tool", "step"),
    "ToolResult": ("ok", "error", "replayed", "retryable"),
    "Usage": ("model", "input_tokens", "output_tokens", "reasoning_tokens", "error", "cost_usd"),
    "BudgetInterrupt": ("reason", "settled_usd", "cap_usd"),
    "Snapshot": ("version", "policy_hash"),
    "SecurityEvent": ("reason", "claimed_sender", "receiver"),
}
# What user code declares, shown by name after the fields above: the start's payload (the
# workload's), the arguments a tool declares to show, a tool's result and a handler's return
# value. Each source is (holder, msgpack-encoded); a name a field above or an earlier source
# took shows as ``<holder>.<name>``.
_DECLARED: Final[dict[str, tuple[tuple[str, bool], ...]]] = {
    "WorkflowStart": (("body", True),),
    "ApprovalRequest": (("shown", False),),
    "Outcome": (("shown", False), ("value", True)),
    "ToolResult": (("result", False),),
}
_MAX_DECLARED: Final = 8
# The names the fields above show under, per kind: a declared field must not take one.
_FIELD_NAMES: Final = {
    kind: frozenset(path.rpartition(".")[2] for path in paths)
    for kind, paths in _SUMMARY_FIELDS.items()
}
# Free reasoning text is not copied into the index, only its hash.
_THOUGHT_FIELDS: Final = ("reflections", "reasoning", "thought", "thoughts", "rationale")

# ARGV[1] is the key prefix, ARGV[2] the msgpack plan: per workflow [workflow, expected head,
# new head, score, events], events flat, six per event: id, seq, record, index entry, sender,
# kind. One packed argument instead of a dozen per event: packing arguments was most of the
# client's time.
_APPEND: Final = """
local prefix = ARGV[1]
local heads, workflows = KEYS[1], KEYS[2]
local conflicts = {}
for g, group in ipairs(cmsgpack.unpack(ARGV[2])) do
  local wf, expected, new_head, score, ev = group[1], group[2], group[3], group[4], group[5]
  local chain = prefix .. ':audit:chain:' .. wf
  local ids = prefix .. ':audit:ids:' .. wf
  local ok = (redis.call('HGET', heads, wf) or '') == expected
  if ok then
    for i = 1, #ev, 6 do
      if redis.call('HEXISTS', ids, ev[i]) == 1 then
        ok = false
        break
      end
    end
  end
  if ok then
    for i = 1, #ev, 6 do
      redis.call('RPUSH', chain, ev[i + 2])
      redis.call('HSET', ids, ev[i], ev[i + 1])
      redis.call('RPUSH', prefix .. ':audit:agent:' .. ev[i + 4], ev[i + 3])
      redis.call('RPUSH', prefix .. ':audit:kind:' .. ev[i + 5], ev[i + 3])
    end
    redis.call('HSET', heads, wf, new_head)
    redis.call('ZADD', workflows, score, wf)
  else
    conflicts[#conflicts + 1] = g
  end
end
return conflicts
"""


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One event as the index keeps it.

    Attributes:
        workflow: the event's workflow (``""`` for none).
        seq: its place in the workflow's chain, from 1.
        id: the envelope id.
        kind: the body's tag.
        sender: the agent that signed it.
        subject: the subject it was published on.
        ts: its send time, unix seconds.
        causation: the id of the message it answers (its causal parent), if any.
        trace: the W3C ``traceparent`` it carried, if any.
        summary: a few scalar fields of the body, chosen by kind, and ``thought_sha256``, the
            hash of any free reasoning text it held.
        prev: the hash of record ``seq - 1`` (`GENESIS` for the first).
        hash: sha256 (hex) over the canonical encoding of every other field.
    """

    workflow: str
    seq: int
    id: str
    kind: str
    sender: str
    subject: str
    ts: float
    causation: str = ""
    trace: str = ""
    summary: dict[str, Scalar] = {}
    prev: str = GENESIS
    hash: str = ""


class AuditTrace(msgspec.Struct, kw_only=True):
    """One workflow's records in chain order and its causal tree.

    Attributes:
        workflow: the workflow.
        records: its records, by seq.
        roots: ids of records whose parent is not in this workflow (or who have none).
        children: parent id -> ids of the records that answer it, in chain order.
        refused: messages that claimed this workflow and were refused, by stream sequence;
            not part of the trace.
    """

    workflow: str
    records: list[AuditRecord]
    roots: list[str]
    children: dict[str, list[str]]
    refused: list[RefusedMessage] = msgspec.field(default_factory=list)


class AuditProblem(msgspec.Struct, frozen=True, kw_only=True):
    """One way a chain differs from what was appended.

    Attributes:
        workflow: the chain.
        seq: the record concerned (for ``truncated``, the first missing one; 0 for a
            checkpoint problem).
        what: ``changed``, ``removed``, ``reordered``, ``inserted``, ``truncated`` or
            ``bad_checkpoint``.
        detail: what was found.
    """

    workflow: str
    seq: int
    what: Problem
    detail: str


class VerifyReport(msgspec.Struct, kw_only=True):
    """What `AuditIndex.verify` checked and found.

    Attributes:
        workflows: chains checked.
        records: records read.
        checkpoint_ts: time of the checkpoint the heads were compared with (0: none).
        problems: every problem found; none means every chain is intact.
        pruned: workflows asked for that retention removed (see `PruneMark`); not problems.
        refused: messages of the stream refused as security events (for one workflow: those
            that claimed it); kept apart from the chains, so not problems of a chain.
        refused_reasons: ``refused`` by reason.
    """

    workflows: int = 0
    records: int = 0
    checkpoint_ts: float = 0.0
    problems: list[AuditProblem] = msgspec.field(default_factory=list)
    pruned: int = 0
    refused: int = 0
    refused_reasons: dict[str, int] = msgspec.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems


class IngestReport(msgspec.Struct, kw_only=True):
    """What one `AuditIndex.ingest` call did.

    Attributes:
        stored: events appended.
        duplicates: events already in the index (a redelivery), not stored again.
        refused: messages that failed verification, or replayed an event stored from
            elsewhere in the stream, kept apart as security events.
    """

    stored: int = 0
    duplicates: int = 0
    refused: int = 0


class AuditCheckpoint(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """The heads of every chain at one moment, signed.

    Attributes:
        ts: when it was taken, unix seconds.
        signer: who signed it (free text, e.g. an agent id).
        key: the signer's Ed25519 public key.
        heads: workflow -> (seq, hash) of its last record.
        refused: refused messages kept so far, counting those retention removed since, so
            that one deleted from the index shows.
    """

    ts: float
    signer: str
    key: bytes
    heads: dict[str, tuple[int, str]]
    refused: int = 0


class SignedCheckpoint(msgspec.Struct, frozen=True, array_like=True):
    """A checkpoint as stored: its encoding and the signer's Ed25519 signature over it.

    Attributes:
        doc: the msgpack encoding of an `AuditCheckpoint`, the exact bytes signed.
        signature: the signature of ``doc`` by the key the checkpoint names.
    """

    doc: bytes
    signature: bytes

    def checkpoint(self) -> AuditCheckpoint:
        """The checkpoint ``doc`` encodes.

        Raises:
            StateError: ``doc`` is not an encoded checkpoint.
        """
        try:
            return _checkpoints.decode(self.doc)
        except (msgspec.DecodeError, ValueError) as exc:
            raise StateError(f"the checkpoint cannot be decoded: {exc}") from None

    def signed_by_its_key(self) -> bool:
        """Whether ``signature`` is the signature of ``doc`` by the key inside it."""
        return VerifyKey(self.checkpoint().key).verify(self.signature, self.doc)


class PruneMark(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow's chain that retention removed on purpose.

    Attributes:
        workflow: the workflow.
        pruned_at: when, unix seconds.
        seq: its last record's seq then (the head).
        hash: that record's hash.
        last_event_ts: when its latest event was sent.
        reason: why, e.g. ``"finished, older than 30d"``.
    """

    workflow: str
    pruned_at: float
    seq: int
    hash: str
    last_event_ts: float
    reason: str = ""


_encoder = msgspec.msgpack.Encoder(order="sorted")
_records = msgspec.msgpack.Decoder(AuditRecord)
_signed = msgspec.msgpack.Decoder(SignedCheckpoint)
_checkpoints = msgspec.msgpack.Decoder(AuditCheckpoint)
_marks = msgspec.msgpack.Decoder(PruneMark)
_refusals = msgspec.msgpack.Decoder(RefusedMessage)


def _hash(record: AuditRecord) -> str:
    """sha256 over the canonical encoding of ``record`` with an empty ``hash``."""
    unhashed = msgspec.structs.replace(record, hash="") if record.hash else record
    return hashlib.sha256(_encoder.encode(unhashed)).hexdigest()


def _is_text(value: Any) -> bool:
    """Whether a field holds free text (a string, or a list with strings), not a count."""
    if isinstance(value, list):
        return any(isinstance(item, str) and item for item in value)
    return isinstance(value, str) and bool(value)


def answers_starter(kind: str, subject: str, starter: str) -> bool:
    """Whether an event ends its workflow: the `WORKFLOW_END` sent to ``starter``, whoever
    started the workflow (the first sender of one of `WORKFLOW_STARTS` in it), rather than
    one agent's answer to another that asked it to take part."""
    return kind == WORKFLOW_END and bool(starter) and inbox_owner(subject) == starter


def workflow_end(records: Iterable[AuditRecord]) -> AuditRecord | None:
    """The record that ended the workflow of ``records`` (in chain order), if it ended:
    the entry agent's `Outcome` to whoever started it (`answers_starter`)."""
    starter = ""
    for r in records:
        if not starter and r.kind in WORKFLOW_STARTS:
            starter = r.sender
        elif answers_starter(r.kind, r.subject, starter):
            return r
    return None


def summarize_body(kind: str, body: bytes) -> dict[str, Scalar]:
    """A few scalar fields of an encoded body, chosen by ``kind``, plus ``thought_sha256``.

    Some come from a nested mapping: an outcome's ``shown.tool`` shows as ``tool``. Unknown
    kinds show their first scalar fields. After those come up to eight fields that user
    code declares, by name (see `declared_fields`): a workflow start's payload, the
    arguments a tool declares to show (an approval request's ``shown``, or all its ``args``
    when it has none; an outcome's ``shown``), a tool's result and a handler's return value.
    Text is cut to 120 characters, other values that are not scalars show as JSON text;
    fields named like free reasoning (``reflections``, ``reasoning``...) are hashed, never
    copied.
    """
    try:
        value = msgspec.msgpack.decode(body)
    except (msgspec.DecodeError, ValueError):
        return {"undecodable": True}
    if not isinstance(value, dict):
        return {}
    out: dict[str, Scalar] = {}
    fixed = _SUMMARY_FIELDS.get(kind)
    for path in fixed or [k for k in value if isinstance(k, str)]:
        if len(out) >= _MAX_SUMMARY_FIELDS:
            break
        *parents, name = path.split(".")
        if name == "type":
            continue
        holder: Any = value
        for parent in parents:
            holder = holder.get(parent) if isinstance(holder, dict) else None
        v = holder.get(name) if isinstance(holder, dict) else None
        if name in _THOUGHT_FIELDS and _is_text(v):
            continue
        if isinstance(v, str):
            if v:
                out[name] = v[:_MAX_TEXT]
        elif isinstance(v, bool | int | float):
            out[name] = v
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            out[name] = ",".join(v)[:_MAX_TEXT]
    if kind in _DECLARED:
        out.update(_declared(kind, value, taken=_FIELD_NAMES.get(kind, frozenset())))
    stated = value.get("thought_sha256")
    if isinstance(stated, str) and stated:
        # The sender's own hash of its reasoning (a model call's `Usage`): the text is not
        # in the body, or is kept only in the event stream.
        out["thought_sha256"] = stated
    else:
        thoughts = [value[n] for n in _THOUGHT_FIELDS if _is_text(value.get(n))]
        if thoughts:
            out["thought_sha256"] = hashlib.sha256(_encoder.encode(thoughts)).hexdigest()
    return out


def _declared(kind: str, body: dict[str, Any], *, taken: frozenset[str]) -> dict[str, Scalar]:
    """The fields user code declares in ``body`` (see `_DECLARED`), by name."""
    out: dict[str, Scalar] = {}
    for holder, packed in _DECLARED.get(kind, ()):
        fields = body.get(holder)
        if holder == "shown" and not fields and kind == "ApprovalRequest":
            # Requests stored before tools declared what to show: every argument.
            holder, fields = "args", body.get("args")
        if packed:
            fields = _unpacked(fields)
        if fields is None or fields == {}:
            continue
        if not isinstance(fields, dict):
            fields = {holder: fields}
        for name, v in fields.items():
            if len(out) >= _MAX_DECLARED:
                return out
            if (
                not isinstance(name, str)
                or name == "type"
                or (holder == "shown" and name == "tool")
            ):
                continue  # a tagged struct's tag; the tool is a field of its own
            if name in _THOUGHT_FIELDS and _is_text(v):
                continue
            shown = _shown_value(v)
            if shown is None:
                continue
            key = f"{holder}.{name}" if name in taken or name in out else name
            out[key] = shown
    return out


def _unpacked(data: Any) -> Any:
    """A msgpack-encoded value (a start's payload, a handler's return), decoded; None when
    it is empty or not msgpack."""
    if not isinstance(data, bytes) or not data:
        return None
    try:
        return msgspec.msgpack.decode(data)
    except (msgspec.DecodeError, ValueError):
        return None


def _shown_value(v: Any) -> Scalar:
    """``v`` as a summary shows a declared field: scalars as they are, text cut, anything
    else as JSON text, cut; None for nothing to show."""
    if v is None or v == "":
        return None
    if isinstance(v, str):
        return v[:_MAX_TEXT]
    if isinstance(v, bool | int | float):
        return v
    try:
        return msgspec.json.encode(v).decode()[:_MAX_TEXT]
    except (TypeError, ValueError):
        return None


def in_summary_order(kind: str, summary: dict[str, Scalar]) -> dict[str, Scalar]:
    """``summary`` with the fields of its kind first, in their order, then the rest as
    stored: a stored record keeps its summary's keys sorted (its hash is over a canonical
    encoding), which would put what user code declared among them."""
    first = (path.rpartition(".")[2] for path in _SUMMARY_FIELDS.get(kind, ()))
    ordered = {name: summary[name] for name in first if name in summary}
    return ordered | {k: v for k, v in summary.items() if k not in ordered}


def declared_fields(kind: str, summary: dict[str, Scalar]) -> dict[str, Scalar]:
    """The fields of a summary (`summarize_body`) that user code declared, as the summary
    names them: for an approval request, the arguments its tool declares to show; for a
    start, its payload; for an outcome, the shown arguments and the return value; for a
    tool's result, the result. Empty for other kinds."""
    if kind not in _DECLARED:
        return {}
    fixed = _FIELD_NAMES.get(kind, frozenset())
    return {k: v for k, v in summary.items() if k not in fixed and k != "thought_sha256"}


def _lua_bytes(data: bytes) -> msgspec.Raw:
    """``data`` as a msgpack str: the scripts' msgpack decoder knows no bin type, and a Lua
    string holds any bytes."""
    n = len(data)
    if n < 256:
        header = b"\xd9" + n.to_bytes(1, "big")
    elif n < 65536:
        header = b"\xda" + n.to_bytes(2, "big")
    else:
        header = b"\xdb" + n.to_bytes(4, "big")
    return msgspec.Raw(header + data)


def _head(seq: int, digest: str) -> str:
    return f"{seq}:{digest}"


def _parse_head(raw: bytes | str | None) -> tuple[int, str]:
    if not raw:
        return 0, GENESIS
    text = raw.decode() if isinstance(raw, bytes) else raw
    seq, _, digest = text.partition(":")
    return int(seq), digest


class _Pending(msgspec.Struct):
    envelope: Envelope
    summary: dict[str, Scalar]
    stream_seq: int = 0
    stored_at: float = 0.0


def _id_entry(seq: int, stream_seq: int) -> str:
    """An ids hash value: the record's seq and the stream sequence it came from (0: none)."""
    return f"{seq}:{stream_seq}"


def _entry_stream_seq(raw: bytes | str) -> int:
    """The stream sequence of an ids hash value (0 if none was recorded)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    return int(text.partition(":")[2] or 0)


def _replayed(p: _Pending, first: int) -> bool:
    """Whether ``p`` repeats an event stored from another place in the stream (``first``),
    rather than the same message delivered again."""
    return bool(p.stream_seq and first and p.stream_seq != first)


def _in_stream_order(raw: Iterable[bytes]) -> list[RefusedMessage]:
    return sorted((_refusals.decode(r) for r in raw), key=lambda m: m.seq)


def _replay_refusal(p: _Pending, first: int) -> RefusedMessage:
    env = p.envelope
    return RefusedMessage(
        seq=p.stream_seq,
        stored_at=p.stored_at,
        subject=env.subject,
        reason="replay",
        detail=f"event {env.id} was stored already, from stream sequence {first}",
        claimed_sender=env.sender,
        kind=env.kind,
        workflow=env.workflow,
        id=env.id,
    )


def _plan(workflow: str, raw_head: bytes | None, items: list[_Pending]) -> tuple[Any, ...]:
    """One workflow's part of the append script's plan: its records, chained from the head
    read (``raw_head``), as ``(workflow, expected head, new head, score, events)``."""
    seq, prev = _parse_head(raw_head)
    events: list[Any] = []
    for p in items:
        env = p.envelope
        seq += 1
        record = AuditRecord(
            workflow=workflow,
            seq=seq,
            id=env.id,
            kind=env.kind,
            sender=env.sender,
            subject=env.subject,
            ts=env.ts,
            causation=env.causation,
            trace=env.trace,
            summary=p.summary,
            prev=prev,
        )
        prev = _hash(record)
        stored = _encoder.encode(msgspec.structs.replace(record, hash=prev))
        events += (
            env.id,
            _id_entry(seq, p.stream_seq),
            _lua_bytes(stored),
            f"{seq}:{workflow}",
            env.sender,
            env.kind,
        )
    expected = raw_head.decode() if raw_head else ""
    return (workflow, expected, _head(seq, prev), items[-1].envelope.ts, events)


class AuditIndex:
    """The audit index of one tenant.

    Args:
        redis: the deployment's Redis.
        prefix: the tenant's key prefix (``Deployment.key_prefix``, ``gm:<tenant>``).
    """

    def __init__(self, redis: aioredis.Redis, *, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._append = redis.register_script(_APPEND)
        self._heads = f"{prefix}:audit:heads"
        self._workflows = f"{prefix}:audit:workflows"
        self._checkpoints = f"{prefix}:audit:checkpoints"
        self._pruned = f"{prefix}:audit:pruned"
        self._refused = f"{prefix}:audit:refused"
        self._issuers = f"{prefix}:audit:issuers"
        self._refused_pruned = f"{prefix}:audit:refused_pruned"

    def chain_key(self, workflow: str) -> str:
        """The list of ``workflow`` 's records."""
        return f"{self.prefix}:audit:chain:{workflow}"

    def _ids_key(self, workflow: str) -> str:
        return f"{self.prefix}:audit:ids:{workflow}"

    def _agent_key(self, agent: str) -> str:
        return f"{self.prefix}:audit:agent:{agent}"

    def _kind_key(self, kind: str) -> str:
        return f"{self.prefix}:audit:kind:{kind}"

    async def ingest(
        self, messages: Iterable[StoredMessage], *, verifier: StreamVerifier
    ) -> IngestReport:
        """Check messages as the event stream stored them (`StreamVerifier`, which judges
        each at the time it was stored) and append those that pass, in order; keep the
        others apart as security events (`refused`), as well as any event whose id is stored
        already from another stream sequence (a replay).
        """
        accepted: list[_Pending] = []
        refused: list[RefusedMessage] = []
        batch = list(messages)
        for message, checked in zip(batch, verifier.check_many(batch), strict=True):
            if isinstance(checked, RefusedMessage):
                refused.append(checked)
            else:
                accepted.append(
                    _Pending(
                        checked,
                        summarize_body(checked.kind, checked.body),
                        stream_seq=message.seq,
                        stored_at=message.stored_at,
                    )
                )
        report, replays = await self._store(accepted)
        refused += [_replay_refusal(p, first) for p, first in replays]
        await self.refuse(refused)
        report.refused = len(refused)
        return report

    async def append(self, envelopes: Iterable[Envelope]) -> IngestReport:
        """Append envelopes verified already, in order, each once per event id, to their
        workflows' chains.

        Atomic per workflow: a workflow's part of the batch is stored whole or not at all.
        Cancelling leaves each workflow either with its part or without.

        Raises:
            StateError: other writers kept changing the same chains through every attempt.
        """
        report, _ = await self._store(
            [_Pending(env, summarize_body(env.kind, env.body)) for env in envelopes]
        )
        return report

    async def _store(
        self, items: list[_Pending]
    ) -> tuple[IngestReport, list[tuple[_Pending, int]]]:
        """`append` of ``items``; also returns each that repeats an event stored from
        another stream sequence, with that sequence."""
        report = IngestReport()
        replays: list[tuple[_Pending, int]] = []
        pending: dict[str, list[_Pending]] = {}
        seen: dict[str, int] = {}
        for p in items:
            first = seen.get(p.envelope.id)
            if first is not None:
                if _replayed(p, first):
                    replays.append((p, first))
                else:
                    report.duplicates += 1
                continue
            seen[p.envelope.id] = p.stream_seq
            pending.setdefault(p.envelope.workflow, []).append(p)
        check_ids = False
        for _ in range(_MAX_ATTEMPTS):
            if not pending:
                return report, replays
            workflows = list(pending)
            heads = cast(list[bytes | None], await self.redis.hmget(self._heads, workflows))
            if check_ids:
                # A retry: some events may be stored already (redelivery, a second writer,
                # or a replay of an event stored from elsewhere in the stream).
                async with self.redis.pipeline(transaction=False) as pipe:
                    for wf in workflows:
                        pipe.hmget(self._ids_key(wf), [p.envelope.id for p in pending[wf]])
                    known = await pipe.execute()
                for wf, found in zip(workflows, known, strict=True):
                    fresh = []
                    for p, f in zip(pending[wf], found, strict=True):
                        if f is None:
                            fresh.append(p)
                        elif _replayed(p, _entry_stream_seq(f)):
                            replays.append((p, _entry_stream_seq(f)))
                        else:
                            report.duplicates += 1
                    pending[wf] = fresh
            sent: list[tuple[list[str], asyncio.Task[Any]]] = []
            plan: list[Any] = []
            groups: list[str] = []
            for wf, raw_head in zip(workflows, heads, strict=True):
                group = pending[wf]
                if not group:
                    del pending[wf]
                    continue
                groups.append(wf)
                plan.append(_plan(wf, raw_head, group))
                if len(plan) == _SCRIPT_GROUPS:
                    sent.append((groups, await self._send(plan)))
                    plan, groups = [], []
            if plan:
                sent.append((groups, await self._send(plan)))
            if not sent:
                return report, replays
            answers = await asyncio.gather(*(task for _, task in sent))
            for (groups, _), conflicts in zip(sent, answers, strict=True):
                failed = {groups[g - 1] for g in conflicts}
                for wf in groups:
                    if wf not in failed:
                        report.stored += len(pending.pop(wf))
            check_ids = True
        raise StateError(
            f"audit append kept conflicting for {len(pending)} workflows "
            f"(e.g. {next(iter(pending))!r}) after {_MAX_ATTEMPTS} attempts"
        )

    async def trust(self, issuers: Sequence[bytes], *, now: float) -> dict[bytes, float]:
        """Record that the index verifies with ``issuers`` from ``now`` on, unless recorded
        already; returns every issuer it has recorded (for this deployment and the ones it
        was before a restart) with when it was first trusted."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in issuers:
                pipe.hsetnx(self._issuers, key.hex(), repr(now))
            pipe.hgetall(self._issuers)
            *_, raw = await pipe.execute()
        return {bytes.fromhex(k.decode()): float(v) for k, v in raw.items()}

    def _refused_key(self, workflow: str | None) -> str:
        return self._refused if workflow is None else f"{self._refused}:{workflow}"

    async def refuse(self, refused: Iterable[RefusedMessage]) -> None:
        """Keep ``refused`` apart from every chain, once per stream sequence, also under the
        workflow each claimed (so a workflow's are read without reading everyone's)."""
        entries = [(m, _encoder.encode(m)) for m in refused]
        if not entries:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            for m, data in entries:
                pipe.hset(self._refused, str(m.seq), data)
                pipe.hset(self._refused_key(m.workflow), str(m.seq), data)
            await pipe.execute()

    async def refused(self, workflow: str | None = None) -> list[RefusedMessage]:
        """The messages refused as security events, in stream order; with ``workflow``,
        those that claimed it."""
        raw = cast(list[bytes], await self.redis.hvals(self._refused_key(workflow)))
        return _in_stream_order(raw)

    async def _refused_of(self, workflows: Sequence[str]) -> list[RefusedMessage]:
        """The messages refused that claimed any of ``workflows``, in stream order."""
        raw: list[bytes] = []
        for start in range(0, len(workflows), _VERIFY_CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                for wf in workflows[start : start + _VERIFY_CHUNK]:
                    pipe.hvals(self._refused_key(wf))
                for values in await pipe.execute():
                    raw += values
        return _in_stream_order(raw)

    async def forget_refused(self, refused: Sequence[RefusedMessage]) -> None:
        """Remove ``refused`` (retention), counting them as removed on purpose: like a
        `PruneMark`, the count is recorded, not signed."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for m in refused:
                pipe.hdel(self._refused, str(m.seq))
                pipe.hdel(self._refused_key(m.workflow), str(m.seq))
            pipe.incrby(self._refused_pruned, len(refused))
            await pipe.execute()

    async def _refused_so_far(self) -> int:
        """Refused messages kept, plus those retention removed."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hlen(self._refused)
            pipe.get(self._refused_pruned)
            kept, pruned = await pipe.execute()
        return int(kept) + int(pruned or 0)

    async def _send(self, plan: list[Any]) -> asyncio.Task[Any]:
        """Start the append script for ``plan`` and return once it is on its way, so the
        next part of the batch is hashed while Redis stores this one."""
        args = (self.prefix, _encoder.encode(plan))
        task = asyncio.ensure_future(self._append(keys=[self._heads, self._workflows], args=args))
        await asyncio.sleep(0)
        return task

    async def records(self, workflow: str) -> list[AuditRecord]:
        """``workflow`` 's records as stored, in list order."""
        raw = cast(list[bytes], await self.redis.lrange(self.chain_key(workflow), 0, -1))
        return [_records.decode(r) for r in raw]

    async def show(self, workflow: str) -> AuditTrace:
        """``workflow`` 's records in order and its causal tree, and apart from them the
        refused messages that claimed it, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self.chain_key(workflow), 0, -1)
            pipe.hvals(self._refused_key(workflow))
            raw, refused = await pipe.execute()
        records = [_records.decode(r) for r in raw]
        ids = {r.id for r in records}
        roots: list[str] = []
        children: dict[str, list[str]] = {}
        for r in records:
            if r.causation and r.causation in ids:
                children.setdefault(r.causation, []).append(r.id)
            else:
                roots.append(r.id)
        return AuditTrace(
            workflow=workflow,
            records=records,
            roots=roots,
            children=children,
            refused=_in_stream_order(refused),
        )

    async def workflows(self) -> list[str]:
        """Every workflow in the index, oldest latest-event first."""
        raw = cast(list[bytes], await self.redis.zrange(self._workflows, 0, -1))
        return [w.decode() for w in raw]

    async def by_agent(self, agent: str, *, limit: int = 100) -> list[AuditRecord]:
        """The last ``limit`` events ``agent`` sent, in ingest order."""
        return await self._lookup(self._agent_key(agent), limit)

    async def by_kind(self, kind: str, *, limit: int = 100) -> list[AuditRecord]:
        """The last ``limit`` events of ``kind``, in ingest order."""
        return await self._lookup(self._kind_key(kind), limit)

    async def _lookup(self, key: str, limit: int) -> list[AuditRecord]:
        entries = cast(list[bytes], await self.redis.lrange(key, -limit, -1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for e in entries:
                seq, _, wf = e.decode().partition(":")
                pipe.lindex(self.chain_key(wf), int(seq) - 1)
            found = await pipe.execute()
        return [_records.decode(r) for r in found if r is not None]

    async def checkpoint(self, key: SigningKey, *, signer: str = "") -> AuditCheckpoint:
        """Sign and store the current head of every chain; returns the checkpoint."""
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self._heads))
        heads = {wf.decode(): _parse_head(h) for wf, h in raw.items()}
        cp = AuditCheckpoint(
            ts=time.time(),
            signer=signer,
            key=key.public.raw,
            heads=heads,
            refused=await self._refused_so_far(),
        )
        doc = _encoder.encode(cp)
        signed = SignedCheckpoint(doc, key.sign(doc))
        await self.redis.rpush(self._checkpoints, _encoder.encode(signed))
        return cp

    async def latest_checkpoint(self) -> SignedCheckpoint | None:
        """The last signed checkpoint as stored, or None if none was taken.

        Raises:
            StateError: what is stored is not a signed checkpoint.
        """
        raw = cast(bytes | None, await self.redis.lindex(self._checkpoints, -1))
        if raw is None:
            return None
        try:
            return _signed.decode(raw)
        except (msgspec.DecodeError, ValueError) as exc:
            raise StateError(f"the checkpoint cannot be decoded: {exc}") from None

    async def _last_checkpoint(
        self, trusted: Sequence[VerifyKey], problems: list[AuditProblem]
    ) -> AuditCheckpoint | None:
        try:
            signed = await self.latest_checkpoint()
            if signed is None:
                return None
            cp = signed.checkpoint()
        except StateError as exc:
            detail = f"the last {exc}"
            problems.append(AuditProblem(workflow="", seq=0, what="bad_checkpoint", detail=detail))
            return None
        if trusted and cp.key not in {k.raw for k in trusted}:
            detail = f"the last checkpoint is signed by an untrusted key {cp.key.hex()}"
        elif not signed.signed_by_its_key():
            detail = "the last checkpoint's signature does not match its content"
        else:
            return cp
        problems.append(AuditProblem(workflow="", seq=0, what="bad_checkpoint", detail=detail))
        return None

    async def verify(
        self, workflow: str | Sequence[str] | None = None, *, trusted: Sequence[VerifyKey] = ()
    ) -> VerifyReport:
        """Check one workflow's chain, several, or every chain against its hashes, its head
        and the last signed checkpoint.

        The checkpoint, the retention marks and the chains are read once for all the
        workflows asked about, in pipelined chunks: checking a run's 10,000 workflows one
        call each read and checked the checkpoint (every chain's head) 10,000 times.

        Args:
            workflow: the chain or chains to check; None checks every workflow the index
                knows.
            trusted: public keys a checkpoint must be signed with; empty accepts the key in
                the checkpoint itself (which proves integrity, not who signed).
        """
        report = VerifyReport()
        chosen = [workflow] if isinstance(workflow, str) else workflow
        refused = await self.refused() if chosen is None else await self._refused_of(chosen)
        report.refused = len(refused)
        report.refused_reasons = dict(Counter(m.reason for m in refused).most_common())
        cp = await self._last_checkpoint(trusted, report.problems)
        if cp is not None:
            report.checkpoint_ts = cp.ts
            so_far = await self._refused_so_far()
            if workflow is None and so_far < cp.refused:
                report.problems.append(
                    AuditProblem(
                        workflow="",
                        seq=0,
                        what="removed",
                        detail=f"the last checkpoint saw {cp.refused} refused messages; "
                        f"{so_far} are left or were pruned",
                    )
                )
        pruned = await self.pruned()
        if chosen is not None:
            names = list(chosen)
        else:
            names = sorted(
                set(await self.workflows())
                | {w.decode() for w in cast(list[bytes], await self.redis.hkeys(self._heads))}
                | set(cp.heads if cp else ())
                | set(pruned)
            )
        for start in range(0, len(names), _VERIFY_CHUNK):
            chunk = names[start : start + _VERIFY_CHUNK]
            async with self.redis.pipeline(transaction=False) as pipe:
                for wf in chunk:
                    pipe.lrange(self.chain_key(wf), 0, -1)
                pipe.hmget(self._heads, chunk)
                *chains, heads = await pipe.execute()
            for wf, raw, head in zip(chunk, chains, heads, strict=True):
                mark = cp.heads.get(wf) if cp else None
                pm = pruned.get(wf)
                if pm is not None and cp is not None and cp.ts <= pm.pruned_at:
                    # The checkpoint saw the chain before it was pruned: it must have seen
                    # no more of it than the prune removed.
                    if mark is not None and mark[0] > pm.seq:
                        report.problems.append(
                            AuditProblem(
                                workflow=wf,
                                seq=pm.seq + 1,
                                what="truncated",
                                detail=f"the last checkpoint saw seq {mark[0]}; the chain was "
                                f"pruned at seq {pm.seq}",
                            )
                        )
                    mark = None
                if pm is not None and not raw and head is None:
                    report.pruned += 1
                    continue
                report.workflows += 1
                report.records += len(raw)
                report.problems += _check_chain(wf, raw, _parse_head(head), mark)
        return report

    async def pruned(self) -> dict[str, PruneMark]:
        """Every workflow retention removed, with its mark."""
        raw = cast(dict[bytes, bytes], await self.redis.hgetall(self._pruned))
        return {wf.decode(): _marks.decode(m) for wf, m in raw.items()}

    async def finished_before(self, cutoff: float) -> list[str]:
        """Workflows whose latest event was sent before ``cutoff`` and that ended (see
        `workflow_end`), oldest first."""
        old = cast(list[bytes], await self.redis.zrangebyscore(self._workflows, "-inf", cutoff))
        if not old:
            return []
        entries = cast(list[bytes], await self.redis.lrange(self._kind_key(WORKFLOW_END), 0, -1))
        answered = {e.decode().partition(":")[2] for e in entries}
        candidates = [w for w in (o.decode() for o in old) if w in answered]
        ended: list[str] = []
        for start in range(0, len(candidates), _VERIFY_CHUNK):
            chunk = candidates[start : start + _VERIFY_CHUNK]
            async with self.redis.pipeline(transaction=False) as pipe:
                for wf in chunk:
                    pipe.lrange(self.chain_key(wf), 0, -1)
                chains = cast(list[list[bytes]], await pipe.execute())
            for wf, raw in zip(chunk, chains, strict=True):
                if workflow_end(_records.decode(r) for r in raw) is not None:
                    ended.append(wf)
        return ended

    async def prune(
        self, workflows: Sequence[str], *, reason: str = "", now: float | None = None
    ) -> list[PruneMark]:
        """Remove the chains of ``workflows`` whole (records, ids, head) and record a
        `PruneMark` for each; returns the marks. Only for workflows that ended: an event
        appended while its chain is removed goes with it. The per-agent and per-kind entries
        are left; lookups skip entries whose record is gone."""
        if not workflows:
            return []
        now = time.time() if now is None else now
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self._heads, list(workflows))
            for wf in workflows:
                pipe.zscore(self._workflows, wf)
            heads, *scores = await pipe.execute()
        marks = []
        for wf, head, score in zip(workflows, heads, scores, strict=True):
            seq, digest = _parse_head(head)
            marks.append(
                PruneMark(
                    workflow=wf,
                    pruned_at=now,
                    seq=seq,
                    hash=digest,
                    last_event_ts=float(score or 0.0),
                    reason=reason,
                )
            )
        async with self.redis.pipeline(transaction=True) as pipe:
            for m in marks:
                pipe.delete(self.chain_key(m.workflow), self._ids_key(m.workflow))
                pipe.hdel(self._heads, m.workflow)
                pipe.zrem(self._workflows, m.workflow)
                pipe.hset(self._pruned, m.workflow, _encoder.encode(m))
            await pipe.execute()
        return marks


def _check_chain(
    workflow: str,
    raw: list[bytes],
    head: tuple[int, str],
    mark: tuple[int, str] | None,
) -> list[AuditProblem]:
    """Every problem of one chain: records read in list order, the head, the checkpoint."""
    problems: list[AuditProblem] = []

    def problem(seq: int, what: Problem, detail: str) -> None:
        problems.append(AuditProblem(workflow=workflow, seq=seq, what=what, detail=detail))

    # Records in list order; an edited one is reported here and not blamed again below
    # (its stored hash still links, unless it was rehashed too), so one edit is one problem.
    sound: list[AuditRecord] = []
    changed: set[int] = set()
    for pos, data in enumerate(raw):
        try:
            record = _records.decode(data)
        except (msgspec.DecodeError, ValueError):
            problem(pos + 1, "changed", f"the record at position {pos + 1} cannot be decoded")
            continue
        if record.workflow != workflow:
            problem(record.seq, "inserted", f"a record of workflow {record.workflow!r}")
        else:
            if _hash(record) != record.hash:
                problem(record.seq, "changed", "its content does not match its hash")
                changed.add(record.seq)
            sound.append(record)

    # One record per seq: the one that links to its predecessor; others were inserted.
    by_seq: dict[int, list[AuditRecord]] = {}
    for r in sound:
        by_seq.setdefault(r.seq, []).append(r)
    chosen: dict[int, AuditRecord] = {}
    for seq in sorted(by_seq):
        candidates = by_seq[seq]
        before = chosen.get(seq - 1)
        linked = [c for c in candidates if before is None or c.prev == before.hash]
        keep = (linked or candidates)[0]
        chosen[seq] = keep
        for c in candidates:
            if c is not keep:
                problem(seq, "inserted", f"a second record with seq {seq} (id {c.id})")

    # Gaps are removals; a broken link to an unedited record means it was rewritten whole.
    last = 0
    for seq in sorted(chosen):
        if seq > last + 1:
            for gone in range(last + 1, seq):
                problem(gone, "removed", f"seq {gone} is missing between {last} and {seq}")
        elif last and chosen[seq].prev != chosen[last].hash and last not in changed:
            problem(last, "changed", f"record {seq} does not link to it (rewritten and rehashed)")
        last = seq
    if 1 in chosen and chosen[1].prev != GENESIS:
        problem(1, "changed", "the first record does not start from the genesis hash")

    # List order must be seq order.
    kept = [r for r in sound if chosen.get(r.seq) is r]
    in_order = sorted(r.seq for r in kept)
    for r, expected in zip(kept, in_order, strict=True):
        if r.seq != expected:
            problem(r.seq, "reordered", f"stored where seq {expected} belongs")

    # The tail: against the head the index keeps, then against the signed checkpoint.
    head_seq, head_hash = head
    if head_seq > last:
        problem(last + 1, "truncated", f"records {last + 1}-{head_seq} are missing at the tail")
    elif head_seq < last:
        for extra in range(head_seq + 1, last + 1):
            problem(extra, "inserted", f"beyond the head (seq {head_seq})")
    elif last and chosen[last].hash != head_hash and last not in changed:
        problem(last, "changed", "the last record does not match the head")
    if mark is not None:
        mark_seq, mark_hash = mark
        if mark_seq > last:
            problem(
                last + 1,
                "truncated",
                f"the last checkpoint saw seq {mark_seq}; the chain ends at {last}",
            )
        elif mark_seq in chosen and mark_seq not in changed and chosen[mark_seq].hash != mark_hash:
            problem(mark_seq, "changed", "differs from the record the checkpoint saw")
    return problems


class AuditConsumer:
    """Feeds one tenant's events from the JetStream event stream into an `AuditIndex`.

    A durable pull consumer on ``gm.<tenant>.>`` from the start of the stream: a new index
    replays everything the stream still holds, and a restarted one resumes where it left.
    A batch is acknowledged only once it is stored, so nothing is lost in between; a
    redelivered event is stored once (the index is idempotent per event id). Every message
    is verified first (`AuditIndex.ingest`); refused ones are kept apart as security events.

    Use `start`, then `close` (safe twice; cancels the loop, leaving unacknowledged messages
    to be redelivered to the next consumer, and signs a last checkpoint if anything was
    stored since the one before, so a run shorter than ``checkpoint_every_s`` has one too).

    Args:
        nc: a NATS connection with JetStream access.
        index: where events go.
        tenant: whose events.
        verifier: checks each message as a receiver of the deployment would
            (`StreamVerifier.of` the deployment).
        durable: the consumer's durable name (default ``audit-<tenant>``).
        batch: messages fetched and stored at once.
        checkpoint_key: sign a checkpoint of the chain heads with this key every
            ``checkpoint_every_s`` seconds in which something was stored (None: never).
        checkpoint_every_s: seconds between checkpoints.
        signer: who signs the checkpoints, recorded in them.
        ack_wait_s: seconds before the server redelivers a message not acknowledged; a
            fetch still pending when the consumer closes can hold messages that long.
        replicas: JetStream replicas of the event stream, if this consumer creates it
            (`Deployment.replicas`).
    """

    def __init__(
        self,
        nc: NATS,
        index: AuditIndex,
        *,
        tenant: str,
        verifier: StreamVerifier,
        durable: str = "",
        batch: int = 500,
        checkpoint_key: SigningKey | None = None,
        checkpoint_every_s: float = 60.0,
        signer: str = "",
        ack_wait_s: float = 30.0,
        replicas: int = 1,
    ) -> None:
        self.nc = nc
        self.replicas = replicas
        self.index = index
        self.subjects = Subjects(tenant)
        self.verifier = verifier
        self.durable = durable or f"audit-{self.subjects.tenant}"
        self.batch = batch
        self.stored = 0
        self.duplicates = 0
        self.refused = 0
        self.checkpoints = 0
        self._checkpoint_key = checkpoint_key
        self._checkpoint_every_s = checkpoint_every_s
        self._signer = signer or self.durable
        self._ack_wait_s = ack_wait_s
        self._task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._unsigned = 0

    async def start(self) -> None:
        """Create (or resume) the durable consumer and start storing."""
        await ensure_event_stream(self.nc, self.subjects.tenant, replicas=self.replicas)
        js = self.nc.jetstream()
        self._sub = await js.pull_subscribe(
            self.subjects.everything,
            durable=self.durable,
            stream=self.subjects.event_stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._ack_wait_s,
                max_ack_pending=self.batch * 4,
            ),
        )
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.durable)

    async def _loop(self) -> None:
        assert self._sub is not None
        due = time.monotonic() + self._checkpoint_every_s
        while True:
            raise_if_cancelled()
            if time.monotonic() >= due:
                await self._sign()
                due = time.monotonic() + self._checkpoint_every_s
            try:
                msgs = await self._sub.fetch(self.batch, timeout=1.0)
            except TimeoutError:
                # nats-py's own, or asyncio's when its deadline passes between two pulls.
                continue
            except NatsError as exc:
                # nats-server restarting: the stream keeps the events; fetch again.
                log.warning("audit stream unavailable, will retry: %s", exc)
                await asyncio.sleep(1.0)
                continue
            try:
                report = await self.index.ingest(
                    [StoredMessage.of(m) for m in msgs], verifier=self.verifier
                )
            except (aioredis.RedisError, OSError) as exc:
                log.warning("audit index unavailable, will retry: %s", exc)
                for m in msgs:
                    await m.nak(delay=1.0)
                await asyncio.sleep(1.0)
                continue
            try:
                for m in msgs:
                    await m.ack()
            except NatsError as exc:
                # Stored already; redelivered ones are recognised by their event ids.
                log.warning("audit acks lost, the events will come again: %s", exc)
            self.stored += report.stored
            self._unsigned += report.stored
            self.duplicates += report.duplicates
            if report.refused:
                self.refused += report.refused
                log.warning("audit refused %d messages of the stream", report.refused)

    async def _sign(self) -> None:
        """Sign a checkpoint if there is a key and something was stored since the last."""
        if self._checkpoint_key is None or not self._unsigned:
            return
        try:
            await self.index.checkpoint(self._checkpoint_key, signer=self._signer)
            self.checkpoints += 1
            self._unsigned = 0
        except (aioredis.RedisError, OSError) as exc:
            log.warning("audit checkpoint failed, will retry: %s", exc)

    async def close(self) -> None:
        """Stop storing; safe to call twice. The durable consumer stays for a restart."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self._sign()
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # closing must not fail on a dropped connection
                log.debug("audit consumer unsubscribe failed: %s", exc)

    async def __aenter__(self) -> AuditConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
