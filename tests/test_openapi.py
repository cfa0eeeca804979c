"""docs/openapi.yaml against the code: routes, error codes, id/key formats, limits, access
control, request ids, response shapes, examples.

Pure: builds the node and router aiohttp apps without starting them (no Kafka, no network).
"""

from __future__ import annotations

import ast
import copy
import inspect
import re
from pathlib import Path
from typing import Any

import jsonschema
import openapi_spec_validator
import orjson
import pytest
import referencing
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from referencing.jsonschema import DRAFT202012

from stickystate import errors as node_errors
from stickystate import protocol
from stickystate.node.handlers import NodeHandlers
from stickystate.router import app as router_app_mod
from stickystate.router import forward as router_forward
from stickystate.node import validate
from stickystate.node.http import build_app as build_node_app
from stickystate.node.ops import EVENT_META, WRITE_OPS, apply, view
from stickystate.node.settings import NodeSettings
from stickystate.replicator.history import HistoryReader
from stickystate.router.app import build_app as build_router_app
from stickystate.router.app import make_edge_middleware as router_edge
from stickystate.router.app import TENANT
from stickystate.router.cluster import Cluster
from stickystate.router.metrics import RouterMetrics
from stickystate.router.settings import RouterSettings

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "docs" / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# The code's path parameter names -> the spec's.
PARAM_NAMES = {"sid": "id"}
# Answered by the router itself; everything under /v1/sessions is forwarded to a node.
ROUTER_OWN_PATHS = {"/v1/cluster", "/livez", "/readyz", "/metrics"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    with SPEC_PATH.open() as f:
        return yaml.safe_load(f)


def deref(spec: dict[str, Any], obj: Any) -> Any:
    while isinstance(obj, dict) and "$ref" in obj:
        ref = obj["$ref"]
        assert ref.startswith("#/"), ref
        obj = spec
        for part in ref[2:].split("/"):
            obj = obj[part.replace("~1", "/").replace("~0", "~")]
    return obj


def spec_operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in spec["paths"].items() for m in item if m in HTTP_METHODS}


def spec_path(canonical: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "{" + PARAM_NAMES.get(m.group(1), m.group(1)) + "}", canonical)


def app_operations(app: web.Application) -> set[tuple[str, str]]:
    # aiohttp adds a HEAD route for every add_get(); the spec documents the GET.
    return {(r.method, spec_path(r.resource.canonical)) for r in app.router.routes()
            if r.method != "HEAD" and r.resource is not None}


def node_app() -> web.Application:
    return build_node_app(NodeSettings(auth="open"))


def router_app() -> web.Application:
    return build_router_app(RouterSettings(nodes=(("n1", "http://127.0.0.1:1"),), auth="open"))


# -- the document ------------------------------------------------------------------


def test_is_openapi_3_1_with_info_and_paths(spec: dict[str, Any]) -> None:
    assert str(spec["openapi"]).startswith("3.1.")
    assert spec["info"]["title"] and spec["info"]["version"]
    assert spec["paths"]
    assert "Error" in spec["components"]["schemas"]


def test_is_a_valid_openapi_document(spec: dict[str, Any]) -> None:
    openapi_spec_validator.validate(spec)  # raises on any violation
    broken = copy.deepcopy(spec)  # and it does look: a response without its description is refused
    del broken["paths"]["/v1/cluster"]["get"]["responses"]["200"]["description"]
    with pytest.raises(OpenAPIValidationError, match="description"):
        openapi_spec_validator.validate(broken)


# -- routes ------------------------------------------------------------------------


def test_every_public_node_route_is_in_the_spec_and_vice_versa(spec: dict[str, Any]) -> None:
    node_public = {(m, p) for m, p in app_operations(node_app()) if p.startswith("/v1/")}
    documented = {(m, p) for m, p in spec_operations(spec) if p not in ROUTER_OWN_PATHS}
    assert node_public, "no /v1 routes found on the node app"
    assert node_public - documented == set(), "node routes missing from docs/openapi.yaml"
    assert documented - node_public == set(), "documented operations the node does not serve"


def test_router_own_routes_are_the_spec_s(spec: dict[str, Any]) -> None:
    router_own = {(m, p) for m, p in app_operations(router_app()) if not p.startswith("/v1/sessions")}
    documented = {(m, p) for m, p in spec_operations(spec) if p in ROUTER_OWN_PATHS}
    assert router_own == documented
    assert {p for _, p in router_own} == ROUTER_OWN_PATHS


