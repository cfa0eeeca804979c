"""A Python client for stickystate that goes straight to the owner.

    from stickystate.client import Client, AsyncClient

``Client`` (sync, urllib3) and ``AsyncClient`` (asyncio, aiohttp) have the same methods;
both read the router's shard map and send each session call to the node that owns the
session, following 421s and retrying failures (stickystate/client/core.py says how).
Errors: stickystate/client/errors.py. Installs with ``pip install stickystate[client]``:
none of the server's dependencies (aiokafka, uvloop, httptools, ...).
"""

from stickystate.client.aio import AsyncClient
from stickystate.client.core import ClusterMap, RetryPolicy
from stickystate.client.errors import (ApiError, BadRequest, Conflict, NotFound, NotOwner, PreconditionFailed,
                                       RateLimited, ServerError, StickyStateError, TooLarge, TransportError,
                                       Unauthorized, Unavailable)
from stickystate.client.sync import Client
from stickystate.client.watch import WatchEvent

__all__ = ["ApiError", "AsyncClient", "BadRequest", "Client", "ClusterMap", "Conflict", "NotFound", "NotOwner",
           "PreconditionFailed", "RateLimited", "RetryPolicy", "ServerError", "StickyStateError", "TooLarge",
           "TransportError", "Unauthorized", "Unavailable", "WatchEvent"]
