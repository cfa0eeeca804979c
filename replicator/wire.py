"""The Kafka requests of the replicator's hot paths, encoded here: Produce v7 (the
producer's) and Fetch v6 (the standbys' lazy reader's, replicator/follower.py).

aiokafka builds a produce request through its generic ``Struct`` schema and parses the
answer the same way, and its producer adds an accumulator, a drain pass, a future and a
task per batch. At a node's load (about one record per partition batch, see
docs/BENCHMARKS.md) that per-batch Python was most of what replication cost a node. The
replicator (producer.py) now builds the record batches itself (aiokafka's C
``DefaultRecordBatchBuilder``) and sends them with this request through aiokafka's client,
which still owns the connections, the metadata and the API version check.

``ProduceRequest`` duck-types what ``AIOKafkaConnection.send`` and its reader ask of a
request (``prepare``, ``build_request_header``, ``encode``, ``parse_response_header``,
``RESPONSE_TYPE.decode``). Produce v7 is the newest version with the classic (non-flexible)
header; every broker since Kafka 2.1 accepts it, and Kafka 4 still does (v3-v12).

A standby's reader had the same problem on the other side: aiokafka's consumer decodes every
fetch answer through ``Struct`` (all of the reader's partitions, every fetch), and wraps each
record in a ``ConsumerRecord`` after its C reader has parsed it. ``FetchRequest`` and
``FetchResponse`` do the same fetch by hand; the records are parsed by aiokafka's C
``MemoryRecords`` (the caller's).

Wire format (https://kafka.apache.org/protocol#The_Messages_Produce):
    request header v1: api_key int16, api_version int16, correlation_id int32, client_id string
    body v7: transactional_id nullable string, acks int16, timeout_ms int32,
             [topic string, [partition int32, records bytes]]
    response header v0: correlation_id int32
    response v7: [topic string, [partition int32, error_code int16, base_offset int64,
                  log_append_time_ms int64, log_start_offset int64]], throttle_time_ms int32

Fetch v6 (https://kafka.apache.org/protocol#The_Messages_Fetch; every broker since Kafka 1.0,
and Kafka 4, which takes v4-v17):
    body: replica_id int32 (-1: a consumer), max_wait_ms int32, min_bytes int32, max_bytes int32,
          isolation_level int8, [topic string, [partition int32, fetch_offset int64,
          log_start_offset int64 (-1: a consumer), partition_max_bytes int32]]
    response v6: throttle_time_ms int32, [topic string, [partition int32, error_code int16,
                 high_watermark int64, last_stable_offset int64, log_start_offset int64,
                 aborted_transactions nullable [producer_id int64, first_offset int64],
                 records nullable bytes]]
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO
from typing import Self

from aiokafka.errors import IncompatibleBrokerVersion

API_KEY = 0
API_VERSION = 7
FETCH_API_KEY = 1
FETCH_API_VERSION = 6

_HEAD = struct.Struct(">hhih")  # api_key, api_version, correlation_id, client_id length
_BODY_HEAD = struct.Struct(">hhii")  # transactional_id = null (-1), acks, timeout_ms, topic count
_PARTITION = struct.Struct(">ii")  # partition, records length
_I16 = struct.Struct(">h")
_I32_PAIR = struct.Struct(">ii")
_I32 = struct.Struct(">i")
_PARTITION_ANSWER = struct.Struct(">ihqqq")  # partition, error_code, base_offset, append time, log start
_FETCH_HEAD = struct.Struct(">iiiibi")  # replica_id, max_wait_ms, min_bytes, max_bytes, isolation, topic count
_FETCH_PARTITION = struct.Struct(">iqqi")  # partition, fetch_offset, log_start_offset, partition_max_bytes
_FETCH_ANSWER = struct.Struct(">ihqqq")  # partition, error_code, high_watermark, last_stable, log_start
_ABORTED = 16  # producer_id int64, first_offset int64


def _topic_head(data: bytes, pos: int) -> tuple[str, int, int]:
    """A topic's entry in an answer: its name and partition count; the position after them."""
    (n,) = _I16.unpack_from(data, pos)
    pos += 2
    topic = data[pos:pos + n].decode()
    pos += n
    (count,) = _I32.unpack_from(data, pos)
    return topic, count, pos + 4


class _Header:
    __slots__ = ("_bytes",)

    def __init__(self, data: bytes) -> None:
        self._bytes = data

    def encode(self) -> bytes:
        return self._bytes


class _ResponseHeader:
    __slots__ = ("correlation_id",)

    def __init__(self, correlation_id: int) -> None:
        self.correlation_id = correlation_id


class _Response:
    """An answer, read by ``decode`` from what the connection hands over after the header."""

    __slots__ = ()

    @classmethod
    def decode(cls, buf: BytesIO | bytes) -> Self:
        return cls.parse(buf.read() if isinstance(buf, BytesIO) else buf)

    @classmethod
    def parse(cls, data: bytes) -> Self:
        raise NotImplementedError


class ProduceResponse(_Response):
    """The answer: ``partitions[(topic, partition)] = (error_code, base_offset)``."""

    __slots__ = ("partitions", "throttle_time_ms")

    def __init__(self, partitions: dict[tuple[str, int], tuple[int, int]], throttle_time_ms: int) -> None:
        self.partitions = partitions
        self.throttle_time_ms = throttle_time_ms

    @classmethod
    def parse(cls, data: bytes) -> ProduceResponse:
        out: dict[tuple[str, int], tuple[int, int]] = {}
        (topics,) = _I32.unpack_from(data, 0)
        pos = 4
        for _ in range(topics):
            topic, count, pos = _topic_head(data, pos)
            for _ in range(count):
                partition, error, base, _append, _start = _PARTITION_ANSWER.unpack_from(data, pos)
                pos += _PARTITION_ANSWER.size
                out[(topic, partition)] = (error, base)
        (throttle,) = _I32.unpack_from(data, pos)
        return cls(out, throttle)


