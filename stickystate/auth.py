"""API keys, tenants and per-tenant rate limits, pure (the clock is passed in). Shared by
the router and the nodes: both authenticate clients the same way.

Keys come from a file (one ``key tenant`` pair per line, ``#`` comments) or from
``STICKYSTATE_API_KEYS`` (``key=tenant,key2=tenant2``), never from the command line
(``stickystate/credentials.py`` reads them). A request's tenant namespaces
every session id it names: the node stores ``<tenant>:<id>``, so one tenant can never
name another's session, whatever id it chooses (tenant names contain no ``:``).

``Gate`` is what a server checks on every request but ``/livez``, ``/readyz`` and
``/metrics``: the key (-> tenant), then the tenant's token bucket. One per process,
shared by its two fronts (the httptools front for session requests, the aiohttp app for
the rest), so a tenant has one bucket whatever it asks for. The router checks every
client request; a node checks the requests of clients that talk to it directly (the
router's own requests carry the internal secret instead, node/access.py).
"""

from __future__ import annotations

import hmac
import math
import re
from dataclasses import dataclass, field

TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")


class AuthConfigError(ValueError):
    pass


def parse_keys(text: str, *, sep: str) -> dict[str, str]:
    """``key tenant`` lines (sep=" ") or ``key=tenant,...`` (sep="=") -> {key: tenant}."""
    keys: dict[str, str] = {}
    items = text.splitlines() if sep == " " else text.split(",")
    for raw in items:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1) if sep == " " else line.split("=", 1)
        if len(parts) != 2:
            raise AuthConfigError(f"bad API key entry {line[:8]!r}...: expected key{sep}tenant")
        key, tenant = parts[0].strip(), parts[1].strip()
        if len(key) < 16:
            raise AuthConfigError(f"API key for tenant {tenant!r} is shorter than 16 characters")
        if not TENANT_RE.fullmatch(tenant):
            raise AuthConfigError(f"tenant {tenant!r} must be 1-32 characters of [A-Za-z0-9._-]")
        keys[key] = tenant
    return keys


@dataclass
class KeyRing:
    keys: dict[str, str]
    _encoded: list[tuple[bytes, str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._encoded = [(key.encode(), tenant) for key, tenant in self.keys.items()]

    def tenant_of(self, presented: str | None) -> str | None:
        """Constant-time comparison against every key (no early exit on a prefix match)."""
        if not presented:
            return None
        # surrogateescape: header bytes that are not UTF-8 compare unequal instead of raising
        raw = presented.encode("utf-8", "surrogateescape")
        found = None
        for key, tenant in self._encoded:
            if hmac.compare_digest(key, raw):
                found = tenant
        return found


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float = -1.0
    last: float = 0.0

    def take(self, now: float) -> float:
        """0.0 if allowed, else the seconds to wait for a token."""
        if self.tokens < 0:
            self.tokens, self.last = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate_per_s)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


@dataclass
class RateLimiter:
    rate_per_s: float
    burst: float
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def check(self, tenant: str, now: float) -> float:
        if self.rate_per_s <= 0:
            return 0.0
        bucket = self.buckets.get(tenant)
        if bucket is None:
            bucket = self.buckets[tenant] = TokenBucket(self.rate_per_s, self.burst)
        return bucket.take(now)


@dataclass(frozen=True)
class Refusal:
    """An answer instead of forwarding: status, error code, message, extra headers."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


class Gate:
    """API key -> tenant, then the tenant's rate limit (open mode: no tenant, no limit)."""

    def __init__(self, auth: str, keys: dict[str, str], rate_limit_rps: float, rate_limit_burst: float) -> None:
        self.auth = auth
        self.keys = KeyRing(dict(keys))
        self.limiter = RateLimiter(rate_limit_rps, rate_limit_burst)

    def admit(self, authorization: str | None, api_key: str | None, now: float) -> tuple[str | None, Refusal | None]:
        """(tenant, None) to go ahead, or (tenant or None, the refusal)."""
        if self.auth != "keys":
            return None, None
        tenant = self.keys.tenant_of(bearer(authorization) or api_key)
        if tenant is None:
            return None, Refusal(401, code="unauthorized", message="a valid API key is required "
                                 "(Authorization: Bearer <key> or X-Api-Key)", headers=(("WWW-Authenticate", "Bearer"),))
        wait = self.limiter.check(tenant, now)
        if wait > 0:
            return tenant, Refusal(429, code="rate_limited", message="request rate limit of this tenant exceeded",
                                   headers=(("Retry-After", str(max(1, math.ceil(wait)))),))
        return tenant, None
