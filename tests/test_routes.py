"""One route table (``stickystate.protocol.ROUTES``) drives the node's aiohttp app, the
node's fast front and the router's forwarding and own app: each is checked against it."""

from __future__ import annotations

import re

from aiohttp import web

from stickystate.node.fastpath import match
from stickystate.node.http import build_app as build_node_app
from stickystate.node.settings import NodeSettings
from stickystate.protocol import FORWARDED_ROUTES, NODE, ROUTER, ROUTES, Route, routes_of
from stickystate.router.app import build_app as build_router_app
from stickystate.router.forward import is_session_request
from stickystate.router.settings import RouterSettings


def sample(route: Route) -> bytes:
    """A concrete path for the route's template."""
    return re.sub(r"\{(\w+)\}", lambda m: f"{m.group(1)}-1", route.path).encode()


def app_routes(app: web.Application) -> dict[tuple[str, str], str]:
    """(method, path) -> handler name, HEAD (added by add_get) left out."""
    out = {}
    for r in app.router.routes():
        if r.method != "HEAD":
            out[(r.method, r.resource.canonical)] = r.handler.__name__  # type: ignore[union-attr]
    return out


def test_the_node_app_registers_exactly_the_node_routes_with_their_handlers() -> None:
    app = build_node_app(NodeSettings(auth="open"))
    assert app_routes(app) == {(r.method, r.path): r.op for r in routes_of(NODE)}


def test_the_router_app_registers_exactly_the_router_routes() -> None:
    app = build_router_app(RouterSettings(nodes=(("n1", "http://127.0.0.1:1"),), auth="open"))
    routes = app_routes(app)
    assert set(routes) == {(r.method, r.path) for r in routes_of(ROUTER)}
    assert {routes[(r.method, r.path)] for r in routes_of(ROUTER) if r.forwarded} == {"forward"}


def test_the_fast_front_answers_exactly_the_fast_routes() -> None:
    for route in routes_of(NODE):
        got = match(route.method.encode(), sample(route))
        if route.fast:
            assert got is not None and got[0] == route.op, route
        else:
            assert got is None, route


def test_the_router_forwards_exactly_the_forwarded_routes() -> None:
    for route in ROUTES:
        assert is_session_request(route.method.encode(), sample(route)) is route.forwarded, route
    # and only with their methods: another method on a session path is the router app's 405
    assert not is_session_request(b"GET", b"/v1/sessions")
    assert not is_session_request(b"POST", b"/v1/sessions/x/meta")
    assert is_session_request(b"HEAD", b"/v1/sessions/x")  # as its GET


def test_every_session_route_is_forwarded_and_served_by_both() -> None:
    for route in ROUTES:
        if route.path.startswith("/v1/sessions"):
            assert route.forwarded and route.served_by == {NODE, ROUTER}, route
        assert FORWARDED_ROUTES.match(route.method.encode(), sample(route)) is not None or not route.forwarded
