"""Baseline servers the benchmark compares stickystate with. Each runs in its own
process(es) on uvloop; several processes share one port with SO_REUSEPORT.

``redis``: a stateless aiohttp server keeping every session as one JSON document in
Redis, with the same HTTP API as stickystate for the calls the benchmark makes::

    POST /v1/sessions                       {"id","data","ttl_s"} -> 201 (SET NX EX)
    GET  /v1/sessions/{id}                  -> the stored JSON (passed through as bytes)
    POST /v1/sessions/{id}/lists/{field}    {"items":[...],"max_len":50} -> the new state, or with
                                            Prefer: return=minimal {"id","version","expires_at"}

  ``--mode naive``: read-modify-write like a naive ``RedisStateStore``: GET the JSON,
  parse, append, trim, serialize, SET with the sliding TTL. Two round trips to Redis,
  and two concurrent turns on one session can lose one of the appends.
  ``--mode atomic``: the same change done inside Redis by one Lua script (EVALSHA,
  cjson): one round trip, no lost updates; Redis itself parses and serializes.

``client``: client-side state. The server keeps nothing; the client sends the whole
history with every request::

    POST /v1/turn  {"history":[...],"items":[...],"max_len":50} -> {"history": last 50 of history+items},
                   or with Prefer: return=minimal {"length": n} (the client has the history already)
    POST /v1/read  {"history":[...]}                            -> {"history": [...]}

  (a "read" is a request the server must answer with the session's state at hand,
  so the client has to ship it; the server parses and returns it.)

    python -m stickystate.bench.baselines redis --port 8200 --redis-port 6390 --mode naive
    python -m stickystate.bench.baselines client --port 8201
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from stickystate.node.validate import prefers_minimal as parse_prefer

KEY_PREFIX = "sess:"

# KEYS[1] session key; ARGV: field, items (JSON array), max_len (0 = unbounded), now, minimal (0/1).
# Returns the new document (minimal: only id, version, expires_at), or false when the
# session does not exist.
APPEND_LUA = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local s = cjson.decode(raw)
local field = ARGV[1]
local items = cjson.decode(ARGV[2])
local max_len = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local list = s['data'][field]
if list == nil then list = {} end
for i = 1, #items do list[#list + 1] = items[i] end
if max_len > 0 and #list > max_len then
  local trimmed = {}
  local first = #list - max_len + 1
  for i = first, #list do trimmed[#trimmed + 1] = list[i] end
  list = trimmed
end
s['data'][field] = list
s['version'] = s['version'] + 1
s['expires_at'] = now + s['ttl_s']
local out = cjson.encode(s)
redis.call('SET', KEYS[1], out, 'EX', math.ceil(s['ttl_s']))
if ARGV[5] == '1' then
  return cjson.encode({id = s['id'], version = s['version'], expires_at = s['expires_at']})
end
return out
"""
MINIMAL_HEADERS = {"Preference-Applied": "return=minimal"}


def prefers_minimal(request: web.Request) -> bool:
    # the same RFC 7240 reading as the node's (the baseline mirrors its API)
    return parse_prefer(request.headers.getall("Prefer", []))


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, code: str) -> web.Response:
    return _json({"error": code}, status)


