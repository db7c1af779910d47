"""Helpers for the extractor's integration tests: read a topic to its end, and a *minimal* test
loader that upserts a bronze topic into its staging table so parameterized jobs find parents.

The real loader is consumers/loader.py (issue 5); this one exists so the extractor's tests do not
depend on it: plain ``INSERT … ON CONFLICT (source_id)`` of the last message per key, tombstones
soft-delete, null keys skipped.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from common import kafka as K
from common.config import Settings
from common.db import connect, staging_table


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: Any
    headers: dict[str, str]


def read_topic(settings: Settings, topic: str, timeout: float = 60.0) -> list[Msg]:
    """Every message of ``topic`` (all partitions, from the beginning to the end)."""
    import time

    c = Consumer(K.consumer_config(f"test-reader-{uuid.uuid4().hex[:8]}", settings,
                                   **{"enable.partition.eof": True}))
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None:
            return []
        parts = sorted(md.partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out: list[Msg] = []
        eof: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(eof) < len(parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: no end after {timeout} s ({len(out)} messages)")
            for m in c.consume(5000, 0.5):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add(m.partition())
                        continue
                    raise RuntimeError(str(m.error()))
                key = m.key().decode() if m.key() is not None else None
                val = orjson.loads(m.value()) if m.value() is not None else None
                hdrs = {k: (v.decode() if v is not None else None) for k, v in (m.headers() or [])}
                out.append(Msg(m.topic(), m.partition(), m.offset(), key, val, hdrs))
        return out
    finally:
        c.close()


def load_into_staging(settings: Settings, table: str, messages: list[Msg] | None = None) -> int:
    """Upsert a bronze topic into ``bronze.<table>`` (last message per key wins); return rows written."""
    msgs = messages if messages is not None else read_topic(settings, K.bronze_topic(table, settings))
    last: dict[str, Msg] = {}
    for m in msgs:
        if m.key is not None:
            last[m.key] = m
    rows = [(k, orjson.dumps(m.value).decode() if m.value is not None else None, m.value is None)
            for k, m in last.items()]
    from psycopg import sql

    q = sql.SQL("""INSERT INTO {t} (source_id, data, is_deleted)
                   VALUES (%s, coalesce(%s::jsonb, '{{}}'::jsonb), %s)
                   ON CONFLICT (source_id) DO UPDATE SET data = CASE WHEN EXCLUDED.is_deleted THEN {t}.data
                        ELSE EXCLUDED.data END, is_deleted = EXCLUDED.is_deleted, updated_at = now()""").format(
        t=staging_table(table))
    with connect(settings) as conn, conn.transaction(), conn.cursor() as cur:
        cur.executemany(q, rows)
    return len(rows)
