"""The aiohttp side of both servers: answers and errors rendered one way, and routes
registered from the route table (``stickystate.protocol.ROUTES``).

``Answer`` is what a node's session handler returns: the aiohttp app renders it with
``as_response``, the node's fast front with its own framing, both from the same bytes.
Typed errors (``stickystate.errors``) become their JSON answer in ``error_answer``, once
for both fronts; the JSON body itself is ``protocol.error_body``, which the httptools
fronts use too (``stickystate.http.wire.error_reply``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from stickystate.errors import StickyError
from stickystate.http.request import HandlerRequest
from stickystate.http.wire import Answer, json_answer
from stickystate.protocol import JSON_CONTENT_TYPE, OWNER_HEADER, Route, error_body


def as_response(answer: Answer) -> web.Response:
    if answer.body is None:
        return web.Response(status=answer.status, headers=answer.headers)
    return web.Response(body=answer.body, status=answer.status, headers=answer.headers,
                        content_type=JSON_CONTENT_TYPE)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return as_response(json_answer(body, status, headers))


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> web.Response:
    return as_response(Answer(status, headers or {}, error_body(code, message, **extra)))


def error_answer(exc: StickyError | web.HTTPRequestEntityTooLarge) -> Answer:
    """A typed error (or aiohttp's body-size refusal) as its JSON answer."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return Answer(413, {}, error_body("too_large", exc.text or "body too large", limit="max_body_bytes"))
    headers = exc.headers()
    if exc.status == 421 and exc.extra.get("owner"):
        headers[OWNER_HEADER] = str(exc.extra["owner"])
    return Answer(exc.status, headers, error_body(exc.code, exc.message, **exc.extra))


def errors_middleware(log: logging.Logger) -> Any:
    """Typed errors and aiohttp's own 4xx as JSON answers; anything else a logged 500."""

    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except (StickyError, web.HTTPRequestEntityTooLarge) as exc:
            return as_response(error_answer(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error_response(exc.status, code, exc.reason, allow)
        except Exception:
            log.exception("unhandled error", extra={"path": request.path})
            return error_response(500, "internal", "internal error")

    return errors


async def without_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """No ``Server`` header (aiohttp adds one naming its version): no version disclosure,
    and 36 bytes less on every answer. Runs after aiohttp set its default headers."""
    response.headers.popall("Server", None)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_route(app: web.Application, route: Route, handler: Handler) -> None:
    """Register one route of the table; a GET route answers HEAD too (as ``add_get``).
    The handler keeps its name: the node's metrics label requests with it."""
    if route.method == "GET":
        app.router.add_get(route.path, handler)
    else:
        app.router.add_route(route.method, route.path, handler)


def answering(handler: Callable[[HandlerRequest], Awaitable[Answer]]) -> Handler:
    """A session handler (returning an ``Answer``) as an aiohttp handler (same ``__name__``).
    mypy checks here that aiohttp's ``web.Request`` is a ``HandlerRequest``."""

    @functools.wraps(handler)
    async def route(request: web.Request) -> web.Response:
        return as_response(await handler(request))

    return route
