"""Agent-ID tokens: short-lived EdDSA JWTs that name an agent, its role and what it may ask for."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from typing import Any, Final

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from govmesh.config import Deployment
from govmesh.errors import SecurityError
from govmesh.identity._ca import ClientCert
from govmesh.identity._keys import SigningKey, VerifyKey

__all__ = [
    "DEFAULT_TOKEN_TTL_S",
    "Claims",
    "Identity",
    "Issuer",
    "TokenVerifier",
]

DEFAULT_TOKEN_TTL_S: Final = 600.0
TOKEN_TYPE: Final = "agent-id+jwt"
_CLOCK_SKEW_S: Final = 5.0


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Claims(msgspec.Struct, frozen=True, kw_only=True):
    """The verified claims of an Agent-ID token.

    Attributes:
        budget_usd: the agent's budget authority: what governance may allow it in all, per
            UTC day, across its workflows (one intent above it is refused outright).
    """

    sub: str
    role: str
    capabilities: tuple[str, ...] = ()
    budget_usd: float = 0.0
    aud: str
    iss: str
    iat: float
    nbf: float
    exp: float
    jti: str
    key: VerifyKey

    def may(self, capability: str) -> bool:
        """Return whether the token grants ``capability`` (a tool name, or ``*``)."""
        return capability in self.capabilities or "*" in self.capabilities

    def require(self, capability: str) -> None:
        """Raise `SecurityError` ``capability`` unless the token grants ``capability``."""
        if not self.may(capability):
            raise SecurityError(
                "capability", f"token of {self.sub!r} does not grant {capability!r}"
            )


class Identity:
    """What one agent or platform actor holds: its id, role, private key, current token and,
    on a mutual-TLS bus, its client certificate."""

    __slots__ = ("agent_id", "cert", "key", "role", "token")

    def __init__(
        self,
        *,
        agent_id: str,
        role: str,
        key: SigningKey,
        token: str,
        cert: ClientCert | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.role = role
        self.key = key
        self.token = token
        self.cert = cert

    def __reduce__(self) -> tuple[Any, ...]:
        return (_make_identity, (self.agent_id, self.role, self.key.raw, self.token, self.cert))

    def __repr__(self) -> str:
        return f"Identity(agent_id={self.agent_id!r}, role={self.role!r})"


def _make_identity(
    agent_id: str, role: str, raw: bytes, token: str, cert: ClientCert | None
) -> Identity:
    return Identity(agent_id=agent_id, role=role, key=SigningKey(raw), token=token, cert=cert)


class Issuer:
    """The deployment's token issuer: signs Agent-ID JWTs with its own Ed25519 key.

    Args:
        name: the ``iss`` claim.
        audience: the ``aud`` claim every token carries; receivers accept only this audience.
        key: the issuer's signing key; a new one is generated when omitted.
    """

    def __init__(self, *, name: str, audience: str, key: SigningKey | None = None) -> None:
        self.name = name
        self.audience = audience
        self.key = key or SigningKey()

    @property
    def public_key(self) -> bytes:
        """The issuer's raw public key, which every verifier trusts."""
        return self.key.public.raw

    def deployment(
        self, *, tenant: str, nats_url: str, redis_url: str, tls: bool = False, replicas: int = 1
    ) -> Deployment:
        """A deployment of ``tenant`` whose members trust this issuer (and only it); its
        streams get `replicas` JetStream replicas."""
        return Deployment(
            tenant=tenant,
            nats_url=nats_url,
            redis_url=redis_url,
            audience=self.audience,
            issuers=(self.public_key,),
            tls=tls,
            replicas=replicas,
        )

    def issue(
        self,
        *,
        sub: str,
        role: str,
        key: VerifyKey,
        capabilities: tuple[str, ...] = (),
        budget_usd: float = 0.0,
        ttl_s: float = DEFAULT_TOKEN_TTL_S,
        now: float | None = None,
    ) -> str:
        """Issue a token for ``sub`` bound (``cnf``) to the agent's public ``key``."""
        if not 0 < ttl_s <= 24 * 3600:
            raise ValueError(f"token ttl must be in (0, 86400] seconds, got {ttl_s!r}")
        now = time.time() if now is None else now
        payload = {
            "sub": sub,
            "role": role,
            "capabilities": list(capabilities),
            "budget_usd": budget_usd,
            "aud": self.audience,
            "iss": self.name,
            "iat": now,
            "nbf": now,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
            "cnf": {"kty": "OKP", "crv": "Ed25519", "x": _b64(key.raw)},
        }
        return jwt.encode(
            payload, self.key.private_key, algorithm="EdDSA", headers={"typ": TOKEN_TYPE}
        )

    def identity(
        self,
        agent_id: str,
        role: str,
        *,
        capabilities: tuple[str, ...] = (),
        budget_usd: float = 0.0,
        ttl_s: float = DEFAULT_TOKEN_TTL_S,
    ) -> Identity:
        """Create a fresh key pair for ``agent_id`` and issue its token."""
        key = SigningKey()
        token = self.issue(
            sub=agent_id,
            role=role,
            key=key.public,
            capabilities=capabilities,
            budget_usd=budget_usd,
            ttl_s=ttl_s,
        )
        return Identity(agent_id=agent_id, role=role, key=key, token=token)


