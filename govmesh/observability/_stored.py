"""Messages as the event stream stored them, verified as a live receiver verifies them.

The stream records whatever an agent's permissions let it publish, forged or not. Whoever
reads it (the audit index, ``govmesh watch``) checks each message with the bus's own
`MessageVerifier` before trusting a word of it; a refused message becomes a
`RefusedMessage`, a security event that names what it claimed without believing it.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import msgspec
from nats.aio.msg import Msg

from govmesh.bus._codec import Codec
from govmesh.bus._envelope import Envelope
from govmesh.bus._verify import MessageVerifier, Verified
from govmesh.config import Deployment
from govmesh.errors import SecurityError
from govmesh.identity import TokenVerifier

__all__ = ["RefusedMessage", "StoredMessage", "StreamVerifier"]

_CLAIM_CHARS: Final = 200
_DETAIL_CHARS: Final = 500
_VERDICTS_KEPT: Final = 10_000
_PROOF_THREADS: Final = 2
_PARALLEL_FROM: Final = 64
"""Batches at least this large check their signatures on `_PROOF_THREADS` threads: below
it, handing work to the threads costs more than it saves."""
_proof_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    # One small pool per process, made on first use: libsodium releases the GIL while it
    # checks a signature (two threads verify 28.8 µs per signature against 56.5 µs on one,
    # measured here), which is 83% of what verifying a stored message costs.
    global _proof_pool
    if _proof_pool is None:
        _proof_pool = ThreadPoolExecutor(_PROOF_THREADS, thread_name_prefix="govmesh-proof")
    return _proof_pool


class StoredMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message as the event stream holds it.

    Attributes:
        subject: the subject it was published on.
        data: its bytes, as published.
        seq: its stream sequence number.
        stored_at: when the stream stored it (unix seconds), from JetStream's metadata.
    """

    subject: str
    data: bytes
    seq: int
    stored_at: float

    @classmethod
    def of(cls, msg: Msg) -> StoredMessage:
        """The stored message a JetStream consumer delivered as ``msg``."""
        meta = msg.metadata
        return cls(
            subject=msg.subject,
            data=msg.data,
            seq=meta.sequence.stream,
            stored_at=meta.timestamp.timestamp(),
        )


class RefusedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A message of the stream that failed verification: a security event.

    What it claimed (sender, kind, workflow, id) is read from the unverified envelope when
    it can be, cut to 200 characters, and is only a claim.

    Attributes:
        seq: its stream sequence number.
        stored_at: when the stream stored it (unix seconds).
        subject: the subject it was published on.
        reason: why it was refused, as a receiver names it (``token_unknown_issuer``,
            ``sender_mismatch``, ``replay``, ``malformed``...).
        detail: what was found.
        claimed_sender: the sender it claimed ("" when unreadable).
        kind: the body kind it claimed.
        workflow: the workflow it claimed.
        id: the event id it claimed.
        size: its size in bytes.
    """

    seq: int
    stored_at: float
    subject: str
    reason: str
    detail: str = ""
    claimed_sender: str = ""
    kind: str = ""
    workflow: str = ""
    id: str = ""
    size: int = 0


class StreamVerifier:
    """Checks stored messages as a live receiver checks them on arrival: size, token of a
    trusted issuer, signature, sender named by the token, the subject it was signed for,
    freshness and replay (`MessageVerifier`).

    Each message is judged at the time the stream stored it, not now: an index may be
    built, or rebuilt, days after the messages were sent, when every token in them has
    expired; a message a receiver could accept when it arrived is accepted, one it had to
    refuse is refused. Replays are caught among the messages this verifier has seen, in
    stream order; a message the stream delivers again (the same stream sequence, e.g. after
    a failed acknowledgement) gets the verdict it got the first time.

    Args:
        issuers: raw public keys of the token issuers the deployment trusts.
        audience: the deployment's token audience.
        codec: the bus codec.
        retired: issuers of the same deployment before it was restarted (a resumed run has
            a new issuer), trusted only for messages the stream stored before ``since``.
        since: when the current issuers came into force.
    """

    def __init__(
        self,
        *,
        issuers: Sequence[bytes],
        audience: str,
        codec: Codec | None = None,
        retired: Sequence[bytes] = (),
        since: float = 0.0,
    ) -> None:
        self.codec = codec or Codec()
        tokens = TokenVerifier(issuers=list(issuers), audience=audience)
        self._verifier = MessageVerifier(tokens=tokens, codec=self.codec)
        self._before: MessageVerifier | None = None
        self._since = since
        if retired:
            earlier = TokenVerifier(issuers=[*issuers, *retired], audience=audience)
            self._before = MessageVerifier(tokens=earlier, codec=self.codec)
        self._verdicts: OrderedDict[int, Envelope | RefusedMessage] = OrderedDict()

    @classmethod
    def of(cls, deployment: Deployment) -> StreamVerifier:
        """A verifier that trusts what ``deployment`` 's members trust."""
        return cls(issuers=deployment.issuers, audience=deployment.audience)

    def check(self, message: StoredMessage) -> Envelope | RefusedMessage:
        """The verified envelope of ``message``, or the security event refusing it."""
        return self.check_many([message])[0]

    def check_many(self, messages: Sequence[StoredMessage]) -> list[Envelope | RefusedMessage]:
        """`check` of each of ``messages``, in stream order; a large batch checks its
        signatures on a few threads first, then age and replay one by one in order."""
        if len(messages) < _PARALLEL_FROM:
            proofs = [self._proof(m) for m in messages]
        else:
            half = (len(messages) + 1) // 2
            parts = _pool().map(self._proofs, (messages[:half], messages[half:]))
            proofs = [proof for part in parts for proof in part]
        return [self._verdict(m, proof) for m, proof in zip(messages, proofs, strict=True)]

    def _verifier_for(self, message: StoredMessage) -> MessageVerifier:
        if self._before is not None and message.stored_at < self._since:
            return self._before
        return self._verifier

    def _proofs(self, messages: Sequence[StoredMessage]) -> list[Verified | SecurityError]:
        return [self._proof(m) for m in messages]

    def _proof(self, message: StoredMessage) -> Verified | SecurityError:
        try:
            return self._verifier_for(message).proof(
                message.subject, message.data, now=message.stored_at
            )
        except SecurityError as exc:
            return exc

    def _verdict(
        self, message: StoredMessage, proof: Verified | SecurityError
    ) -> Envelope | RefusedMessage:
        known = self._verdicts.get(message.seq)
        if known is not None:
            return known
        verdict: Envelope | RefusedMessage
        try:
            if isinstance(proof, SecurityError):
                raise proof
            self._verifier_for(message).fresh(proof.envelope, now=message.stored_at)
            verdict = proof.envelope
        except SecurityError as exc:
            verdict = self.refusal(message, exc)
        self._verdicts[message.seq] = verdict
        if len(self._verdicts) > _VERDICTS_KEPT:
            self._verdicts.popitem(last=False)
        return verdict

    def refusal(self, message: StoredMessage, exc: SecurityError) -> RefusedMessage:
        """The security event for ``message``, refused with ``exc``."""
        claimed: Envelope | None = None
        with contextlib.suppress(SecurityError):  # garbage claims nothing
            claimed = self.codec.envelope(self.codec.open(message.data).envelope)
        return RefusedMessage(
            seq=message.seq,
            stored_at=message.stored_at,
            subject=message.subject[:_CLAIM_CHARS],
            reason=exc.reason,
            detail=str(exc).removeprefix(f"{exc.reason}: ")[:_DETAIL_CHARS],
            claimed_sender="" if claimed is None else claimed.sender[:_CLAIM_CHARS],
            kind="" if claimed is None else claimed.kind[:_CLAIM_CHARS],
            workflow="" if claimed is None else claimed.workflow[:_CLAIM_CHARS],
            id="" if claimed is None else claimed.id[:_CLAIM_CHARS],
            size=len(message.data),
        )
