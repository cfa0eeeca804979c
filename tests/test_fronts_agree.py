"""The router and a node answer the same request the same way.

Differential, against a real cluster (one node, so that every shard is on it; the router;
Kafka): each request goes once through the router, with an API key (tenant ``ta``), and
once straight to the node, the way the router sends it (the internal secret and tenant
``tb``). Two tenants, so the two requests address two different sessions with the same
id and never see each other's writes. The answers must agree: status, the JSON body
(times, and the shard and offset of a ``/meta``, aside: the two sessions live in
different shards),
and the headers that mean something. tests/test_fastpath.py does the same for the node's
two fronts (its fast front and its aiohttp app).

Known and intended differences, not generated here: the router refuses a session path
with ``.`` or ``..`` segments (400, so that no URL normaliser downstream turns it into an
internal endpoint), bodies over its own 16 MiB limit, and requests without a valid API key.
"""

from __future__ import annotations

import http.client
import uuid
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stickystate.local_cluster import LocalCluster

pytestmark = pytest.mark.kafka

KEY = "fronts-key-0123456789abcdef"
SECRET = "fronts-secret-0123456789"
VIA_ROUTER = {"Authorization": f"Bearer {KEY}"}
VIA_NODE = {"X-Stickystate-Internal": SECRET, "X-Stickystate-Tenant": "tb"}
COMPARED = ("etag", "x-stickystate-owner", "x-stickystate-epoch", "preference-applied", "idempotent-replayed",
            "retry-after", "allow", "content-type")
TIMES = ("expires_at", "created_at", "updated_at")


@pytest.fixture(scope="module")
def cluster_options() -> dict[str, Any]:
    return {"nodes": 1, "standbys": 0, "auth": "keys", "api_keys": f"{KEY}=ta", "internal_secret": SECRET}