def _concrete(spec: dict[str, Any], path: str, item: dict[str, Any]) -> str:
    params = {deref(spec, p)["name"]: deref(spec, p) for p in item.get("parameters", [])}

    def value(m: re.Match[str]) -> str:
        p = params[m.group(1)]
        assert p["in"] == "path" and p["required"] is True
        assert re.fullmatch(p["schema"]["pattern"], str(p["example"]))
        return str(p["example"])

    return re.sub(r"\{(\w+)\}", value, path)


async def test_router_forwards_every_session_operation_and_the_node_serves_it(spec: dict[str, Any]) -> None:
    router, node_ = router_app(), node_app()
    for path, item in spec["paths"].items():
        if path in ROUTER_OWN_PATHS:
            continue
        url = _concrete(spec, path, item)
        for method in (m for m in item if m in HTTP_METHODS):
            for app, who in ((router, "router"), (node_, "node")):
                match = await app.router.resolve(make_mocked_request(method.upper(), url, app=app))
                assert match.http_exception is None, f"{who} does not route {method.upper()} {url}"


# -- formats and limits ----------------------------------------------------------------


def test_id_and_key_patterns_are_the_code_s(spec: dict[str, Any]) -> None:
    params = spec["components"]["parameters"]
    id_pattern = "^" + validate.SESSION_ID_RE.pattern + "$"
    key_pattern = "^" + validate.KEY_RE.pattern + "$"
    assert params["SessionId"]["name"] == PARAM_NAMES["sid"]
    assert params["SessionId"]["schema"]["pattern"] == id_pattern
    assert spec["components"]["schemas"]["SessionId"]["pattern"] == id_pattern
    assert params["Key"]["schema"]["pattern"] == key_pattern
    assert params["Field"]["schema"]["pattern"] == key_pattern
    # Every path parameter of the session routes uses these components.
    for path, item in spec["paths"].items():
        names = re.findall(r"\{(\w+)\}", path)
        refs = {deref(spec, p)["name"]: p.get("$ref") for p in item.get("parameters", [])}
        for name in names:
            assert refs.get(name) in {"#/components/parameters/SessionId", "#/components/parameters/Key",
                                      "#/components/parameters/Field"}, (path, name)


def test_headers_limits_and_shapes_are_the_code_s(spec: dict[str, Any]) -> None:
    comp = spec["components"]
    limits = validate.Limits()
    assert comp["parameters"]["Durability"]["schema"]["enum"] == list(validate.DURABILITIES)
    assert comp["parameters"]["IdempotencyKey"]["schema"]["pattern"] == "^" + protocol.IDEMPOTENCY_KEY_PATTERN + "$"
    assert comp["schemas"]["TtlSeconds"]["maximum"] == limits.max_ttl_s
    assert comp["schemas"]["AppendRequest"]["properties"]["max_len"]["maximum"] == limits.max_list_len
    # The public session shape is what ops.view() renders.
    state, _ = apply(None, {"op": "create", "sid": "s", "data": {}, "ttl_s": 1.0}, 0.0)
    session = comp["schemas"]["Session"]
    assert set(session["properties"]) == set(session["required"]) == set(view(state, 0.0))
    # POST /v1/sessions accepts exactly these fields.
    src = inspect.getsource(NodeHandlers.create)
    accepted = set(re.findall(r'"(\w+)"', re.search(r"set\(doc\) - \{([^}]*)\}", src).group(1)))
    assert set(comp["schemas"]["CreateSession"]["properties"]) == accepted


# -- error codes -----------------------------------------------------------------------


def _node_py() -> list[Path]:
    return sorted((ROOT / "node").glob("*.py"))


def _server_py() -> list[Path]:
    """Every module that answers HTTP requests: the node's, the router's, and the HTTP layer both use."""
    return _node_py() + sorted((ROOT / "router").glob("*.py")) + sorted((ROOT / "stickystate" / "http").glob("*.py"))


def _codes_in_code() -> set[str]:
    codes = {cls.code for cls in vars(node_errors).values()
             if isinstance(cls, type) and issubclass(cls, node_errors.StickyError)}
    # SomeError(..., code="x") in node/ and router/.
    for f in _server_py():
        codes |= set(re.findall(r"""\bcode=["']([^"']+)["']""", f.read_text()))
    # error_response(status, "code", ...) in node/ and router/, and the middleware's status -> code map.
    for f in _server_py():
        for call in (n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call)):
            name = getattr(call.func, "id", getattr(call.func, "attr", None))
            if name == "error_response" and len(call.args) >= 2 and isinstance(call.args[1], ast.Constant):
                codes.add(call.args[1].value)
            if (name == "get" and isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Dict)
                    and all(isinstance(k, ast.Constant) and isinstance(k.value, int) for k in call.func.value.keys)):
                codes |= {v.value for v in call.func.value.values if isinstance(v, ast.Constant)}
                codes |= {a.value for a in call.args[1:] if isinstance(a, ast.Constant)}
    return codes