class _Request:
    """What ``AIOKafkaConnection.send`` and its reader ask of every request."""

    API_KEY: int
    API_VERSION: int
    NAME: str
    __slots__ = ()

    def prepare(self, versions: dict[int, tuple[int, int]]) -> _Request:
        low, high = versions.get(self.API_KEY, (0, -1))
        if not low <= self.API_VERSION <= high:
            raise IncompatibleBrokerVersion(
                f"the broker does not take {self.NAME} v{self.API_VERSION} (it takes v{low}-v{high})")
        return self

    def build_request_header(self, correlation_id: int, client_id: str) -> _Header:
        cid = client_id.encode()
        return _Header(_HEAD.pack(self.API_KEY, self.API_VERSION, correlation_id, len(cid)) + cid)

    def parse_response_header(self, buf: BytesIO) -> _ResponseHeader:
        (correlation_id,) = _I32.unpack(buf.read(4))
        return _ResponseHeader(correlation_id)


class ProduceRequest(_Request):
    """One produce request: ``batches`` are (topic, partition, encoded record batch)."""

    API_KEY = API_KEY
    API_VERSION = API_VERSION
    NAME = "Produce"
    RESPONSE_TYPE = ProduceResponse
    __slots__ = ("_acks", "_timeout_ms", "_batches")

    def __init__(self, acks: int, timeout_ms: int, batches: Sequence[tuple[str, int, bytes]]) -> None:
        self._acks = acks
        self._timeout_ms = timeout_ms
        self._batches = batches

    @property
    def required_acks(self) -> int:
        """Read by aiokafka's client: 0 would mean the broker sends no answer."""
        return self._acks

    def encode(self) -> bytes:
        by_topic: dict[str, list[tuple[int, bytes]]] = {}
        for topic, partition, records in self._batches:
            by_topic.setdefault(topic, []).append((partition, records))
        parts: list[bytes] = [_BODY_HEAD.pack(-1, self._acks, self._timeout_ms, len(by_topic))]
        for topic, batches in by_topic.items():
            name = topic.encode()
            parts.append(_I16.pack(len(name)) + name + _I32.pack(len(batches)))
            for partition, records in batches:
                parts.append(_PARTITION.pack(partition, len(records)))
                parts.append(records)
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"ProduceRequest(v{API_VERSION}, {len(self._batches)} batches)"


class FetchedPartition:
    """One partition of a fetch answer; ``records``: the record batches as the broker sent
    them (the last one may be cut short), None when there are none."""

    __slots__ = ("topic", "partition", "error_code", "high_watermark", "records")

    def __init__(self, topic: str, partition: int, error_code: int, high_watermark: int,
                 records: bytes | None) -> None:
        self.topic = topic
        self.partition = partition
        self.error_code = error_code
        self.high_watermark = high_watermark
        self.records = records


class FetchResponse(_Response):
    """The answer: a ``FetchedPartition`` per partition asked for."""

    __slots__ = ("partitions", "throttle_time_ms")

    def __init__(self, partitions: list[FetchedPartition], throttle_time_ms: int) -> None:
        self.partitions = partitions
        self.throttle_time_ms = throttle_time_ms

    @classmethod
    def parse(cls, data: bytes) -> FetchResponse:
        out: list[FetchedPartition] = []
        (throttle, topics) = _I32_PAIR.unpack_from(data, 0)
        pos = 8
        for _ in range(topics):
            topic, count, pos = _topic_head(data, pos)
            for _ in range(count):
                partition, error, high_watermark, _stable, _start = _FETCH_ANSWER.unpack_from(data, pos)
                pos += _FETCH_ANSWER.size
                (aborted,) = _I32.unpack_from(data, pos)
                pos += 4 + max(aborted, 0) * _ABORTED
                (size,) = _I32.unpack_from(data, pos)
                pos += 4
                records = None
                if size > 0:
                    records = data[pos:pos + size]
                    pos += size
                out.append(FetchedPartition(topic, partition, error, high_watermark, records))
        return cls(out, throttle)


class FetchRequest(_Request):
    """One fetch (read uncommitted, no fetch session): ``partitions`` are (partition, offset)
    of one topic."""

    API_KEY = FETCH_API_KEY
    API_VERSION = FETCH_API_VERSION
    NAME = "Fetch"
    RESPONSE_TYPE = FetchResponse
    __slots__ = ("_topic", "_partitions", "_max_wait_ms", "_min_bytes", "_max_bytes", "_partition_max_bytes")

    def __init__(self, topic: str, partitions: Sequence[tuple[int, int]], max_wait_ms: int, min_bytes: int,
                 max_bytes: int, partition_max_bytes: int) -> None:
        self._topic = topic
        self._partitions = partitions
        self._max_wait_ms = max_wait_ms
        self._min_bytes = min_bytes
        self._max_bytes = max_bytes
        self._partition_max_bytes = partition_max_bytes

    def encode(self) -> bytes:
        name = self._topic.encode()
        limit = self._partition_max_bytes
        parts = [_FETCH_HEAD.pack(-1, self._max_wait_ms, self._min_bytes, self._max_bytes, 0, 1),
                 _I16.pack(len(name)) + name + _I32.pack(len(self._partitions))]
        parts.extend(_FETCH_PARTITION.pack(partition, offset, -1, limit) for partition, offset in self._partitions)
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"FetchRequest(v{FETCH_API_VERSION}, {self._topic}, {len(self._partitions)} partitions)"

