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
                                   **{"enable.partition.eof": True, "fetch.wait.max.ms": 10}))
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
            for m in c.consume(5000, 0.05):
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        eof.add(m.partition())
                        continue
                    raise RuntimeError(str(m.error()))
                key = m.key().decode() if m.key() is not None else None
                val = orjson.loads(m.value()) if m.value() is not None else None
                hdrs = {k: v.decode() for k, v in K.named_headers(m.headers())}  # ts-load-v1 expanded
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


# -- environment for one extraction test ------------------------------------------------------------

ENV_KEYS = ("CC_API_BASE_URL", "CC_API_KEY", "CC_API_KEY_HEADER", "KAFKA_TOPIC_PREFIX", "ETL_RETRY_DELAY_SECONDS",
            "ETL_MAX_RETRIES", "CC_INCREMENTAL_OVERLAP_SECONDS", "CC_RATE_LIMIT_RPS", "ETL_PARALLEL_JOBS",
            "ETL_JOBS_FILE", "ETL_REQUEST_TIMEOUT_SECONDS", "CC_INSTANCE_ID", "ETL_HTTP_ENGINE",
            "ETL_FANOUT_INCREMENTAL", "ETL_FANOUT_SWEEP_RUNS")


class ExtractEnv:
    """Points TrialSync at a simulator and a private topic prefix for one test (restores on exit)."""

    def __init__(self, sim: Any, prefix: str, **extra: str):
        import os

        self.os = os
        self.values = {"CC_API_BASE_URL": sim.base_url, "CC_API_KEY": sim.api_key,
                       "CC_API_KEY_HEADER": sim.key_header, "KAFKA_TOPIC_PREFIX": prefix,
                       "ETL_RETRY_DELAY_SECONDS": "0.01", **extra}
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> Settings:
        from common import config
        from producers import rate_limit

        for k in ENV_KEYS:
            self.saved[k] = self.os.environ.get(k)
            self.os.environ.pop(k, None)
        self.os.environ.update(self.values)
        config.reset_settings()
        rate_limit._LIMITERS.clear()  # noqa: SLF001 - a fresh limiter per test
        return config.get_settings()

    def __exit__(self, *exc: object) -> None:
        from common import config
        from producers.publisher import reset_publishers

        reset_publishers()  # the process-wide producer must not outlive the test's broker

        for k, v in self.saved.items():
            if v is None:
                self.os.environ.pop(k, None)
            else:
                self.os.environ[k] = v
        config.reset_settings()


def expected_by_key(sim: Any, job: Any, instance: str = "cc1") -> dict[str | None, list[Any]]:
    """The simulator's ground truth for ``job`` as source_id -> [records] (a list, to expose repeats)."""
    from producers.keys import key_builder

    kf = key_builder(job.primary_key, instance)
    out: dict[str | None, list[Any]] = {}
    for e in sim.expected(job=job.id):
        params = {k: str(v) for k, v in (e.get("params") or {}).items()}
        out.setdefault(kf(e["record"], params), []).append(e["record"])
    return out


def run_row(settings: Settings, run_id: int) -> dict[str, Any]:
    with connect(settings, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM etl.dw_etl_runs WHERE id = %s", (run_id,))
        cols = [d.name for d in cur.description]
        row = cur.fetchone()
    assert row is not None, f"no run {run_id}"
    return dict(zip(cols, row, strict=True))


def control_messages(settings: Settings, run_id: int) -> list[Any]:
    from schemas.messages import parse_control

    return [parse_control(orjson.dumps(m.value)) for m in read_topic(settings, K.control_topic(settings))
            if m.key == str(run_id)]


def seed_parents_from_sim(settings: Settings, sim: Any, job_id: int, table: str, instance: str = "cc1") -> int:
    """Fill a parent staging table with the simulator's ground truth of the job that produces it."""
    from common.catalog import load_catalog
    from producers.keys import key_builder

    job = load_catalog(settings).get(job_id)
    kf = key_builder(job.primary_key, instance)
    rows = []
    for e in sim.expected(job=job_id):
        params = {k: str(v) for k, v in (e.get("params") or {}).items()}
        rows.append(Msg("", 0, 0, kf(e["record"], params), e["record"], {}))
    return load_into_staging(settings, table, rows)


def truncate(settings: Settings, *tables: str) -> None:
    from psycopg import sql

    with connect(settings, autocommit=True) as conn:
        for t in tables:
            conn.execute(sql.SQL("TRUNCATE {}").format(staging_table(t)))