def test_every_error_code_in_the_code_is_in_the_error_enum(spec: dict[str, Any]) -> None:
    enum = spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
    in_code = _codes_in_code()
    assert {"bad_id", "exists", "not_found", "recovering", "rebalancing", "method_not_allowed", "bad_query",
            "unauthorized", "rate_limited"} <= in_code  # sanity
    assert len(enum) == len(set(enum)), "duplicate codes in the enum"
    assert in_code - set(enum) == set(), "error codes the spec does not list"
    assert set(enum) - in_code == set(), "codes in the spec that the code never uses"


def test_too_large_limits_are_the_code_s(spec: dict[str, Any]) -> None:
    limits = set()
    for f in _node_py():
        limits |= set(re.findall(r"""\blimit=["']([^"']+)["']""", f.read_text()))
    assert set(spec["components"]["schemas"]["Error"]["properties"]["limit"]["enum"]) == limits


def test_error_responses_use_the_error_schema(spec: dict[str, Any]) -> None:
    for name, resp in spec["components"]["responses"].items():
        assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, name
    unavailable = spec["components"]["responses"]["Unavailable"]
    assert unavailable["headers"]["Retry-After"]["required"] is True
    assert spec["components"]["responses"]["TooManyRequests"]["headers"]["Retry-After"]["required"] is True
    assert spec["components"]["responses"]["Unauthorized"]["headers"]["WWW-Authenticate"]["required"] is True
    for path, item in spec["paths"].items():
        for method in (m for m in item if m in HTTP_METHODS):
            for status, resp in item[method]["responses"].items():
                if str(status).startswith(("4", "5")) and path not in ROUTER_OWN_PATHS:
                    assert resp["$ref"].startswith("#/components/responses/"), (method, path, status)
            if path not in ROUTER_OWN_PATHS:
                assert item[method]["responses"]["503"] == {"$ref": "#/components/responses/Unavailable"}


# -- access control and request ids ---------------------------------------------------------


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), path, item[m]) for path, item in spec["paths"].items() for m in item if m in HTTP_METHODS]