class TokenVerifier:
    """Verifies Agent-ID tokens once each and caches the claims until the token expires.

    Args:
        issuers: raw public keys of the issuers this receiver trusts.
        audience: the only ``aud`` accepted.
        max_cache: cache entries kept; expired entries are dropped first.
    """

    def __init__(self, *, issuers: list[bytes], audience: str, max_cache: int = 10_000) -> None:
        if not issuers:
            raise ValueError("a token verifier needs at least one trusted issuer key")
        self._issuers = [Ed25519PublicKey.from_public_bytes(raw) for raw in issuers]
        self._audience = audience
        self._cache: dict[str, Claims] = {}
        self._max_cache = max_cache
        # Readers of the event stream verify on several threads (`StreamVerifier`); a hit is
        # one atomic dict read, so only a miss, which may evict, takes the lock.
        self._filling = threading.Lock()

    def verify(self, token: str, *, now: float | None = None) -> Claims:
        """Return the claims of ``token``, or raise `SecurityError` saying why it is refused."""
        now = time.time() if now is None else now
        claims = self._cache.get(token)
        if claims is None:
            claims = self._decode(token)
            with self._filling:
                if len(self._cache) >= self._max_cache:
                    self._evict(now)
                self._cache[token] = claims
        if now + _CLOCK_SKEW_S < claims.nbf:
            raise SecurityError("token_not_yet_valid", f"token for {claims.sub!r}")
        if now >= claims.exp:
            raise SecurityError("token_expired", f"token for {claims.sub!r}")
        return claims

    def _evict(self, now: float) -> None:
        for token in [t for t, c in self._cache.items() if c.exp <= now]:
            del self._cache[token]
        while len(self._cache) >= self._max_cache:
            del self._cache[next(iter(self._cache))]

    def _decode(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise SecurityError("token_malformed", str(exc)) from None
        if header.get("typ") != TOKEN_TYPE or header.get("alg") != "EdDSA":
            raise SecurityError("token_malformed", f"unexpected token header {header!r}")
        payload: dict[str, Any] | None = None
        for issuer in self._issuers:
            try:
                payload = jwt.decode(
                    token,
                    issuer,
                    algorithms=["EdDSA"],
                    audience=self._audience,
                    # Time claims are checked by `verify` on every use, since the cached
                    # claims outlive this single decode.
                    options={
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "require": ["sub", "aud", "exp", "nbf", "iat", "jti", "cnf", "iss"],
                    },
                )
                break
            except jwt.InvalidAudienceError:
                raise SecurityError("token_wrong_audience", repr(header)) from None
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise SecurityError("token_malformed", str(exc)) from None
        if payload is None:
            raise SecurityError("token_unknown_issuer", "no trusted issuer signed this token")
        try:
            cnf = payload["cnf"]
            return Claims(
                sub=str(payload["sub"]),
                role=str(payload.get("role", "")),
                capabilities=tuple(str(c) for c in payload.get("capabilities", ())),
                budget_usd=float(payload.get("budget_usd", 0.0)),
                aud=str(payload["aud"]),
                iss=str(payload["iss"]),
                iat=float(payload["iat"]),
                nbf=float(payload["nbf"]),
                exp=float(payload["exp"]),
                jti=str(payload["jti"]),
                key=VerifyKey(_unb64(cnf["x"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecurityError("token_malformed", f"bad claim: {exc}") from None
