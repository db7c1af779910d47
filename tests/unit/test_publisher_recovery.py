"""A publisher whose idempotent producer hit a fatal error is replaced for the next run.

Found by the fault suite (broker restart with tansu's S3 storage): "out of order sequence number"
made a pooled extraction worker's producer fatal, and every later job the worker ran failed at once
with "Unable to produce message: Local: Fatal error"."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from common.config import Settings
from producers import publisher as pub_mod


def test_fatal_publisher_is_replaced_and_healthy_one_reused() -> None:
    s = Settings(kafka_bootstrap_servers="127.0.0.1:1", kafka_topic_prefix="fataltest", enable_metrics=False)
    pub_mod.reset_publishers()
    try:
        first = pub_mod.get_publisher(s)
        assert pub_mod.get_publisher(s) is first  # reused while healthy
        first._on_error(KafkaError(KafkaError._TRANSPORT, "broker down", fatal=False))
        assert first.fatal is None and pub_mod.get_publisher(s) is first  # transient errors change nothing
        first._on_error(KafkaError(KafkaError._FATAL, "out of order sequence number", fatal=True))
        assert first.fatal
        second = pub_mod.get_publisher(s)
        assert second is not first and second.fatal is None
    finally:
        pub_mod._PUBLISHERS.clear()


class _Topic:
    def __init__(self, partitions: int):
        self.partitions = dict.fromkeys(range(partitions))
        self.error = None


class _Metadata:
    def __init__(self, topics: dict[str, int]):
        self.topics = {t: _Topic(n) for t, n in topics.items()}


class _Producer:
    def __init__(self, topics: dict[str, int]):
        self.broker_topics = topics
        self.purged = False

    def list_topics(self, timeout: float = 5.0) -> _Metadata:
        return _Metadata(self.broker_topics)

    def purge(self) -> None:
        self.purged = True

    def flush(self, timeout: float = 0) -> int:
        return 0


@pytest.mark.parametrize("after_restart", [{"b": 3}, {"a": 4, "b": 3}], ids=["topic gone", "topic recreated"])
def test_a_broker_that_lost_its_topics_gets_a_new_producer(after_restart: dict[str, int]) -> None:
    """Found by the fault suite: after an embedded (memory) broker restart, a pooled worker's
    publisher still believed its topics existed (tansu even re-creates them, with 4 partitions, on a
    metadata request); its records were never acknowledged and every later run of that worker failed
    after 60 s."""
    s = Settings(kafka_bootstrap_servers="127.0.0.1:1", kafka_topic_prefix="losttest", enable_metrics=False)
    prod = _Producer({"a": 3, "b": 3})
    pub = pub_mod.Publisher(s, producer=prod)  # type: ignore[arg-type]
    pub._topics.update({"a", "b"})
    pub_mod.reset_publishers()
    key = (s.kafka_bootstrap_servers, s.kafka_topic_prefix)
    pub_mod._PUBLISHERS[key] = pub
    try:
        assert pub.refresh_topics() and pub_mod.get_publisher(s) is pub  # nothing changed: reused
        prod.broker_topics = after_restart
        fresh = pub_mod.get_publisher(s)
        assert fresh is not pub and prod.purged
        assert pub.fatal and "lost 1 topic" in pub.fatal
    finally:
        pub_mod._PUBLISHERS.clear()
