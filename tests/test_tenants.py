"""Access control: API keys bind tenants; tenants cannot reach each other's sessions;
nodes refuse clients without the internal secret."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from stickystate.local_cluster import LocalCluster
from tests.helpers import Api

pytestmark = pytest.mark.kafka

KEY_A = "key-tenant-a-0123456789"
KEY_B = "key-tenant-b-0123456789"
SECRET = "internal-secret-0123456789"
SID = "same-id"


@pytest.fixture(scope="module")
def cluster_options() -> dict:
    return {"auth": "keys", "api_keys": f"{KEY_A}=ta,{KEY_B}=tb", "internal_secret": SECRET}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def as_tenant(api: Api, key: str):  # type: ignore[no-untyped-def]
    async def call(method: str, path: str, body: object = None, headers: dict | None = None):  # type: ignore[no-untyped-def]
        return await api.call(method, path, body, headers={"Authorization": f"Bearer {key}", **(headers or {})})
    return call


async def test_tenants_with_the_same_id_never_see_each_other(http: aiohttp.ClientSession, cluster: LocalCluster) -> None:
    api = Api(http, cluster.router_url)
    a, b = as_tenant(api, KEY_A), as_tenant(api, KEY_B)
    assert (await a("POST", "/v1/sessions", {"id": SID, "data": {"owner": "A", "secret": 1}},
                    {"Durability": "log"}))[0] == 201
    status, body, _ = await b("POST", "/v1/sessions", {"id": SID, "data": {"owner": "B"}}, {"Durability": "log"})
    assert status == 201 and body["id"] == SID  # no conflict: another namespace

    # B reads, writes, deletes "same-id": only ever its own.
    assert (await b("GET", f"/v1/sessions/{SID}"))[1]["data"] == {"owner": "B"}
    assert (await b("PATCH", f"/v1/sessions/{SID}", {"owner": "B2"}))[0] == 200
    assert (await b("POST", f"/v1/sessions/{SID}/lists/x", {"items": [1]}))[0] == 200
    assert (await b("PUT", f"/v1/sessions/{SID}/keys/k", 5))[0] == 200
    status, minimal, _ = await b("PUT", f"/v1/sessions/{SID}/keys/k", 5, {"Prefer": "return=minimal"})
    assert status == 200 and set(minimal) == {"version", "expires_at"} and minimal["version"] == 5
    status, minimal, _ = await b("POST", "/v1/sessions", {"id": f"{SID}-2"}, {"Prefer": "return=minimal"})
    assert status == 201 and minimal["id"] == f"{SID}-2"  # a minimal create's answer hides the namespace too
    status, history_b, _ = await b("GET", f"/v1/sessions/{SID}/history")
    assert status == 200 and [e["op"] for e in history_b["events"]] == ["create", "patch", "append", "set_key",
                                                                        "set_key"]
    assert all(e["sid"] == SID and "A" not in str(e.get("data")) for e in history_b["events"])
    status, meta_b, _ = await b("GET", f"/v1/sessions/{SID}/meta")
    assert status == 200 and meta_b["version"] == 5 and meta_b["id"] == SID
    assert (await b("DELETE", f"/v1/sessions/{SID}"))[0] == 204

    # A's session is untouched by all of that.
    status, body, _ = await a("GET", f"/v1/sessions/{SID}")
    assert status == 200 and body == {**body, "id": SID, "version": 1, "data": {"owner": "A", "secret": 1}}
    status, history_a, _ = await a("GET", f"/v1/sessions/{SID}/history")
    assert [e["op"] for e in history_a["events"]] == ["create"]
    assert (await a("GET", f"/v1/sessions/{SID}/meta"))[1]["version"] == 1

    # Guessing the internal name does not help: it is namespaced again.
    assert (await b("GET", f"/v1/sessions/ta:{SID}"))[0] == 404
    assert (await b("GET", f"/v1/sessions/ta:{SID}/history"))[1]["events"] == []


async def test_requests_without_a_valid_key_get_401(http: aiohttp.ClientSession, cluster: LocalCluster) -> None:
    api = Api(http, cluster.router_url)
    for method, path, body in (("GET", f"/v1/sessions/{SID}", None), ("POST", "/v1/sessions", {"id": "x"}),
                               ("GET", "/v1/cluster", None), ("DELETE", f"/v1/sessions/{SID}", None)):
        status, err, headers = await api.call(method, path, body)
        assert status == 401 and err["error"] == "unauthorized", (method, path)
        status, err, _ = await api.call(method, path, body, headers={"Authorization": "Bearer not-a-key-000000000"})
        assert status == 401, (method, path)
    assert (await api.call("GET", "/livez"))[0] == 200
    # Nothing was created by the refused POST.
    assert (await as_tenant(api, KEY_A)("GET", "/v1/sessions/x"))[0] == 404


async def test_direct_node_access_needs_the_internal_secret(http: aiohttp.ClientSession, cluster: LocalCluster) -> None:
    api = Api(http, cluster.router_url)
    status, _, headers = await as_tenant(api, KEY_A)("POST", "/v1/sessions", {"id": "direct", "data": {"v": 1}})
    assert status == 201
    owner = headers["X-Stickystate-Owner"]
    node = Api(http, cluster.node_url(owner))
    for method, path in (("GET", "/v1/sessions/ta:direct"), ("GET", "/v1/sessions/direct"),
                         ("PATCH", "/v1/sessions/ta:direct"), ("GET", "/internal/status"),
                         ("POST", "/internal/assign")):
        status, body, _ = await node.call(method, path, {"v": 2} if method != "GET" else None,
                                          headers={"X-Stickystate-Tenant": "ta"})
        assert status == 401 and body["error"] == "unauthorized", (method, path)
    status, body, _ = await node.call("GET", "/v1/sessions/direct",
                                      headers={"X-Stickystate-Internal": SECRET, "X-Stickystate-Tenant": "ta"})
    assert status == 200 and body["data"] == {"v": 1}  # the secret is what opens it
    assert (await node.call("GET", "/readyz"))[0] == 200


async def test_direct_clients_at_a_node_stay_in_their_tenant(http: aiohttp.ClientSession, cluster: LocalCluster) -> None:
    """A client may call a node straight with its API key (stickystate.client does): the
    key names the tenant, exactly as at the router. Tenant B's key at the node that holds
    tenant A's session cannot read or change it, whatever id or header it tries; no key is
    a 401; /internal/* without the internal secret is a 401, API key or not."""
    api = Api(http, cluster.router_url)
    status, _, headers = await as_tenant(api, KEY_A)("POST", "/v1/sessions", {"id": "direct-a", "data": {"v": 1}},
                                                     {"Durability": "log"})
    assert status == 201
    node = Api(http, cluster.node_url(headers["X-Stickystate-Owner"]))
    key_a, key_b = {"Authorization": f"Bearer {KEY_A}"}, {"X-Api-Key": KEY_B}

    status, body, _ = await node.call("GET", "/v1/sessions/direct-a", headers=key_a)
    assert status == 200 and body["id"] == "direct-a" and body["data"] == {"v": 1}  # A's key: A's session
    for method, path, payload in (("GET", "/v1/sessions/direct-a", None), ("GET", "/v1/sessions/ta:direct-a", None),
                                  ("GET", "/v1/sessions/direct-a/meta", None),
                                  ("PATCH", "/v1/sessions/direct-a", {"v": 2}),
                                  ("POST", "/v1/sessions/direct-a/lists/x", {"items": [1]}),
                                  ("DELETE", "/v1/sessions/direct-a", None)):
        status, body, _ = await node.call(method, path, payload, headers=key_b)
        # B's own namespace: nothing there (404), or its shard lives elsewhere (421)
        assert status in (404, 421) and "v" not in str(body.get("data")), (method, path, status, body)
    status, body, _ = await node.call("GET", "/v1/sessions/direct-a", headers={**key_b, "X-Stickystate-Tenant": "ta"})
    assert status == 400 and body["error"] == "bad_header"  # a client cannot assert a tenant
    status, body, _ = await node.call("GET", "/v1/sessions/direct-a")
    assert status == 401 and body["error"] == "unauthorized"
    for method, path in (("GET", "/internal/status"), ("POST", "/internal/assign")):
        status, body, _ = await node.call(method, path, {} if method == "POST" else None, headers=key_a)
        assert status == 401 and body["error"] == "unauthorized", path
    status, body, _ = await node.call("GET", "/v1/sessions/direct-a", headers=key_a)
    assert status == 200 and body["version"] == 1 and body["data"] == {"v": 1}  # B changed nothing
