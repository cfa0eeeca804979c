"""Who may call a node, and as which tenant: the one check both node fronts make
(node/fastpath.py ``NodeFront._handle`` for the session routes it answers, node/http.py's
edge middleware for everything else). Pure: the clock is passed in.

A request is accepted

- with the cluster's internal secret (``X-Stickystate-Internal``): a router or a peer.
  The tenant it vouches for comes in ``X-Stickystate-Tenant`` (and the id it generated
  for a create in ``X-Stickystate-Session-Id``), as the router sends them;
- else, on a session route, as a client, exactly as the router accepts one
  (stickystate/auth.py): with ``--auth keys`` a valid API key (``Authorization: Bearer``
  or ``X-Api-Key``) names the tenant, then the tenant's token bucket is charged (429 past
  it); with ``--auth open`` no credential is needed and the request is served in the one
  shared namespace of an open cluster, as the open router serves it. Either way a client
  may not send ``X-Stickystate-Tenant`` or ``X-Stickystate-Session-Id`` itself (400
  ``bad_header``): no client can assert a tenant. The front then states the key's
  tenant to the handlers in ``X-Stickystate-Tenant``, as a router would have.

Everything else (``/internal/*``, unknown paths) needs the secret in every mode, and a
wrong secret is a 401 whatever else the request carries. ``/livez``, ``/readyz`` and
``/metrics`` need nothing. A node with no internal secret at all (``--auth open`` only)
accepts every request as it comes, tenant headers included (local development).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from stickystate.auth import Gate, Refusal
from stickystate.node.settings import NodeSettings

UNAUTHORIZED_MESSAGE = ("a valid API key (Authorization: Bearer <key> or X-Api-Key) is required; "
                        "internal endpoints need the cluster's internal secret")
INTERNAL_ONLY_MESSAGE = "only routers and peers holding the cluster's internal secret may call this"
RESERVED_MESSAGE = ("X-Stickystate-Tenant, X-Stickystate-Session-Id and X-Stickystate-Watch-* may be sent only by "
                    "the cluster's routers")
_CHALLENGE = (("WWW-Authenticate", "Bearer"),)


@dataclass(frozen=True)
class Admission:
    """Go ahead (``refusal`` None), as ``tenant`` when an API key named one: the front
    adds it to the request as ``X-Stickystate-Tenant`` before the handlers see it."""

    refusal: Refusal | None = None
    tenant: str | None = None


ADMITTED = Admission()


class NodeAccess:
    def __init__(self, settings: NodeSettings) -> None:
        self.secret = settings.internal_secret.encode()
        self.open = settings.auth == "open"
        self.gate = Gate("keys", dict(settings.api_keys), settings.rate_limit_rps, settings.rate_limit_burst)

    def admit(self, *, internal: bytes | None, authorization: str | None, api_key: str | None,
              reserved: bool, session_route: bool, now: float) -> Admission:
        """``internal``: the X-Stickystate-Internal value, if any; ``reserved``: the request
        carries X-Stickystate-Tenant or X-Stickystate-Session-Id; ``session_route``: one of
        the session routes of the route table (``forwarded``)."""
        if not self.secret:
            return ADMITTED
        if internal is not None:
            if hmac.compare_digest(internal, self.secret):
                return ADMITTED
            return Admission(Refusal(401, "unauthorized", INTERNAL_ONLY_MESSAGE, _CHALLENGE))
        if not session_route:
            return Admission(Refusal(401, "unauthorized", UNAUTHORIZED_MESSAGE, _CHALLENGE))
        tenant: str | None = None
        if not self.open:
            tenant, refusal = self.gate.admit(authorization, api_key, now)
            if refusal is not None:
                return Admission(refusal)
        if reserved:
            return Admission(Refusal(400, "bad_header", RESERVED_MESSAGE))
        return Admission(None, tenant)
