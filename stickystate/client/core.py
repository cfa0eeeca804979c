"""The client's logic, without I/O (sans-I/O, as h11): what to send, where to send it,
what an answer means, and whether and when to try again. ``Client`` (sync, urllib3) and
``AsyncClient`` (aiohttp) only move the bytes and sleep; every decision is made here, once.

Placement. A router's ``GET /v1/cluster`` gives the shard -> owner map, the nodes' URLs,
the partition count and the caller's tenant (``ClusterMap``). The nodes store a tenant's
session ``sid`` as ``<tenant>:<sid>`` (node/handlers.py), and its shard is
``protocol.shard_of`` of that stored id, so the client computes exactly the shard the
router computes and sends the request to the owner's URL.

One logical call (``Call``) may take several attempts (``Attempts``):

- a 421 (not the owner): try the owner the answer names (``X-Stickystate-Owner``) at once,
  and refresh the map;
- a connection error, a timeout, or a 503 from a node: refresh the map, mark the node as
  suspect until the map's generation changes, and retry after an exponential backoff
  with jitter, on the owner the new map names, or on a router if that is the node that
  just failed (the router waits for the failover and retries itself);
- a connection error or timeout at a router: the next router URL;
- attempts and total time are bounded (``RetryPolicy``); past them the last error is raised.

Every write carries one ``Idempotency-Key`` for all its attempts (made here when the
caller gives none), so a write retried after its owner died applies once.
"""

from __future__ import annotations

import os
import random
from collections import Counter
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson

from stickystate.client.errors import BadRequest, TransportError, error_of
from stickystate.protocol import (API_KEY_HEADER, AUTHORIZATION_HEADER, CLIENT_KEY_PREFIX, DURABILITY_HEADER,
                                  IDEMPOTENCY_KEY_HEADER, IDEMPOTENCY_KEY_MESSAGE, IDEMPOTENCY_KEY_RE, IF_MATCH_HEADER,
                                  JSON_CONTENT_TYPE, KEY_RE, LAST_EVENT_ID_HEADER, OWNER_HEADER, PREFER_HEADER, REQUEST_ID_HEADER,
                                  RETRY_KEY_PREFIXES, SESSION_ID_MESSAGE, SESSION_ID_RE, key_message, shard_of)

__all__ = ["Attempts", "Call", "ClientCore", "ClusterMap", "RetryPolicy", "Step", "Target"]

