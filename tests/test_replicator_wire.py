"""replicator/wire.py, the hand-written Produce v7 and Fetch v6 requests and answers, against
aiokafka's own schemas of the same versions (an independent encoder and decoder of the same
bytes)."""

from __future__ import annotations

from io import BytesIO

import pytest
from aiokafka.errors import IncompatibleBrokerVersion
from aiokafka.protocol.api import RequestHeader_v1
from aiokafka.protocol.fetch import FetchRequest_v6, FetchResponse_v6
from aiokafka.protocol.produce import ProduceRequest_v7, ProduceResponse_v7

from stickystate.replicator.wire import FetchRequest, FetchResponse, ProduceRequest, ProduceResponse


def test_the_request_is_what_aiokafkas_schema_decodes() -> None:
    batches = [("changes", 3, b"batch-a"), ("snapshots", 0, b""), ("changes", 17, b"batch-b" * 40)]
    req = ProduceRequest(-1, 10_000, batches)
    decoded = ProduceRequest_v7.decode(BytesIO(req.encode()))
    assert decoded.transactional_id is None
    assert (decoded.required_acks, decoded.timeout) == (-1, 10_000)
    assert [(t, list(ps)) for t, ps in decoded.topics] == [
        ("changes", [(3, b"batch-a"), (17, b"batch-b" * 40)]),
        ("snapshots", [(0, b"")]),
    ]
    header = req.build_request_header(correlation_id=41, client_id="stickystate-n1").encode()
    assert header == RequestHeader_v1(ProduceRequest_v7(None, -1, 0, []), correlation_id=41,
                                      client_id="stickystate-n1").encode()


def test_the_answer_is_read_as_aiokafkas_schema_writes_it() -> None:
    answer = ProduceResponse_v7(
        [("changes", [(3, 0, 120, -1, 0), (17, 6, -1, -1, -1)]), ("snapshots", [(0, 0, 7, -1, 0)])], 25,
    ).encode()
    resp = ProduceResponse.decode(BytesIO(answer))
    assert resp.partitions == {("changes", 3): (0, 120), ("changes", 17): (6, -1), ("snapshots", 0): (0, 7)}
    assert resp.throttle_time_ms == 25
    # the connection reads the correlation id first, then hands the rest to the answer type
    req = ProduceRequest(-1, 1000, [])
    buf = BytesIO(b"\x00\x00\x00\x2a" + answer)
    assert req.parse_response_header(buf).correlation_id == 42
    assert req.RESPONSE_TYPE.decode(buf).partitions == resp.partitions


def test_a_broker_without_produce_v7_is_refused_with_a_clear_error() -> None:
    req = ProduceRequest(-1, 1000, [])
    assert req.prepare({0: (3, 12)}) is req
    with pytest.raises(IncompatibleBrokerVersion, match="Produce v7"):
        req.prepare({0: (0, 2)})
    with pytest.raises(IncompatibleBrokerVersion):
        req.prepare({})


def test_the_fetch_request_is_what_aiokafkas_schema_decodes() -> None:
    req = FetchRequest("changes", [(3, 120), (17, 0)], max_wait_ms=200, min_bytes=4096, max_bytes=8 << 20,
                       partition_max_bytes=1 << 20)
    decoded = FetchRequest_v6.decode(BytesIO(req.encode()))
    assert (decoded.replica_id, decoded.max_wait_time, decoded.min_bytes, decoded.max_bytes,
            decoded.isolation_level) == (-1, 200, 4096, 8 << 20, 0)
    assert [(t, list(ps)) for t, ps in decoded.topics] == [("changes", [(3, 120, -1, 1 << 20), (17, 0, -1, 1 << 20)])]
    header = req.build_request_header(correlation_id=7, client_id="n1-lazy").encode()
    assert header == RequestHeader_v1(FetchRequest_v6(-1, 0, 0, 0, 0, []), correlation_id=7,
                                      client_id="n1-lazy").encode()
    assert req.prepare({1: (4, 17)}) is req
    with pytest.raises(IncompatibleBrokerVersion, match="Fetch v6"):
        req.prepare({1: (0, 5)})


def test_the_fetch_answer_is_read_as_aiokafkas_schema_writes_it() -> None:
    answer = FetchResponse_v6(15, [
        ("changes", [(3, 0, 130, 130, 0, None, b"batches-of-3"),
                     (4, 0, 90, 90, 10, [(1000, 12), (1001, 40)], b"batches-of-4" * 50),
                     (17, 1, -1, -1, -1, None, None),
                     (20, 0, 0, 0, 0, [], b"")]),
    ]).encode()
    resp = FetchResponse.decode(BytesIO(answer))
    assert resp.throttle_time_ms == 15
    assert [(p.topic, p.partition, p.error_code, p.high_watermark, p.records) for p in resp.partitions] == [
        ("changes", 3, 0, 130, b"batches-of-3"),
        ("changes", 4, 0, 90, b"batches-of-4" * 50),  # after aborted transactions, which it skips
        ("changes", 17, 1, -1, None),
        ("changes", 20, 0, 0, None),  # no records: nothing to parse
    ]
