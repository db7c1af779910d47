"""A publisher whose idempotent producer hit a fatal error is replaced for the next run.

Found by the fault suite (broker restart with tansu's S3 storage): "out of order sequence number"
made a pooled extraction worker's producer fatal, and every later job the worker ran failed at once
with "Unable to produce message: Local: Fatal error"."""

from __future__ import annotations

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
