"""The kafka mark cannot be forgotten: tests/conftest.py refuses a test that uses a Kafka
fixture without it (at collection) or starts a broker without it (at run time), so
``-m "not kafka"`` never needs a broker. Pure: nothing here starts Java."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stickystate.kafka_local import LocalKafka
from tests.conftest import unmarked_kafka_tests


def fake_item(nodeid: str, fixtures: tuple[str, ...], marks: tuple[str, ...]) -> Any:
    return SimpleNamespace(nodeid=nodeid, fixturenames=list(fixtures),
                           get_closest_marker=lambda name: object() if name in marks else None)


def test_a_test_using_a_kafka_fixture_without_the_mark_is_named() -> None:
    items = [
        fake_item("t::forgot", ("api", "cluster", "kafka_bootstrap", "tmp_path_factory"), ()),
        fake_item("t::marked", ("cluster", "kafka_bootstrap"), ("kafka",)),
        fake_item("t::slow_only", ("kafka_bootstrap",), ("slow",)),
        fake_item("t::pure", ("tmp_path",), ()),
        fake_item("t::marked_pure", ("tmp_path",), ("kafka",)),  # starts its own broker, say
    ]
    assert unmarked_kafka_tests(items) == ["t::forgot", "t::slow_only"]


def test_starting_a_broker_from_an_unmarked_test_fails_it(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "kafka")
    try:
        with pytest.raises(pytest.fail.Exception, match="test_tiers.py::.* starts a Kafka broker but is not marked kafka"):
            broker.start()
        assert not broker.is_running()
    finally:
        broker.stop()  # only if the guard let it start: then the test has failed already