URL_ENV = "STICKYSTATE_URL"
API_KEY_ENV = "STICKYSTATE_API_KEY"
DURABILITIES = ("memory", "log")
USER_AGENT = "stickystate-client/0.1"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long one call is tried. Backoff before retry ``n`` (0-based) is
    ``d/2 + uniform(0, d/2)`` with ``d = min(backoff_max_s, backoff_base_s * 2**n)``
    ("equal jitter": never zero, never in lockstep with other clients)."""

    max_attempts: int = 8
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    total_timeout_s: float = 30.0  # one call, all its attempts and waits
    request_timeout_s: float = 10.0  # one attempt
    max_update_attempts: int = 16  # update(): read-modify-write rounds lost to a 412

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_update_attempts < 1:
            raise ValueError("max_attempts and max_update_attempts must be >= 1")
        if min(self.backoff_base_s, self.backoff_max_s) < 0 or self.total_timeout_s <= 0 \
                or self.request_timeout_s <= 0:
            raise ValueError("times must be positive")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        d = min(self.backoff_max_s, self.backoff_base_s * (2 ** min(retry, 30)))
        return d / 2 + rng.uniform(0, d / 2)

    def update_pause_s(self, lost: int, rng: random.Random) -> float:
        """update(): the wait before the next read-modify-write round after ``lost`` rounds
        lost to a 412. None after the first (someone wrote once); then the backoff above,
        so that writers racing on one session spread out instead of colliding again in
        lockstep (three threads without it could each lose 16 rounds in a row)."""
        return 0.0 if lost <= 1 else self.backoff_s(lost - 2, rng)


@dataclass(frozen=True)
class ClusterMap:
    """A router's ``/v1/cluster``, as placement needs it."""

    partitions: int
    generation: int
    tenant: str | None
    urls: Mapping[str, str]  # node id -> base URL
    owners: Mapping[int, str]  # shard -> node id

    @classmethod
    def from_view(cls, doc: Mapping[str, Any]) -> ClusterMap:
        try:
            return cls(partitions=int(doc["partitions"]), generation=int(doc.get("generation", 0)),
                       tenant=doc.get("tenant") or None,
                       urls={str(n["id"]): str(n["url"]).rstrip("/") for n in doc["nodes"]},
                       owners={int(s): str(o) for s, o in doc["shards"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise TransportError(f"the router's /v1/cluster answer is not a cluster map: {exc!r}") from None

    def stored_id(self, sid: str) -> str:
        """The id as the nodes store it (the tenant's namespace), as node/handlers.py makes it."""
        return f"{self.tenant}:{sid}" if self.tenant else sid

    def shard(self, sid: str) -> int:
        return shard_of(self.stored_id(sid), self.partitions)

    def owner(self, sid: str) -> str | None:
        return self.owners.get(self.shard(sid))


@dataclass
class Call:
    """One logical request: the same bytes for every attempt."""

    method: str
    path: str  # with the query string
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    sid: str | None = None  # placement: the session it is about (None: a router's own endpoint)
    write: bool = False


@dataclass(frozen=True)
class Target:
    base: str  # base URL
    node: str | None  # node id, or None for a router


@dataclass
class Step:
    """What to do after an attempt: return ``value``, raise ``error``, or wait ``delay_s``
    (refreshing the map first if ``refresh``) and try again."""

    value: Any = None
    error: BaseException | None = None
    done: bool = False
    delay_s: float = 0.0
    refresh: bool = False


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]  # case-insensitive as the transport gives them
    body: bytes


def _decode(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("Retry-After")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


class ClientCore:
    """State shared by every call of one client: routers, the cluster map, suspects, the
    default options. Not thread-safe by locks, but every update replaces whole values."""

    def __init__(self, urls: str | Sequence[str] | None, api_key: str | None, *, direct: bool,
                 durability: str | None, minimal: bool, retry: RetryPolicy, map_max_age_s: float,
                 rng: random.Random | None = None) -> None:
        if urls is None:
            urls = os.environ.get(URL_ENV, "")
        if isinstance(urls, str):
            urls = [u for u in (p.strip() for p in urls.split(",")) if u]
        self.routers = [u.rstrip("/") for u in urls]
        if not self.routers:
            raise ValueError(f"give one or more router URLs (or set {URL_ENV})")
        for u in self.routers:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"router URL {u!r} must start with http:// or https://")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        if durability is not None and durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}")
        self.direct = direct
        self.durability = durability
        self.minimal = minimal
        self.retry = retry
        self.map_max_age_s = map_max_age_s
        self.rng = rng or random.Random()
        self.router_index = 0
        self.map: ClusterMap | None = None
        self.map_fetched_at = float("-inf")
        self.suspects: set[str] = set()  # nodes that failed, until the map's generation moves
        # what happened so far: not_owner (421s followed), unavailable (5xx retried),
        # transport_errors (no answer), map_refreshes
        self.counts: Counter[str] = Counter()
        self.base_headers = {"User-Agent": USER_AGENT, "Accept": JSON_CONTENT_TYPE}
        if self.api_key:
            self.base_headers[AUTHORIZATION_HEADER] = f"Bearer {self.api_key}"

    # -- routers and the map -------------------------------------------------------------
    @property
    def router(self) -> str:
        return self.routers[self.router_index % len(self.routers)]

    def router_failed(self, base: str) -> None:
        if self.router == base:
            self.router_index = (self.router_index + 1) % len(self.routers)

    def map_call(self) -> Call:
        return Call("GET", "/v1/cluster", headers=dict(self.base_headers))

    def set_map(self, doc: Any, now: float) -> ClusterMap:
        if not isinstance(doc, Mapping):
            raise TransportError("the router's /v1/cluster answer is not a JSON object")
        new = ClusterMap.from_view(doc)
        self.counts["map_refreshes"] += 1
        if self.map is None or new.generation != self.map.generation:
            self.suspects.clear()
        self.map = new
        self.map_fetched_at = now
        return new

    def map_answered(self, base: str, response: Response, now: float) -> bool:
        """A router's answer to ``map_call``: True when the map was taken from it; False:
        ask the next router; a refused API key raises (no router will take it)."""
        if response.status == 200:
            try:
                self.set_map(_decode(response.body), now)
                return True
            except TransportError:
                pass
        elif response.status == 401:
            raise error_of(401, _decode(response.body), response.headers.get(REQUEST_ID_HEADER))
        self.router_failed(base)
        return False

    def map_wanted(self, now: float) -> bool:
        """Before a session call: is there no map yet, or is it older than map_max_age_s?"""
        return self.direct and (self.map is None or now - self.map_fetched_at > self.map_max_age_s)

    def map_stale(self, now: float, min_interval_s: float = 0.05) -> bool:
        """After a 421 or a failure: refresh, unless a refresh happened just now."""
        return self.direct and now - self.map_fetched_at >= min_interval_s

    # -- building calls --------------------------------------------------------------------
    def session_call(self, method: str, path: str, sid: str, *, body: Any = None, raw: bytes | None = None,
                     query: Mapping[str, Any] | None = None, write: bool = False, durability: str | None = None,
                     if_match: int | str | None = None, minimal: bool | None = None,
                     idempotency_key: str | None = None) -> Call:
        check_id(sid)
        headers = dict(self.base_headers)
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        if data is not None:
            headers["Content-Type"] = JSON_CONTENT_TYPE
        if write:
            durability = durability if durability is not None else self.durability
            if durability is not None:
                if durability not in DURABILITIES:
                    raise ValueError(f"durability must be one of {DURABILITIES}")
                headers[DURABILITY_HEADER] = durability
            if if_match is not None:
                headers[IF_MATCH_HEADER] = "*" if if_match == "*" else f'"{int(if_match)}"'
            if minimal if minimal is not None else self.minimal:
                headers[PREFER_HEADER] = "return=minimal"
            key = idempotency_key if idempotency_key is not None else new_idempotency_key()
            if idempotency_key is not None and (not IDEMPOTENCY_KEY_RE.fullmatch(key)
                                                or key.startswith(RETRY_KEY_PREFIXES)):
                raise ValueError(f"{IDEMPOTENCY_KEY_MESSAGE}, not starting with {' or '.join(RETRY_KEY_PREFIXES)}")
            headers[IDEMPOTENCY_KEY_HEADER] = key
        q = {k: v for k, v in (query or {}).items() if v is not None}
        return Call(method, path + ("?" + urlencode(q) if q else ""), data, headers, sid, write)

    # -- the API's calls (the same for both clients) -------------------------------------------
    def create(self, sid: str | None, data: Mapping[str, Any] | None, ttl_s: float | None, **opts: Any) -> Call:
        sid = sid if sid is not None else new_session_id()
        doc: dict[str, Any] = {"id": sid, "data": dict(data or {})}
        if ttl_s is not None:
            doc["ttl_s"] = ttl_s
        return self.session_call("POST", "/v1/sessions", sid, body=doc, write=True, **opts)

    def get(self, sid: str) -> Call:
        return self.session_call("GET", f"/v1/sessions/{sid}", sid)

    def meta(self, sid: str) -> Call:
        return self.session_call("GET", f"/v1/sessions/{sid}/meta", sid)

    def history(self, sid: str, after: int, limit: int) -> Call:
        return self.session_call("GET", f"/v1/sessions/{sid}/history", sid, query={"after": after, "limit": limit})

    def replace(self, sid: str, data: Mapping[str, Any], ttl_s: float | None, **opts: Any) -> Call:
        return self.session_call("PUT", f"/v1/sessions/{sid}", sid, body=dict(data), query={"ttl_s": ttl_s},
                                 write=True, **opts)

    def patch(self, sid: str, patch: Mapping[str, Any], **opts: Any) -> Call:
        return self.session_call("PATCH", f"/v1/sessions/{sid}", sid, body=dict(patch), write=True, **opts)

    def append(self, sid: str, field: str, items: Sequence[Any], max_len: int | None, **opts: Any) -> Call:
        check_key(field, "field")
        doc: dict[str, Any] = {"items": list(items)}
        if max_len is not None:
            doc["max_len"] = max_len
        return self.session_call("POST", f"/v1/sessions/{sid}/lists/{field}", sid, body=doc, write=True, **opts)

    def set_key(self, sid: str, key: str, value: Any, ttl_s: float | None, **opts: Any) -> Call:
        check_key(key)
        return self.session_call("PUT", f"/v1/sessions/{sid}/keys/{key}", sid, raw=orjson.dumps(value),
                                 query={"ttl_s": ttl_s}, write=True, **opts)

    def delete_key(self, sid: str, key: str, **opts: Any) -> Call:
        check_key(key)
        return self.session_call("DELETE", f"/v1/sessions/{sid}/keys/{key}", sid, write=True, **opts)

    def delete(self, sid: str, **opts: Any) -> Call:
        return self.session_call("DELETE", f"/v1/sessions/{sid}", sid, write=True, **opts)

    def watch(self, sid: str, last_event_id: str | None, changes_only: bool) -> Call:
        """Open (or resume, after ``last_event_id``) a watch: stickystate/client/watch.py."""
        call = self.session_call("GET", f"/v1/sessions/{sid}/watch", sid,
                                 query={"changes_only": 1 if changes_only else None})
        call.headers["Accept"] = "text/event-stream"
        if last_event_id:
            call.headers[LAST_EVENT_ID_HEADER] = last_event_id
        return call

    # -- one call's attempts ------------------------------------------------------------------
    def attempts(self, call: Call, now: float) -> Attempts:
        return Attempts(self, call, now)

    def result(self, response: Response) -> Any:
        """A successful answer's JSON (None for 204)."""
        return _decode(response.body)


def check_id(sid: str) -> None:
    if not isinstance(sid, str) or not SESSION_ID_RE.fullmatch(sid):
        raise BadRequest(400, "bad_id", SESSION_ID_MESSAGE)
    if sid in (".", ".."):  # a path step to every URL normaliser on the way: the router refuses them too
        raise BadRequest(400, "bad_id", "a session id may not be '.' or '..'")


def check_key(name: str, what: str = "key") -> None:
    if not isinstance(name, str) or not KEY_RE.fullmatch(name):
        raise BadRequest(400, "bad_key" if what == "key" else "bad_field", key_message(what))


# Idempotency-Keys need to be unique, not secret: 128 bits from a PRNG seeded from
# os.urandom (secrets.token_urlsafe's syscall per write was the costliest line of the core).
_KEYS = random.Random()


def new_idempotency_key() -> str:
    return f"{CLIENT_KEY_PREFIX}{_KEYS.getrandbits(128):032x}"


def new_session_id() -> str:
    """As the router makes one (128 bits); made here so that the client knows its shard."""
    return secrets.token_urlsafe(16)


class Attempts:
    """The attempts of one call: where the next one goes, and what an outcome means."""

    def __init__(self, core: ClientCore, call: Call, now: float) -> None:
        self.core = core
        self.call = call
        self.deadline = now + core.retry.total_timeout_s
        self.count = 0
        self.retries = 0
        self.hint: str | None = None  # the owner a 421 named
        self.avoid: set[str] = set()  # nodes that failed during this call
        self.last: BaseException | None = None

    def target(self) -> Target:
        core = self.core
        m = core.map
        if core.direct and m is not None and self.call.sid is not None:
            owner = self.hint if self.hint is not None else m.owner(self.call.sid)
            if owner is not None and owner not in self.avoid and owner not in core.suspects and owner in m.urls:
                return Target(m.urls[owner], owner)
        return Target(core.router, None)

    def timeout_s(self, now: float) -> float:
        return max(0.001, min(self.core.retry.request_timeout_s, self.deadline - now))

    def sent(self) -> None:
        self.count += 1

    def answered(self, target: Target, response: Response, now: float) -> Step:
        status = response.status
        if status < 400:
            return Step(value=response, done=True)
        body = _decode(response.body)
        error = error_of(status, body, response.headers.get(REQUEST_ID_HEADER), _retry_after(response.headers))
        if status == 421:
            self.core.counts["not_owner"] += 1
            owner = response.headers.get(OWNER_HEADER) or (body.get("owner") if isinstance(body, dict) else None)
            self.hint = str(owner) if owner and owner != target.node else None
            # the owner it names: at once; else a moment for the cluster to settle
            return self._again(error, now, refresh=True, backoff=self.hint is None)
        if status in (502, 503, 504):
            self.core.counts["unavailable"] += 1
            if target.node is not None:
                self.avoid.add(target.node)
            self.hint = None
            return self._again(error, now, refresh=True, backoff=True, at_least_s=error.retry_after or 0.0)
        return Step(error=error, done=True)

    def failed(self, target: Target, exc: BaseException, now: float) -> Step:
        """No answer from ``target`` (connection refused or reset, timeout)."""
        self.core.counts["transport_errors"] += 1
        error = TransportError(f"{self.call.method} {self.call.path} via {target.base}: {exc!r}")
        error.__cause__ = exc
        self.hint = None
        if target.node is None:
            self.core.router_failed(target.base)
            return self._again(error, now, refresh=False, backoff=self.retries >= len(self.core.routers) - 1)
        self.avoid.add(target.node)
        self.core.suspects.add(target.node)
        return self._again(error, now, refresh=True, backoff=True)

    def _again(self, error: BaseException, now: float, *, refresh: bool, backoff: bool,
               at_least_s: float = 0.0) -> Step:
        self.last = error
        delay = max(at_least_s, self.core.retry.backoff_s(self.retries, self.core.rng)) if backoff else 0.0
        self.retries += 1
        if self.count >= self.core.retry.max_attempts or now + delay >= self.deadline:
            return Step(error=error, done=True)
        return Step(delay_s=delay, refresh=refresh and self.core.map_stale(now))


def raise_for(step: Step) -> Any:
    if step.error is not None:
        raise step.error
    return step.value
