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


def test_a_run_never_waits_silently_on_a_broker_that_takes_nothing() -> None:
    """Issue 16: a broker that went away mid-run (restarted, lost the producer's state) left a run
    waiting with its heartbeat alive for minutes. Waiting for acknowledgements and a full local
    queue both end after ETL_STALL_SECONDS with the reason, and the producer is marked for
    replacement (the retry gets a new one)."""
    import time

    from producers.keys import key_builder

    s = Settings(kafka_bootstrap_servers="127.0.0.1:1", kafka_topic_prefix="stalltest", enable_metrics=False,
                 etl_stall_seconds=1.5)
    p = pub_mod.Publisher(s)
    tracker = pub_mod.DeliveryTracker("stalltest.bronze.x")
    recs = [{"id": i} for i in range(20)]
    p.publish_page("stalltest.bronze.x", recs, key_builder(("id",), "cc1"), None, [], tracker)
    t0 = time.monotonic()
    with pytest.raises(pub_mod.PublishError, match="answered nothing for 2 s .ETL_STALL_SECONDS"):
        p.wait(tracker)
    assert 1.4 < time.monotonic() - t0 < 10 and p.fatal
    # a producer known to be unusable is never waited on again: the next wait fails at once
    t1 = time.monotonic()
    with pytest.raises(pub_mod.PublishError, match="unusable"):
        p.wait(tracker)
    assert time.monotonic() - t1 < 1
    p.producer.purge()


def test_a_full_queue_fails_the_run_after_the_stall_time() -> None:
    import time

    from producers.keys import key_builder

    s = Settings(kafka_bootstrap_servers="127.0.0.1:1", kafka_topic_prefix="fulltest", enable_metrics=False,
                 etl_stall_seconds=1.0)
    p = pub_mod.Publisher(s, producer=None)
    p.producer = pub_mod.Producer({"bootstrap.servers": "127.0.0.1:1", "queue.buffering.max.messages": 50,
                                   "log_level": 0})
    tracker = pub_mod.DeliveryTracker("fulltest.bronze.x")
    t0 = time.monotonic()
    with pytest.raises(pub_mod.PublishError, match="took no records for 1 s"):
        p.publish_page("fulltest.bronze.x", [{"id": i} for i in range(200)], key_builder(("id",), "cc1"), None, [],
                       tracker)
    assert time.monotonic() - t0 < 10 and p.fatal
    assert tracker.produced == 50  # what got into the queue is counted; the rest was never produced
    assert len(p.producer) == 50
    p.producer.purge()


def test_the_heartbeat_tells_a_run_that_made_no_progress() -> None:
    import threading
    import time

    from producers.runs import Heartbeat

    s = Settings(database_url="postgresql://nobody@127.0.0.1:1/x", etl_stall_seconds=0.5)
    stalled: list[float] = []
    done = threading.Event()
    moving = {"n": 0}

    def counters() -> dict:
        return {"records_extracted": moving["n"], "api_calls": 3}

    def on_stall(seconds: float) -> None:
        stalled.append(seconds)
        done.set()

    hb = Heartbeat(s, 1, counters, interval=0.1, on_stall=on_stall).start()
    try:
        for _ in range(8):  # progress: no stall
            moving["n"] += 1
            time.sleep(0.1)
        assert not stalled
        assert done.wait(5)  # then nothing moves: told once (the database being away does not matter)
        time.sleep(0.8)
        assert len(stalled) == 1 and stalled[0] >= 0.5
    finally:
        hb.stop()