class Peer:
    """One keep-alive connection to a front."""

    def __init__(self, url: str, credentials: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        self.credentials = credentials

    def call(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> dict[str, Any]:
        self.conn.request(method, path, body=body, headers={**headers, **self.credentials})
        resp = self.conn.getresponse()
        raw = resp.read()
        out: dict[str, Any] = {"status": resp.status}
        out["headers"] = {k.lower(): v for k, v in resp.getheaders() if k.lower() in COMPARED}
        out["shard header"] = resp.getheader("X-Stickystate-Shard") is not None
        out["body"] = _normal(orjson.loads(raw)) if raw and method != "HEAD" else raw
        return out


def _normal(doc: Any) -> Any:
    if isinstance(doc, dict):
        doc = {k: (type(v).__name__ if k in TIMES or k in ("shard", "last_offset") else _normal(v))
               for k, v in doc.items()}
        if isinstance(doc.get("events"), list):  # history: offsets are the partition's
            doc["events"] = [{k: v for k, v in e.items() if k not in ("offset", "at")} for e in doc["events"]]
            doc["next_after"] = type(doc.get("next_after")).__name__
    elif isinstance(doc, list):
        doc = [_normal(v) for v in doc]
    return doc


@pytest.fixture(scope="module")
def peers(cluster: LocalCluster) -> tuple[Peer, Peer]:
    return Peer(cluster.router_url, VIA_ROUTER), Peer(cluster.node_url("n1"), VIA_NODE)


def agree(peers: tuple[Peer, Peer], method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> dict[str, Any]:
    router, node = peers
    via_router = router.call(method, path, body, headers or {})
    via_node = node.call(method, path, body, headers or {})
    assert via_router == via_node, (method, path, body, headers)
    return via_router


def test_a_session_s_life_is_answered_alike(peers: tuple[Peer, Peer]) -> None:
    sid = "life-" + uuid.uuid4().hex[:8]
    base = f"/v1/sessions/{sid}"
    assert agree(peers, "POST", "/v1/sessions", orjson.dumps({"id": sid, "data": {"u": "ada"}}))["status"] == 201
    assert agree(peers, "GET", base)["body"]["data"] == {"u": "ada"}
    assert agree(peers, "HEAD", base)["status"] == 200
    assert agree(peers, "PATCH", base, b'{"mood": "ok"}', {"If-Match": '"1"'})["status"] == 200
    assert agree(peers, "PATCH", base, b'{"mood": "no"}', {"If-Match": '"1"'})["status"] == 412
    assert agree(peers, "POST", base + "/lists/m", b'{"items": [1, 2, 3], "max_len": 2}',
                 {"Prefer": "return=minimal", "Durability": "log"})["status"] == 200
    assert agree(peers, "PUT", base + "/keys/otp?ttl_s=30", b"7", {"Idempotency-Key": "k-1"})["status"] == 200
    replay = agree(peers, "PUT", base + "/keys/otp?ttl_s=30", b"7", {"Idempotency-Key": "k-1"})
    assert replay["headers"]["idempotent-replayed"] == "true"
    assert agree(peers, "PUT", base + "/keys/otp", b"8", {"Idempotency-Key": "k-1"})["status"] == 409
    assert agree(peers, "GET", base + "/meta")["status"] == 200
    assert agree(peers, "DELETE", base + "/keys/otp")["status"] == 200
    assert agree(peers, "DELETE", base + "/keys/otp")["status"] == 404
    assert agree(peers, "GET", base + "/history?limit=3")["status"] == 200
    assert agree(peers, "PUT", base, b'{"fresh": true}')["status"] == 200
    assert agree(peers, "DELETE", base)["status"] == 204
    assert agree(peers, "GET", base)["status"] == 404


@pytest.mark.parametrize("method,path,body,headers,status", [
    ("GET", "/v1/sessions/has%20space", None, {}, 400),
    ("PUT", "/v1/sessions/" + "x" * 129, b"{}", {}, 400),
    ("POST", "/v1/sessions", b'{"id": []}', {}, 400),
    ("POST", "/v1/sessions", b'{"id": null}', {}, 400),
    ("POST", "/v1/sessions", b'{"id": "x1"}', {"If-Match": "*"}, 400),
    ("POST", "/v1/sessions", b"null", {}, 400),
    ("POST", "/v1/sessions", b"{nope", {}, 400),
    ("PATCH", "/v1/sessions/nobody", b"{}", {"Durability": "LOG"}, 400),
    ("PATCH", "/v1/sessions/nobody", b"{}", {"If-Match": "abc"}, 400),
    ("PATCH", "/v1/sessions/nobody", b"{}", {"Idempotency-Key": "has space"}, 400),
    ("PUT", "/v1/sessions/nobody/keys/k?ttl_s=1_0", b"1", {}, 400),
    ("GET", "/v1/sessions/nobody/history?limit=0", None, {}, 400),
    ("PATCH", "/v1/sessions/nobody", b"{}", {}, 404),
    ("GET", "/v1/sessions/nobody/unknown", None, {}, 404),
    ("PUT", "/v1/sessions/nobody/meta", b"{}", {}, 405),
    ("POST", "/v1/sessions/nobody", b"{}", {}, 405),
    ("GET", "/v1/sessions", None, {}, 405),
])
def test_bad_requests_are_answered_alike(peers: tuple[Peer, Peer], method: str, path: str, body: bytes | None,
                                         headers: dict[str, str], status: int) -> None:
    got = agree(peers, method, path, body, headers)
    assert got["status"] == status and got["headers"]["content-type"] == "application/json", got


_IDS = st.sampled_from(["a", "b.c", "d:e", "x" * 128, "x" * 129, "bad%20id", "%41", "%C3%A9", "a%2Fb", "-"])
_BODIES = st.sampled_from([None, b"", b"{}", b"[]", b"null", b'{"items": [1]}', b'{"items": [1], "max_len": 1.0}',
                           b'{"a": {"b": 1}}', b"7", b"{"])
_HEADERS = st.dictionaries(st.sampled_from(["If-Match", "Durability", "Prefer", "Idempotency-Key"]),
                           st.sampled_from(["*", '"1"', "W/\"2\"", "log", "memory", "return=minimal", "k1", ""]),
                           max_size=3)
_SHAPES = st.sampled_from(["", "/meta", "/lists/m", "/keys/k", "/keys/k?ttl_s=5", "/history?after=-1", "/x"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "PUT", "PATCH", "POST", "DELETE"]), sid=_IDS, shape=_SHAPES, body=_BODIES,
       headers=_HEADERS)
def test_generated_requests_are_answered_alike(peers: tuple[Peer, Peer], method: str, sid: str, shape: str,
                                               body: bytes | None, headers: dict[str, str]) -> None:
    agree(peers, method, f"/v1/sessions/{sid}{shape}", body, headers)