def test_security_schemes_and_open_paths_are_the_code_s(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"] == {**schemes["apiKeyHeader"], "type": "apiKey", "in": "header", "name": "X-Api-Key"}
    # Either scheme is enough: two alternatives, not one requirement with both.
    assert spec["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    # The router never forwards the credentials to a node.
    assert {"authorization", "x-api-key"} <= router_app_mod.STRIPPED
    open_ops = {(m, p) for m, p, op in _operations(spec) if op.get("security") == []}
    assert open_ops == {("GET", p) for p in router_app_mod.OPEN_PATHS}
    assert router_app_mod.OPEN_PATHS == protocol.OPEN_PATHS == {r.path for r in protocol.ROUTES if r.open}
    for method, path, op in _operations(spec):
        assert "security" not in op or op["security"] == [], (method, path)
        if (method, path) not in open_ops:
            assert op["responses"]["401"] == {"$ref": "#/components/responses/Unauthorized"}, (method, path)
            assert op["responses"]["429"] == {"$ref": "#/components/responses/TooManyRequests"}, (method, path)
        else:
            assert not {"401", "429"} & set(op["responses"]), (method, path)


async def test_the_router_edge_answers_as_documented(spec: dict[str, Any]) -> None:
    """401 / 429 / X-Request-Id from the router's middleware itself (no network)."""
    key = "k" * 20
    settings = RouterSettings(nodes=(("n1", "http://127.0.0.1:1"),), auth="keys", api_keys=((key, "ta"),),
                              rate_limit_rps=0.5, rate_limit_burst=2)
    edge = router_edge(settings, RouterMetrics(Cluster(settings)))
    app = web.Application()
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.get(TENANT))
        return web.Response(text="ok")

    async def call(path: str, headers: dict[str, str]) -> web.StreamResponse:
        return await edge(make_mocked_request("GET", path, headers=headers, app=app), handler)

    resp = await call("/v1/sessions/x", {})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["X-Request-Id"])
    assert (await call("/v1/cluster", {"Authorization": "Bearer " + "x" * 20})).status == 401
    for path in router_app_mod.OPEN_PATHS:
        assert (await call(path, {"X-Request-Id": "r-1"})).headers["X-Request-Id"] == "r-1"
    assert (await call("/v1/sessions/x", {"Authorization": f"Bearer {key}"})).status == 200
    assert (await call("/v1/sessions/x", {"X-Api-Key": key})).status == 200  # the burst of 2 is used up
    limited = await call("/v1/sessions/x", {"X-Api-Key": key, "X-Request-Id": "r-2"})
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["X-Request-Id"] == "r-2"
    assert seen == [None, None, None, "ta", "ta"]  # open paths carry no tenant
    codes = {r.status: orjson.loads(r.body)["error"] for r in (resp, limited)}
    assert codes == {401: "unauthorized", 429: "rate_limited"}
    enum = set(spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    assert set(codes.values()) <= enum


def test_request_id_header_on_every_path_and_response(spec: dict[str, Any]) -> None:
    comp = spec["components"]
    assert comp["parameters"]["RequestId"]["name"] == protocol.REQUEST_ID_HEADER
    assert comp["parameters"]["RequestId"]["in"] == "header"
    ref = {"$ref": "#/components/headers/X-Request-Id"}
    for name, resp in comp["responses"].items():
        assert resp["headers"][protocol.REQUEST_ID_HEADER] == ref, name
    for path, item in spec["paths"].items():
        assert {"$ref": "#/components/parameters/RequestId"} in item.get("parameters", []), path
        for method in (m for m in item if m in HTTP_METHODS):
            for status, resp in item[method]["responses"].items():
                if "$ref" not in resp:
                    assert resp["headers"][protocol.REQUEST_ID_HEADER] == ref, (method, path, status)


# -- meta, history, metrics --------------------------------------------------------------


def _parse(func: Any) -> ast.AST:
    return ast.parse("if True:\n" + inspect.getsource(func))  # methods are indented


def _dict_keys_of(func: Any, variable: str) -> set[str]:
    """The string keys of the dict literal assigned to ``variable`` in ``func``'s source."""
    for n in ast.walk(_parse(func)):
        if (isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == variable for t in n.targets)):
            return {k.value for k in n.value.keys if isinstance(k, ast.Constant)}
    raise AssertionError(f"no dict assigned to {variable} in {func.__qualname__}")


def _int_params_of(func: Any) -> dict[str, tuple[int, int, int]]:
    """_int_param(request, name, default, lo, hi) calls in ``func``: name -> (default, lo, hi)."""
    out = {}
    for n in ast.walk(_parse(func)):
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "_int_param":
            # Constants and constant expressions such as 2**62 (our own source, no names).
            name, *nums = [eval(compile(ast.Expression(a), "<arg>", "eval"), {"__builtins__": {}})  # noqa: S307
                           for a in n.args[1:]]
            out[name] = tuple(nums)
    return out


