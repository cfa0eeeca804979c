"""What a call of the client raises: one class per API error code, under one base.

    StickyStateError                  anything this client raises on purpose
    ├── TransportError                no answer: connection refused or reset, timeout (after the retries)
    └── ApiError                      an error answer: .status .code .message .body .request_id
        ├── BadRequest          400   bad id, JSON, operation, header, query (.code says which)
        ├── Unauthorized        401   no valid API key
        ├── NotFound            404   no such session or key
        ├── Conflict            409   id exists; Idempotency-Key reused with another request
        ├── PreconditionFailed  412   If-Match did not match: .current is the session's version
        ├── TooLarge            413   over a server limit: .limit names it (max_body_bytes, ...)
        ├── NotOwner            421   still not the owner after the retries: .owner
        ├── RateLimited         429   the tenant's rate limit: .retry_after (seconds)
        ├── Unavailable         503   overload, Kafka slow, shard recovering (after the retries): .retry_after
        └── ServerError         5xx   anything else the server failed at

The server's JSON error body is ``{"error": code, "message": text, ...}``
(stickystate/protocol.py ``error_body``); ``error_of`` turns an answer into its class.
"""

from __future__ import annotations

from typing import Any


class StickyStateError(Exception):
    """Base of everything the client raises."""


class TransportError(StickyStateError):
    """No server answered (after the retries): the last connection error or timeout is the cause."""


class ApiError(StickyStateError):
    status = 0

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None,
                 request_id: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}
        self.request_id = request_id
        self.retry_after = retry_after


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class PreconditionFailed(ApiError):
    status = 412

    @property
    def current(self) -> int | None:
        """The session's version now (None if it does not exist)."""
        value = self.body.get("current")
        return value if isinstance(value, int) else None


class TooLarge(ApiError):
    status = 413

    @property
    def limit(self) -> str | None:
        """Which server limit: max_body_bytes, max_state_bytes, max_list_len, max_depth."""
        value = self.body.get("limit")
        return str(value) if value is not None else None


class NotOwner(ApiError):
    status = 421

    @property
    def owner(self) -> str | None:
        value = self.body.get("owner")
        return str(value) if value is not None else None


class RateLimited(ApiError):
    status = 429


class Unavailable(ApiError):
    status = 503


class ServerError(ApiError):
    status = 500


BY_STATUS: dict[int, type[ApiError]] = {cls.status: cls for cls in (
    BadRequest, Unauthorized, NotFound, Conflict, PreconditionFailed, TooLarge, NotOwner, RateLimited, Unavailable)}


def error_of(status: int, body: Any, request_id: str | None = None, retry_after: float | None = None) -> ApiError:
    """The exception for an error answer (its parsed JSON body, if it had one)."""
    doc = body if isinstance(body, dict) else {}
    code = str(doc.get("error") or f"http_{status}")
    message = str(doc.get("message") or f"HTTP {status}")
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(status, code, message, doc, request_id, retry_after)
