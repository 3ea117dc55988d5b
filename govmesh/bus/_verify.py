"""Message proof: everything a receiver checks before any handler may see a message."""

from __future__ import annotations

import time
from typing import Final, NamedTuple

from govmesh.bus._codec import Codec
from govmesh.bus._envelope import Envelope
from govmesh.errors import SecurityError
from govmesh.identity import Claims, NonceCache, TokenVerifier

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_WINDOW_S", "MessageVerifier", "Verified"]

DEFAULT_WINDOW_S: Final = 30.0
DEFAULT_FUTURE_S: Final = 5.0
DEFAULT_MAX_MESSAGE_BYTES: Final = 512 * 1024


class Verified(NamedTuple):
    """A message that passed every check."""

    envelope: Envelope
    claims: Claims


class MessageVerifier:
    """Checks size, token, signature, sender, subject binding, freshness and replay, in that order.

    Cheap checks come first and the signature is checked before the envelope is decoded, so
    garbage costs little and nothing unsigned is ever parsed beyond the outer frame.

    Args:
        tokens: the token verifier (trusted issuers, audience, claim cache).
        codec: the bus codec.
        window_s: how old a message may be.
        future_s: how far in the future a timestamp may be (clock skew).
        max_bytes: the largest message accepted.
    """

    def __init__(
        self,
        *,
        tokens: TokenVerifier,
        codec: Codec,
        window_s: float = DEFAULT_WINDOW_S,
        future_s: float = DEFAULT_FUTURE_S,
        max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._tokens = tokens
        self._codec = codec
        self._window_s = window_s
        self._future_s = future_s
        self._max_bytes = max_bytes
        # Each receiver remembers the nonces it saw, at no cost per message. That catches
        # every replay to a receiver that gets all of its subject's messages (an agent's
        # inbox, a fan-out, a queue group of one). Where a queue group of several shares the
        # messages, a replay may reach another member: governance, whose decisions a replay
        # could repeat, also claims each nonce in Redis with the decision (`Decider`); the
        # gateway holds a decision to one use in its ledger, whoever presents it; a usage
        # event replayed to a second budget actor could count model use twice, which only
        # ever tightens the caps, and a snapshot replayed to a second state actor stores
        # again, unchanged, a version already held.
        self._nonces = NonceCache(window_s=self.nonce_ttl_s)

    @property
    def nonce_ttl_s(self) -> float:
        """How long a nonce must be remembered: while a message carrying it is fresh, which
        is up to ``window_s`` after a timestamp that may be ``future_s`` ahead."""
        return self._window_s + self._future_s

    def verify(
        self, subject: str, data: bytes, *, now: float | None = None, replay: bool = True
    ) -> Verified:
        """Return the verified message or raise `SecurityError` with the reason.

        Args:
            subject: the subject the message actually arrived on.
            data: the wire bytes.
            now: the current time (an input, for tests).
            replay: whether to check and record the nonce, and the message's age; off when
                re-checking a message carried inside another one (a decision inside a tool
                call), whose own expiry and one use (the gateway's ledger) stand in for
                both, so a step retried after a long stall still gets its recorded answer.
        """
        now = time.time() if now is None else now
        verified = self.proof(subject, data, now=now)
        if replay:
            self.fresh(verified.envelope, now=now)
        return verified

    def proof(self, subject: str, data: bytes, *, now: float) -> Verified:
        """Every check but the message's age and its nonce: size, token, signature, sender,
        subject binding and a timestamp not too far ahead.

        Keeps no state of its own (the token verifier caches what it verified), so callers
        may run it on several threads at once; libsodium releases the GIL while it checks
        the signature.

        Raises:
            SecurityError: the reason the message is refused.
        """
        if len(data) > self._max_bytes:
            raise SecurityError("oversized", f"{len(data)} bytes > {self._max_bytes}")
        sealed = self._codec.open(data)
        claims = self._tokens.verify(sealed.token, now=now)
        if not claims.key.verify(sealed.signature, sealed.envelope):
            raise SecurityError("bad_signature", f"token subject {claims.sub!r}")
        envelope = self._codec.envelope(sealed.envelope)
        if envelope.sender != claims.sub:
            raise SecurityError(
                "sender_mismatch", f"envelope says {envelope.sender!r}, token {claims.sub!r}"
            )
        if envelope.subject != subject:
            raise SecurityError(
                "wrong_subject", f"signed for {envelope.subject!r}, arrived on {subject!r}"
            )
        if envelope.ts - now > self._future_s:
            raise SecurityError("future", f"{envelope.ts - now:.1f}s in the future")
        return Verified(envelope, claims)

    def fresh(self, envelope: Envelope, *, now: float) -> None:
        """Refuse a message of `proof` that is too old or whose nonce was seen; record the
        nonce. Call in the order the messages arrived.

        Raises:
            SecurityError: ``stale`` or ``replay``.
        """
        age = now - envelope.ts
        if age > self._window_s:
            raise SecurityError("stale", f"{age:.1f}s old")
        if not self._nonces.check_and_add(envelope.nonce, ts=envelope.ts, now=now):
            raise SecurityError("replay", f"nonce {envelope.nonce.hex()} seen before")
