"""Dead letters: records the loader cannot load go to a DLQ topic AND to ``etl.dw_etl_rejects``.

* Topic ``<prefix>.dlq.<table>`` (``common.kafka.dlq_topic``); records whose topic maps to no
  valid table name go to ``<prefix>.dlq.unrouted``. Key and value are the original bytes; the
  headers are the original ones (a ``ts-load-v1`` header expanded into the named ``ts-run-id``,
  ``ts-job-id``, ... it carries) plus ``ts-error``, ``ts-error-class``, ``ts-src-topic``,
  ``ts-src-partition`` and ``ts-src-offset`` -- enough to find, fix and re-publish the record.
* Row in ``etl.dw_etl_rejects``: its unique index on (topic, partition, offset) makes the insert
  idempotent when a batch is replayed after a crash (the DLQ topic itself is at-least-once: a
  replayed batch can publish a dead letter twice, with identical content).
* Both happen inside the batch's flow *before* the consumer offsets move: the DLQ publish is
  flushed (delivery confirmed) before the database transaction commits, and the rejects rows are
  part of that transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import psycopg

from common.config import Settings, get_settings
from common.kafka import (
    H_ERROR,
    H_ERROR_CLASS,
    H_JOB_ID,
    H_RUN_ID,
    H_SRC_OFFSET,
    H_SRC_PARTITION,
    H_SRC_TOPIC,
    dlq_topic,
    ensure_topics,
    named_headers,
    producer_config,
    topic_prefix,
)
from common.logging import get_logger
from common.metrics import RECORDS_REJECTED
from consumers.staging_writer import Reject

UNROUTED = "unrouted"
_DLQ_HEADERS = {H_ERROR, H_ERROR_CLASS, H_SRC_TOPIC, H_SRC_PARTITION, H_SRC_OFFSET}
_MAX_ERROR = 1000

log = get_logger("loader.dlq")


class DlqUnavailable(RuntimeError):
    """The broker did not confirm the dead letters: the batch must be retried, not committed."""


def dlq_topic_for(table: str | None, settings: Settings | None = None) -> str:
    """``<prefix>.dlq.<table>``, or ``<prefix>.dlq.unrouted`` when there is no valid table name."""
    if table:
        try:
            return dlq_topic(table, settings)
        except ValueError:
            pass
    return f"{topic_prefix(settings)}.dlq.{UNROUTED}"


def _int_header(r: Reject, name: str, limit: int) -> int | None:
    v = r.header(name)
    if v and v.isdigit() and len(v) <= limit:
        return int(v)
    return None


def _text(b: bytes | None) -> str | None:
    if b is None:
        return None
    return b.decode("utf-8", errors="replace").replace("\x00", "\\u0000")


class DeadLetters:
    """Publishes rejects to DLQ topics and records them in ``etl.dw_etl_rejects``."""

    def __init__(self, settings: Settings | None = None, flush_timeout: float = 30.0):
        self.settings = settings or get_settings()
        self.flush_timeout = flush_timeout
        self._producer: Any = None  # a confluent_kafka.Producer, created on first use
        self._topics: set[str] = set()
        self._lock = threading.Lock()

    def _get_producer(self):  # -> confluent_kafka.Producer
        if self._producer is None:
            from confluent_kafka import Producer

            from common.kafka import RdkafkaLog

            self._producer = Producer(producer_config(self.settings, **{
                "client.id": "trialsync-loader-dlq", "logger": RdkafkaLog()}))
        return self._producer

    def publish(self, rejects: Sequence[tuple[str | None, Reject]]) -> None:
        """Produce every ``(table, reject)`` to its DLQ topic and wait for the broker's confirmation."""
        if not rejects:
            return
        from confluent_kafka import KafkaException

        topics = {dlq_topic_for(t, self.settings) for t, _ in rejects}
        missing = topics - self._topics
        if missing:
            try:
                ensure_topics(sorted(missing), self.settings)
            except KafkaException as e:
                raise DlqUnavailable(f"cannot create dead-letter topics {sorted(missing)}: {e}") from None
            self._topics |= missing
        p = self._get_producer()
        failures: list[str] = []

        def on_delivery(err, _msg) -> None:
            if err is not None:
                failures.append(str(err))

        for table, r in rejects:
            # the named headers (ts-run-id, ...), also from ts-load-v1: a dead letter is read by people
            headers = [(k, v) for k, v in named_headers(r.headers) if k not in _DLQ_HEADERS]
            headers += [
                (H_ERROR, r.message[:_MAX_ERROR].encode("utf-8", errors="replace")),
                (H_ERROR_CLASS, r.error_class.encode()),
                (H_SRC_TOPIC, r.topic.encode()),
                (H_SRC_PARTITION, str(r.partition).encode()),
                (H_SRC_OFFSET, str(r.offset).encode()),
            ]
            while True:
                try:
                    p.produce(dlq_topic_for(table, self.settings), key=r.key, value=r.value, headers=headers,
                              on_delivery=on_delivery)
                    break
                except BufferError:
                    p.poll(0.1)
        left = p.flush(self.flush_timeout)
        if left or failures:
            if left:
                p.purge(in_queue=True, in_flight=False)
                p.flush(1.0)
            raise DlqUnavailable(
                f"broker did not confirm {left or len(failures)} dead letter(s)"
                + (f": {failures[0]}" if failures else "") + "; the batch will be retried")

    @staticmethod
    def record(conn: psycopg.Connection, rejects: Sequence[tuple[str | None, Reject]]) -> None:
        """Insert the rejects into etl.dw_etl_rejects (idempotent per topic/partition/offset)."""
        if not rejects:
            return
        rows = [
            (t, r.topic, r.partition, r.offset, _text(r.key), _int_header(r, H_JOB_ID, 9),
             _int_header(r, H_RUN_ID, 18), r.error_class[:100], r.message, _text(r.value))
            for t, r in rejects
        ]
        with conn.cursor() as cur:
            cur.executemany(
                """INSERT INTO etl.dw_etl_rejects (table_name, topic, kafka_partition, kafka_offset, record_key,
                                                   job_id, run_id, stage, error_class, error_message, payload)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, 'load', %s, %s, %s)
                   ON CONFLICT (topic, kafka_partition, kafka_offset)
                       WHERE topic IS NOT NULL AND kafka_offset IS NOT NULL
                   DO UPDATE SET table_name = EXCLUDED.table_name, record_key = EXCLUDED.record_key,
                                 job_id = EXCLUDED.job_id, run_id = EXCLUDED.run_id,
                                 error_class = EXCLUDED.error_class, error_message = EXCLUDED.error_message,
                                 payload = EXCLUDED.payload, created_at = now()
                   WHERE (etl.dw_etl_rejects.record_key, etl.dw_etl_rejects.payload, etl.dw_etl_rejects.run_id)
                         IS DISTINCT FROM (EXCLUDED.record_key, EXCLUDED.payload, EXCLUDED.run_id)""",
                rows,
            )

    @staticmethod
    def count(rejects: Sequence[tuple[str | None, Reject]]) -> None:
        for t, r in rejects:
            RECORDS_REJECTED.labels(t or UNROUTED, "load", r.error_class).inc()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(5.0)
            self._producer = None
