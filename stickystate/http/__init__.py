"""HTTP/1.1 for both servers, below node/ and router/ (which never import each other).

    protocol (stickystate/protocol.py)   header names, ids, shard_of, error body, ROUTES
    wire.py        Reply, Answer, error_reply, render: bytes in and out (pure)
    connection.py  ClientConnection: one client connection of an httptools front
    front.py       Front: what a front's connections share; relay to the local app; serving
    upstream.py    UpstreamPool: keep-alive connections to a node or to the local app
    request.py     HandlerRequest (what session handlers read), FastRequest
    aio.py         the aiohttp side: answers, errors middleware, routes from the table
"""