async def _read_json(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(text='{"error":"bad_json"}', content_type="application/json") from None


def build_redis_app(redis_host: str, redis_port: int, mode: str, pool_size: int = 64) -> web.Application:
    import redis.asyncio as aioredis

    app = web.Application()
    state: dict[str, Any] = {}

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        # a blocking pool: past ``pool_size`` requests in flight, wait for a connection
        # (the default pool raises MaxConnectionsError, i.e. 500s under load)
        pool = aioredis.BlockingConnectionPool(host=redis_host, port=redis_port, max_connections=pool_size,
                                               timeout=30)
        client = aioredis.Redis(connection_pool=pool, decode_responses=False)
        await client.ping()
        state["r"] = client
        state["append"] = client.register_script(APPEND_LUA)
        yield
        await client.aclose()
        await pool.disconnect()

    app.cleanup_ctx.append(lifecycle)

    async def create(request: web.Request) -> web.Response:
        doc = await _read_json(request)
        sid, data, ttl = doc["id"], doc.get("data", {}), float(doc.get("ttl_s") or 3600.0)
        now = time.time()
        session = {"id": sid, "version": 1, "data": data, "expires_at": now + ttl, "ttl_s": ttl}
        raw = orjson.dumps(session)
        if not await state["r"].set(KEY_PREFIX + sid, raw, ex=max(1, int(ttl)), nx=True):
            return _error(409, "exists")
        return web.Response(body=raw, status=201, content_type="application/json")

    async def get(request: web.Request) -> web.Response:
        raw = await state["r"].get(KEY_PREFIX + request.match_info["sid"])
        if raw is None:
            return _error(404, "not_found")
        return web.Response(body=raw, content_type="application/json")

    async def append_naive(request: web.Request) -> web.Response:
        sid, field = request.match_info["sid"], request.match_info["field"]
        doc = await _read_json(request)
        items, max_len = doc["items"], doc.get("max_len")
        r = state["r"]
        raw = await r.get(KEY_PREFIX + sid)
        if raw is None:
            return _error(404, "not_found")
        session = orjson.loads(raw)
        lst = session["data"].get(field) or []
        lst = lst + items
        if max_len and len(lst) > max_len:
            lst = lst[len(lst) - max_len:]
        session["data"][field] = lst
        session["version"] += 1
        session["expires_at"] = time.time() + session["ttl_s"]
        out = orjson.dumps(session)
        await r.set(KEY_PREFIX + sid, out, ex=max(1, int(session["ttl_s"])))
        if prefers_minimal(request):
            return web.Response(body=orjson.dumps({"id": sid, "version": session["version"],
                                                   "expires_at": session["expires_at"]}),
                                content_type="application/json", headers=MINIMAL_HEADERS)
        return web.Response(body=out, content_type="application/json")

    async def append_atomic(request: web.Request) -> web.Response:
        sid, field = request.match_info["sid"], request.match_info["field"]
        doc = await _read_json(request)
        minimal = prefers_minimal(request)
        out = await state["append"](keys=[KEY_PREFIX + sid],
                                    args=[field, orjson.dumps(doc["items"]), int(doc.get("max_len") or 0),
                                          repr(time.time()), int(minimal)])
        if out is None:
            return _error(404, "not_found")
        return web.Response(body=out, content_type="application/json", headers=MINIMAL_HEADERS if minimal else None)

    app.router.add_post("/v1/sessions", create)
    app.router.add_get("/v1/sessions/{sid}", get)
    app.router.add_post("/v1/sessions/{sid}/lists/{field}", append_atomic if mode == "atomic" else append_naive)
    app.router.add_get("/livez", lambda request: _livez())
    return app


async def _livez() -> web.Response:
    return _json({"alive": True})


def build_client_state_app() -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)

    async def turn(request: web.Request) -> web.Response:
        doc = await _read_json(request)
        history = doc["history"] + doc["items"]
        max_len = doc.get("max_len")
        if max_len and len(history) > max_len:
            history = history[len(history) - max_len:]
        if prefers_minimal(request):
            return web.Response(body=orjson.dumps({"length": len(history)}), content_type="application/json",
                                headers=MINIMAL_HEADERS)
        return _json({"history": history})

    async def read(request: web.Request) -> web.Response:
        doc = await _read_json(request)
        return _json({"history": doc["history"]})

    app.router.add_post("/v1/turn", turn)
    app.router.add_post("/v1/read", read)
    app.router.add_get("/livez", lambda request: _livez())
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stickystate.bench.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["redis", "client"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--mode", choices=["naive", "atomic"], default="naive")
    p.add_argument("--pool-size", type=int, default=64, help="Redis connections per process")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("loopback addresses only")
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = (build_redis_app(args.redis_host, args.redis_port, args.mode, args.pool_size) if args.kind == "redis"
           else build_client_state_app())
    web.run_app(app, host=args.host, port=args.port, reuse_port=True, print=None, access_log=None,
                shutdown_timeout=2, backlog=1024)  # the same accept queue as the nodes and the router
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
