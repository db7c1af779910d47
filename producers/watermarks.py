"""Incremental state: the ``modifiedDate`` watermark of a job (and of each parent, for
parameterized jobs).

A watermark is the **maximum timestamp among the records a run published** (the server's clock,
never ours), per job and ``parent_key`` (canonical JSON of the parameter dict, ``''`` for plain
jobs). It is committed only after the run's records are acknowledged by the broker, so a crash
can never move it past records that were not delivered.

Where it lives:

* the compacted topic ``<prefix>.state.watermarks`` (key ``<job_id>:<parent_key>``, value a
  :class:`schemas.messages.Watermark`) -- the design card's "offsets and watermarks are the
  incremental state", readable by any consumer;
* the table ``etl.dw_etl_watermarks``, written in the same step.

Reading uses the database mirror (indexed, never ahead of the topic); the topic is read only when
the mirror has nothing for the job. The embedded broker keeps topics in memory only, so after a
broker restart the topic is empty: **the database mirror is then the source of truth** and the
next commit re-publishes the state.

The next incremental request filters ``<timestamp_field> gt <watermark - overlap>``
(``CC_INCREMENTAL_OVERLAP_SECONDS``): records committed late with an earlier timestamp, or
modified within the same second, are fetched again rather than missed; the upserting loader makes
the repeats harmless.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg

from common import kafka as K
from common.config import Settings
from common.logging import get_logger
from producers.publisher import DeliveryTracker, Publisher
from schemas.messages import Watermark

log = get_logger("watermarks")


def parse_timestamp(value: Any) -> datetime | None:
    """A record's timestamp as an aware UTC datetime (naive values are taken as UTC); None if unparseable."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            # .NET-style 7-digit fractions: trim to microseconds
            try:
                head, _, frac = s.partition(".")
                digits = "".join(c for c in frac if c.isdigit())
                tz = frac[len(digits):]
                dt = datetime.fromisoformat(f"{head}.{digits[:6]}{tz}")
            except ValueError:
                return None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # epoch seconds or milliseconds
        v = float(value)
        dt = datetime.fromtimestamp(v / 1000 if v > 1e11 else v, UTC)
    else:
        return None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def max_timestamp(values: Iterable[Any]) -> datetime | None:
    best: datetime | None = None
    for v in values:
        dt = parse_timestamp(v)
        if dt is not None and (best is None or dt > best):
            best = dt
    return best


def odata_literal(dt: datetime) -> str:
    """OData DateTimeOffset literal in UTC with milliseconds, rounded down (never less overlap):
    ``2025-12-01T20:30:52.179Z``. Milliseconds matter: with whole seconds, every incremental run
    would fetch again the records of the watermark's own second."""
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{dt.microsecond // 1000:03d}Z"


def filter_expression(field: str, watermark: datetime, overlap_seconds: float) -> str:
    return f"{field} gt {odata_literal(watermark - timedelta(seconds=overlap_seconds))}"


# -- reading -------------------------------------------------------------------------------------

def load_from_db(conn: psycopg.Connection, job_id: int) -> dict[str, datetime]:
    rows = conn.execute("SELECT parent_key, value FROM etl.dw_etl_watermarks WHERE job_id = %s", (job_id,)).fetchall()
    return {pk: v for pk, v in rows}


def load_from_topic(settings: Settings, job_id: int, timeout: float = 20.0) -> dict[str, datetime] | None:
    """Read the compacted topic to its end and keep this job's latest values; None if it is absent."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    topic = K.watermark_topic(settings)
    cfg = K.consumer_config(f"trialsync-wm-reader-{uuid.uuid4().hex[:8]}", settings,
                            **{"enable.partition.eof": True, "partition.assignment.strategy": "range",
                               "fetch.wait.max.ms": 10})
    c = Consumer(cfg)
    try:
        md = c.list_topics(topic, timeout=10)
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            return None
        parts = sorted(tmd.partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        prefix = f"{job_id}:".encode()
        out: dict[str, datetime] = {}
        eof: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(eof) < len(parts):
            if time.monotonic() > deadline:
                log.warning("watermark_topic_read_timeout", job_id=job_id, topic=topic, timeout_s=timeout)
                return out or None
            msgs = c.consume(10000, 0.05)
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        eof.add(cast(int, m.partition()))  # a consumed message always has its partition
                    continue
                key = m.key()
                if not key or not key.startswith(prefix):
                    continue
                pk = key[len(prefix):].decode()
                value = m.value()
                if value is None:
                    out.pop(pk, None)
                    continue
                try:
                    wm = Watermark.model_validate_json(value)
                except ValueError:
                    continue
                out[pk] = wm.value.astimezone(UTC)
        return out
    finally:
        c.close()


def load(conn: psycopg.Connection, settings: Settings, job_id: int, *, use_topic: bool = True) -> dict[str, datetime]:
    """The job's watermarks.

    The database mirror is read first: an indexed lookup, written in the same step as the topic
    and never ahead of it (a crash between the two leaves the mirror *older*, which only widens
    the next filter). The compacted topic is read only when the mirror has nothing for the job --
    a new warehouse database next to an existing broker -- because reading it means scanning every
    job's keys to the end. With the embedded broker the topic is memory-only, so after a broker
    restart the mirror is the source of truth.
    """
    merged = load_from_db(conn, job_id)
    if merged or not use_topic:
        return merged
    try:
        from_topic = load_from_topic(settings, job_id)
    except Exception as e:  # noqa: BLE001 - no state at all means a full fetch, never a wrong one
        log.warning("watermark_topic_unreadable", job_id=job_id, error=str(e))
        return merged
    if from_topic:
        log.info("watermarks_restored_from_topic", job_id=job_id, keys=len(from_topic))
    return from_topic or {}


# -- writing -------------------------------------------------------------------------------------

def commit(conn: psycopg.Connection, publisher: Publisher, *, job_id: int, field: str, run_id: int,
           values: Mapping[str, datetime], previous: Mapping[str, datetime] | None = None,
           wait_timeout: float = 120.0) -> dict[str, datetime]:
    """Publish and mirror new watermarks (never moving one backwards); return what was written.

    Call only after the run's records are acknowledged by the broker.
    """
    prev = previous or {}
    final = {pk: (max(v, prev[pk]) if pk in prev else v) for pk, v in values.items()}
    if not final:
        return {}
    topic = K.watermark_topic(publisher.settings)
    now = datetime.now(UTC)
    tracker = DeliveryTracker(topic)
    publisher.publish_values(
        topic,
        ((f"{job_id}:{pk}".encode(), Watermark(job_id=job_id, parent_key=pk, field=field, value=v, run_id=run_id,
                                               updated_at=now).to_bytes())
         for pk, v in final.items()),
        None, tracker,
    )
    publisher.wait(tracker, timeout=wait_timeout)
    if tracker.failed:
        log.warning("watermark_topic_publish_failed", job_id=job_id, failed=tracker.failed, error=tracker.first_error)
    keys = list(final)
    conn.execute(
        """INSERT INTO etl.dw_etl_watermarks (job_id, parent_key, field, value, run_id, updated_at)
           SELECT %s, k, %s, v, %s, now() FROM unnest(%s::text[], %s::timestamptz[]) AS u(k, v)
           ON CONFLICT (job_id, parent_key) DO UPDATE
              SET value = GREATEST(etl.dw_etl_watermarks.value, EXCLUDED.value), field = EXCLUDED.field,
                  run_id = EXCLUDED.run_id, updated_at = now()""",
        (job_id, field, run_id, keys, [final[k] for k in keys]),
    )
    return final