def test_meta_and_history_shapes_are_the_code_s(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    handlers = NodeHandlers
    meta = schemas["SessionMeta"]
    assert set(meta["properties"]) == set(meta["required"]) == _dict_keys_of(handlers.meta, "body")
    page = schemas["HistoryPage"]
    assert set(page["properties"]) == set(page["required"]) == _dict_keys_of(handlers.history, "body")
    event = schemas["HistoryEvent"]
    assert set(event["properties"]["op"]["enum"]) == set(WRITE_OPS)
    # Every event field but the idempotency record, which the trail leaves out, plus the offset.
    assert set(event["required"]) == {"op", "offset"} | set(EVENT_META) - {"idem"}
    # /history (read) and the watch resumes (read_sessions) both take their events from _trail
    assert 'event.pop("idem", None)' in inspect.getsource(HistoryReader._trail)
    assert "self._trail(" in inspect.getsource(HistoryReader.read)
    query = {p["name"]: p["schema"] for p in spec["paths"]["/v1/sessions/{id}/history"]["get"]["parameters"]}
    in_code = _int_params_of(handlers.history)
    assert set(query) == set(in_code) == {"after", "limit"}
    for name, (default, lo, hi) in in_code.items():
        assert (query[name]["default"], query[name]["minimum"], query[name]["maximum"]) == (default, lo, hi), name
    assert page["properties"]["events"]["maxItems"] == in_code["limit"][2]


def test_metrics_route_is_text_on_router_and_node(spec: dict[str, Any]) -> None:
    op = spec["paths"]["/metrics"]["get"]
    assert set(op["responses"]["200"]["content"]) == {"text/plain"}
    assert ("GET", "/metrics") in app_operations(router_app())
    assert ("GET", "/metrics") in app_operations(node_app())


# -- examples ----------------------------------------------------------------------------


def _examples(spec: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(where, JSON pointer of the schema, example value) for every example in the document."""
    out: list[tuple[str, str, Any]] = []

    def esc(s: str) -> str:
        return s.replace("~", "~0").replace("/", "~1")

    def media(where: str, pointer: str, content: dict[str, Any]) -> None:
        for mtype, m in content.items():
            schema_ptr = f"{pointer}/content/{esc(mtype)}/schema"
            if "example" in m:
                out.append((f"{where} {mtype}", schema_ptr, m["example"]))
            for name, ex in m.get("examples", {}).items():
                out.append((f"{where} {mtype} {name}", schema_ptr, deref(spec, ex)["value"]))

    def with_schema(where: str, pointer: str, obj: dict[str, Any]) -> None:
        if "example" in obj:
            out.append((where, f"{pointer}/schema", obj["example"]))
        for name, ex in obj.get("examples", {}).items():
            out.append((f"{where} {name}", f"{pointer}/schema", deref(spec, ex)["value"]))

    for name, resp in spec["components"]["responses"].items():
        media(f"response {name}", f"#/components/responses/{name}", resp.get("content", {}))
    for name, param in spec["components"]["parameters"].items():
        with_schema(f"parameter {name}", f"#/components/parameters/{name}", param)
    for name, header in spec["components"]["headers"].items():
        with_schema(f"header {name}", f"#/components/headers/{name}", header)
    for path, item in spec["paths"].items():
        for method in (m for m in item if m in HTTP_METHODS):
            op, ptr = item[method], f"#/paths/{esc(path)}/{method}"
            for i, param in enumerate(op.get("parameters", [])):
                if "$ref" not in param:
                    with_schema(f"{method} {path} {param['name']}", f"{ptr}/parameters/{i}", param)
            if "requestBody" in op:
                media(f"{method} {path} request", f"{ptr}/requestBody", op["requestBody"]["content"])
            for status, resp in op["responses"].items():
                if "$ref" not in resp:
                    media(f"{method} {path} {status}", f"{ptr}/responses/{status}", resp.get("content", {}))
    return out


def test_examples_match_their_schemas(spec: dict[str, Any]) -> None:
    registry = referencing.Registry().with_resource("urn:spec", DRAFT202012.create_resource(spec))
    examples = _examples(spec)
    assert len(examples) >= 30
    for where, pointer, value in examples:
        validator = jsonschema.Draft202012Validator({"$ref": "urn:spec" + pointer}, registry=registry)
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, f"{where}: {errors}"
    # Error examples use real codes.
    enum = set(spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    assert all(v["error"] in enum for _, p, v in examples if p.endswith("/schema") and isinstance(v, dict)
               and "error" in v)


# -- Prefer: return=minimal ------------------------------------------------------------


def test_minimal_answer_is_documented_on_every_write_with_a_body(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    minimal = schemas["SessionMinimal"]
    keys = _dict_keys_of(NodeHandlers._render_minimal, "body")
    # "id" only on a create's answer (its id may have been generated), so it is optional
    assert set(minimal["properties"]) == keys and set(minimal["required"]) == keys - {"id"}
    assert keys < set(schemas["Session"]["properties"])
    assert spec["components"]["headers"]["Preference-Applied"]["schema"]["enum"] == ["return=minimal"]
    assert protocol.PREFERENCE_APPLIED_HEADER == "Preference-Applied"
    assert '[PREFERENCE_APPLIED_HEADER] = "return=minimal"' in inspect.getsource(NodeHandlers._write)
    assert "prefer" not in router_forward.STRIPPED and "preference-applied" not in router_forward.HOP_BY_HOP
    prefer = {"$ref": "#/components/parameters/Prefer"}
    writes = [(m, p, op) for m, p, op in _operations(spec) if m in ("POST", "PUT", "PATCH", "DELETE")]
    assert len(writes) == 7
    for method, path, op in writes:
        bodies = {s: r for s, r in op["responses"].items() if str(s).startswith("2") and "content" in r}
        if not bodies:  # 204: nothing to make minimal
            assert prefer not in op["parameters"], (method, path)
            continue
        assert prefer in op["parameters"], (method, path)
        for status, resp in bodies.items():
            assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/WriteResult"}
            assert "Preference-Applied" in resp["headers"], (method, path, status)
