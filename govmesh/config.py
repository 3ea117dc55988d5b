"""Settings shared by every process of one deployment."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import msgspec
import yaml

from govmesh.errors import ConfigError, GovmeshError

__all__ = [
    "MAX_REPLICAS",
    "Clock",
    "Deployment",
    "key_prefix",
    "nats_servers",
    "public_url",
    "read_yaml_mapping",
    "utc_day",
]

MAX_REPLICAS: Final = 5
"""The most JetStream replicas a stream may have (nats-server's own limit)."""


def nats_servers(url: str) -> list[str]:
    """The server URLs in a NATS URL that names several, comma-separated
    (``tls://a:4222,tls://b:4222``): the members of a NATS cluster a client may connect to.

    Raises:
        ConfigError: an entry is empty.
    """
    servers = [part.strip() for part in url.split(",")]
    if not all(servers):
        raise ConfigError(f"NATS URL {url!r} has an empty entry; separate servers by one comma")
    return servers


def public_url(url: str) -> str:
    """``url`` with its password masked (``redis://user:***@host``), fit for a log, a
    report or an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def read_yaml_mapping(path: Path, *, what: str, error: type[GovmeshError]) -> dict[str, Any]:
    """The YAML mapping in ``path`` (a scenario, a price table).

    Raises:
        error: the file cannot be read, is not YAML, or is not a non-empty mapping; the
            message names the file and says it is a ``what``.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise error(f"{path}: a {what} is a non-empty mapping, got {type(data).__name__}")
    return data


def key_prefix(tenant: str) -> str:
    """The Redis key prefix of ``tenant``; every key govmesh writes starts with it."""
    return f"gm:{tenant}"


@functools.lru_cache(maxsize=4)
def _day_name(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))


def utc_day(now: float) -> str:
    """The UTC day of ``now`` (Unix seconds) as ``YYYY-MM-DD``: what keys of a day's spend
    are named by."""
    return _day_name(int(now // 86_400))


class Clock(msgspec.Struct, frozen=True, kw_only=True):
    """The deployment's clock for workflow time: timers and waits are due by it.

    Real time by default. A simulated clock runs `speed` times faster than real time from
    `origin` (a Unix time) on, the same in every process because it is computed from the
    wall clock, and across restarts too: a scenario can sleep seven simulated days in
    seconds. Security checks (token expiry, message timestamps) always use real time.

    Attributes:
        origin: the Unix time at which the simulated clock equals real time.
        speed: simulated seconds per real second; 1 is real time.
    """

    origin: float = 0.0
    speed: float = 1.0

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"clock speed must be positive, got {self.speed!r}")

    @property
    def simulated(self) -> bool:
        """Whether this clock runs faster than real time."""
        return self.speed != 1.0

    def now(self) -> float:
        """The current time on this clock (Unix seconds)."""
        real = time.time()
        return real if self.speed == 1.0 else self.origin + (real - self.origin) * self.speed

    def real_seconds(self, seconds: float) -> float:
        """How many real seconds `seconds` on this clock take."""
        return seconds / self.speed


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """Where a deployment's services are and whom its members trust.

    Passed to every actor so each can join the bus and verify its peers.

    Attributes:
        tenant: the tenant id; the second token of every subject.
        nats_url: the NATS server URL, or several comma-separated (a NATS cluster's).
        redis_url: the Redis-protocol server URL.
        audience: the token audience every member accepts.
        issuers: raw Ed25519 public keys of the trusted token issuers.
        tls: the NATS server requires mutual TLS; members connect with a client certificate.
        clock: workflow time (real by default; simulated in scenarios that say so).
        replicas: JetStream replicas of the streams the deployment creates: 1 on one
            nats-server, 3 (or 5) on a NATS cluster, so a node can fail without loss.
    """

    tenant: str
    nats_url: str
    redis_url: str
    audience: str
    issuers: tuple[bytes, ...]
    tls: bool = False
    clock: Clock = Clock()
    replicas: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise ConfigError(
                f"replicas must be between 1 and {MAX_REPLICAS}, got {self.replicas!r}"
            )

    @property
    def key_prefix(self) -> str:
        """The Redis key prefix for this tenant."""
        return key_prefix(self.tenant)

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        # A repr lands in logs and tracebacks; the Redis URL holds the Redis password.
        return [
            (name, public_url(self.redis_url) if name == "redis_url" else getattr(self, name))
            for name in self.__struct_fields__
        ]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.__rich_repr__())
        return f"{type(self).__name__}({fields})"
