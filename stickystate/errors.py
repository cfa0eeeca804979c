"""Typed errors of the session store; each knows its HTTP status and JSON code.

    StickyError
    ├── BadRequest            400  bad id, JSON, operation, header
    ├── Unauthorized          401
    ├── NotFound              404
    ├── Conflict              409  id exists, idempotency key reused with another body
    ├── PreconditionFailed    412  If-Match did not match
    ├── PayloadTooLarge       413  body, state, list length, nesting depth
    ├── NotOwner              421  this node does not serve the shard (data: owner, epoch)
    ├── TooManyRequests       429  (retriable, Retry-After)
    └── Unavailable           503  replication queue full, Kafka slow, shard recovering
                                   (retriable, Retry-After)

Pure: no aiohttp import. Shared by the nodes (which raise them), the fronts (which render
them: stickystate/http/aio.py).
"""

from __future__ import annotations

from typing import Any


class StickyError(Exception):
    status = 500
    code = "internal"
    retriable = False

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(StickyError):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str = "bad_request", **extra: Any) -> None:
        super().__init__(message, **extra)
        self.code = code


class Unauthorized(StickyError):
    status = 401
    code = "unauthorized"


class NotFound(StickyError):
    status = 404
    code = "not_found"


class Conflict(StickyError):
    status = 409
    code = "conflict"

    def __init__(self, message: str, code: str = "conflict", **extra: Any) -> None:
        super().__init__(message, **extra)
        self.code = code


class PreconditionFailed(StickyError):
    status = 412
    code = "precondition_failed"


class PayloadTooLarge(StickyError):
    status = 413
    code = "too_large"

    def __init__(self, message: str, limit: str, **extra: Any) -> None:
        super().__init__(message, limit=limit, **extra)


class NotOwner(StickyError):
    """A redirect as data: the shard's current owner (if known) and epoch."""

    status = 421
    code = "not_owner"
    retriable = True

    def __init__(self, shard: int, owner: str | None, epoch: int | None = None) -> None:
        super().__init__(f"shard {shard} is not served here", shard=shard, owner=owner, epoch=epoch)
        self.shard = shard
        self.owner = owner
        self.epoch = epoch


class _RetryLater(StickyError):
    retriable = True

    def __init__(self, message: str, retry_after_s: int = 1, code: str | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.retry_after_s = retry_after_s
        if code:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class TooManyRequests(_RetryLater):
    status = 429
    code = "rate_limited"


class Unavailable(_RetryLater):
    status = 503
    code = "unavailable"
