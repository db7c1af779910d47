"""Replay a bronze topic into its staging table: ``trialsync replay --table T``.

Why and how:

* A fresh, throwaway consumer (manual assignment, a unique group id, offsets never committed) reads
  the table's topic -- from the beginning, from a point in time (``offsets_for_times``, then
  filtered by the message timestamp), or only the records of one run (``ts-run-id``, stopping at
  the run's end offsets) -- and writes through the loader's own :class:`~consumers.loader.BatchSink`,
  so replayed records get exactly the same treatment (upsert, stale-write fence, tombstones,
  dead letters). Replays do not touch per-run load accounting.
* Without ``--truncate`` it is an idempotent upsert: rows only move forward (the fence keeps
  anything newer the live loader wrote), nothing is deleted.
* With ``--truncate`` the table is *rebuilt*: the topic is loaded into an unlogged shadow table,
  then ONE transaction makes the staging table equal to it (delete rows the topic does not have,
  upsert the rest, under the same fence). Readers see the old content until that commit, never
  an empty table; live loader writes that arrive meanwhile are kept (rows loaded after the replay
  started are not deleted, and no row goes back to older content). Hand-edited or corrupted rows
  are restored to what the topic says.
* **History check.** The embedded broker keeps topics in memory and loses them on restart, and
  retention can drop the head of a topic. Before anything is deleted the shadow is compared with
  the table: if live (not soft-deleted) rows of the table are missing from the topic, the rebuild
  is refused and the table is left as it was. An empty or missing topic is refused up front.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql

from common.config import Settings, get_settings
from common.db import BRONZE, connect, ident, scalar, staging_table
from common.kafka import H_RUN_ID, RdkafkaLog, bronze_topic, consumer_config, header_value, topic_prefix
from common.logging import get_logger
from consumers.loader import BatchSink, DatabaseUnavailable
from consumers.staging_writer import WriteResult
from schemas.jobs import check_identifier

log = get_logger("replay")

Mode = Literal["beginning", "since", "run"]
# what the rebuild copies from the shadow (the staging pattern + the loader's columns); id and
# created_at of surviving rows are kept
_CONTENT = ("data", "source_instance_id", "etl_job_id", "etl_run_id", "source_modified_at", "is_deleted",
            "deleted_at", "kafka_partition", "kafka_offset", "extracted_at", "source_params", "loaded_at",
            "updated_at", "kafka_timestamp_ms", "content_hash")


class ReplayError(RuntimeError):
    """The replay cannot (or must not) proceed; the message says why and what to do."""


@dataclass
class ReplayOptions:
    table: str
    mode: Mode = "beginning"
    since: datetime | None = None
    run_id: int | None = None
    truncate: bool = False
    batch_size: int = 10_000
    #: give up when the broker delivers nothing (no message, no end-of-partition) for this long
    stall_timeout_s: float = 60.0


@dataclass
class ReplayResult:
    table: str
    topic: str
    mode: str
    records_read: int = 0
    records_replayed: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    rejected: int = 0
    rows_before: int = 0
    rows_after: int = 0
    rebuilt: bool = False
    rows_removed: int = 0
    first_offsets: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


Progress = Callable[[int, int | None], None]  # (records read, total estimate or None)


def _count(conn: psycopg.Connection, table: str) -> int:
    return int(scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(staging_table(table))))


def ensure_table(conn: psycopg.Connection, table: str) -> bool:
    """Make sure bronze.<table> exists; recreate it (a dropped table) when a job targets it.

    Returns True when it was created. Unknown tables are an error: replay does not invent tables.
    """
    if scalar(conn, "SELECT to_regclass(%s)", (f"{BRONZE}.{table}",)) is not None:
        conn.execute("SELECT etl.add_loader_columns(%s)", (table,))
        return False
    known = scalar(conn, "SELECT count(*) FROM etl.dw_etl_jobs WHERE target_table = %s", (table,))
    if not known:
        raise ReplayError(f"table bronze.{table} does not exist and no job targets it: check the name "
                          "(`trialsync jobs list`) or add the job and run `trialsync jobs sync`")
    conn.execute("SELECT etl.create_staging_table(%s)", (table,))
    conn.execute("SELECT etl.add_loader_columns(%s)", (table,))
    log.info("staging_table_recreated", table=table)
    return True


def replay(opts: ReplayOptions, settings: Settings | None = None, progress: Progress | None = None) -> ReplayResult:
    """Run a replay; raises ReplayError (nothing changed) when it must not proceed."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    s = settings or get_settings()
    table = check_identifier(opts.table, "staging table name")
    if opts.truncate and opts.mode != "beginning":
        raise ReplayError("--truncate rebuilds the whole table from the whole topic: use it with --from-beginning "
                          "(or drop --truncate to upsert just the selected records)")
    topic = bronze_topic(table, s)
    res = ReplayResult(table=table, topic=topic, mode=opts.mode)
    t0 = time.monotonic()
    with connect(s, autocommit=True, application_name="trialsync-replay") as conn:
        ensure_table(conn, table)
        res.rows_before = _count(conn, table)
        end_offsets: dict[int, int] = {}
        if opts.mode == "run":
            end_offsets = _run_end_offsets(conn, opts.run_id, topic)
        started_db = scalar(conn, "SELECT now()")

    group = f"{topic_prefix(s)}-replay-{table[:40]}-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(consumer_config(group, s, **{
        "enable.partition.eof": True, "client.id": f"trialsync-replay-{os.getpid()}",
        "auto.offset.reset": "earliest", "logger": RdkafkaLog()}))
    shadow: str | None = None
    sink: BatchSink | None = None
    try:
        md = consumer.list_topics(topic, timeout=15)
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None or not tmd.partitions:
            raise ReplayError(_no_history(topic, table, res.rows_before, "does not exist on the broker"))
        parts = sorted(tmd.partitions)
        if opts.mode == "since":
            assert opts.since is not None
            ts_ms = int(opts.since.timestamp() * 1000)
            found = consumer.offsets_for_times([TopicPartition(topic, p, ts_ms) for p in parts], timeout=15)
            starts = {tp.partition: tp.offset for tp in found}
        else:
            starts = {p: OFFSET_BEGINNING for p in parts}
        if opts.mode == "run":
            parts = [p for p in parts if p in end_offsets]
        # a partition whose start is "end" (-1) has nothing after the timestamp
        todo = {p for p in parts if starts.get(p, OFFSET_BEGINNING) != -1}
        if opts.truncate:
            shadow = f"_replay_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            _create_shadow(s, table, shadow)
            target_name = shadow

            def target(t: str) -> tuple[str, str]:
                return (SHADOW_SCHEMA, target_name)
        else:
            def target(t: str) -> tuple[str, str]:
                return (BRONZE, t)
        sink = BatchSink(s, group, account=False, target=target, application_name="trialsync-replay",
                         verify_data=True)
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
        _read(consumer, sink, opts, res, todo, end_offsets, progress, KafkaError, TopicPartition)
        if res.records_read == 0:
            raise ReplayError(_no_history(topic, table, res.rows_before, "holds no records for this replay"))
        if opts.truncate:
            assert shadow is not None
            _swap(s, table, shadow, started_db, res)
        with connect(s, autocommit=True, application_name="trialsync-replay") as conn:
            res.rows_after = _count(conn, table)
    finally:
        consumer.close()
        if sink is not None:
            sink.close()
        if shadow is not None:
            _drop_shadow(s, shadow)
    res.seconds = round(time.monotonic() - t0, 3)
    log.info("replay_finished", **{k: v for k, v in res.as_dict().items() if k != "first_offsets"})
    return res


def _no_history(topic: str, table: str, rows: int, what: str) -> str:
    return (f"topic {topic} {what}: its history is gone (the embedded broker keeps topics in memory and "
            f"loses them when it restarts; retention may have removed old records). Nothing was changed: "
            f"bronze.{table} still has its {rows} rows. Re-extract the table's jobs (full run) to "
            "republish the records, then replay again")


def _run_end_offsets(conn: psycopg.Connection, run_id: int | None, topic: str) -> dict[int, int]:
    if run_id is None:
        raise ReplayError("--run-id needs a run id")
    row = conn.execute("SELECT run_context -> 'end_offsets', run_context ->> 'topic' FROM etl.dw_etl_runs "
                       "WHERE id = %s", (run_id,)).fetchone()
    if row is None:
        raise ReplayError(f"run {run_id} does not exist in etl.dw_etl_runs")
    ends, run_topic = row
    if run_topic and run_topic != topic:
        raise ReplayError(f"run {run_id} published to {run_topic}, not to {topic}: pick the table that run loads")
    if not isinstance(ends, dict) or not ends:
        raise ReplayError(f"run {run_id} has no recorded end offsets (it published nothing, or did not finish): "
                          "nothing to replay")
    return {int(p): int(o) for p, o in ends.items()}


def _read(consumer: Any, sink: BatchSink, opts: ReplayOptions, res: ReplayResult, todo: set[int],
          end_offsets: dict[int, int], progress: Progress | None, KafkaError: Any, TopicPartition: Any) -> None:  # noqa: N803
    topic = res.topic
    run_raw = str(opts.run_id).encode() if opts.run_id is not None else None
    since_ms = int(opts.since.timestamp() * 1000) if opts.since is not None else None
    pending: dict[tuple[str, int], list[Any]] = {}
    pending_n = 0
    last_activity = time.monotonic()
    total: int | None = None
    active = set(todo)

    def flush() -> None:
        nonlocal pending, pending_n
        if not pending_n:
            return
        backoff = 0.5
        while True:
            try:
                results = sink.write(pending)
                break
            except DatabaseUnavailable as e:
                log.warning("replay_backing_off", error=str(e)[:300], retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(30.0, backoff * 2)
        for _table, r in results.values():
            _add_result(res, r)
        res.records_replayed += pending_n
        pending, pending_n = {}, 0

    while active:
        msgs = consumer.consume(num_messages=opts.batch_size, timeout=1.0)
        if not msgs:
            if time.monotonic() - last_activity > opts.stall_timeout_s:
                raise ReplayError(f"the broker delivered nothing for {opts.stall_timeout_s:g} s while replaying "
                                  f"{topic} (partitions {sorted(active)} not finished): is it up?")
            continue
        last_activity = time.monotonic()
        for m in msgs:
            err = m.error()
            p = m.partition()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if p in active:
                        active.discard(p)
                        consumer.pause([TopicPartition(topic, p)])
                elif err.fatal():
                    raise ReplayError(f"broker error while replaying {topic}: {err.str()}")
                continue
            if p not in active:
                continue
            off = m.offset()
            res.first_offsets.setdefault(p, off)
            if p in end_offsets and off > end_offsets[p]:
                active.discard(p)
                consumer.pause([TopicPartition(topic, p)])
                continue
            res.records_read += 1
            if run_raw is not None and _header(m, H_RUN_ID) != run_raw:
                continue
            if since_ms is not None and m.timestamp()[1] < since_ms:
                continue
            lst = pending.get((topic, p))
            if lst is None:
                lst = pending[(topic, p)] = []
            lst.append(m)
            pending_n += 1
            if p in end_offsets and off >= end_offsets[p]:
                active.discard(p)
                consumer.pause([TopicPartition(topic, p)])
        if pending_n >= opts.batch_size:
            flush()
        if progress is not None:
            if total is None:
                total = _estimate_total(consumer, topic, res, todo, end_offsets, TopicPartition)
            progress(res.records_read, total)
    flush()
    if progress is not None:
        progress(res.records_read, res.records_read)


def _estimate_total(consumer: Any, topic: str, res: ReplayResult, todo: set[int], end_offsets: dict[int, int],
                    TopicPartition: Any) -> int | None:  # noqa: N803
    """Records to read, from cached (fetch-based) watermarks -- never ListOffsets."""
    total = 0
    for p in todo:
        try:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)
        except Exception:  # noqa: BLE001 - an estimate only
            return None
        if hi is None or hi < 0:
            return None
        start = res.first_offsets.get(p, lo if lo is not None and lo >= 0 else 0)
        end = min(hi, end_offsets[p] + 1) if p in end_offsets else hi
        total += max(0, end - start)
    return total


def _header(m: Any, name: str) -> bytes | None:
    """A named header's value, also inside ts-load-v1 (records of this version carry only that)."""
    return header_value(m.headers(), name)


def _add_result(res: ReplayResult, r: WriteResult) -> None:
    res.inserted += r.inserted
    res.updated += r.updated
    res.unchanged += r.unchanged
    res.deleted += r.deleted
    res.rejected += len(r.rejects)


# -- --truncate: shadow table and the one-transaction swap ---------------------------------------

#: where the shadow table lives: the loader's login (trialsync_writer) may create tables in bronze,
#: not in etl (a writer able to add objects to etl could plant functions the migrating superuser
#: would call); the ``_replay_`` prefix keeps it apart from the staging tables
SHADOW_SCHEMA = BRONZE


def _create_shadow(s: Settings, table: str, shadow: str) -> None:
    with connect(s, autocommit=True, application_name="trialsync-replay") as conn:
        conn.execute(sql.SQL("CREATE UNLOGGED TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING INDEXES)").format(
            sql.SQL("{}.{}").format(ident(SHADOW_SCHEMA), ident(shadow)), staging_table(table)))


def _drop_shadow(s: Settings, shadow: str) -> None:
    try:
        with connect(s, autocommit=True, application_name="trialsync-replay") as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                sql.SQL("{}.{}").format(ident(SHADOW_SCHEMA), ident(shadow))))
    except Exception as e:  # noqa: BLE001 - best effort; the name says what it is
        log.warning("shadow_table_not_dropped", table=f"{SHADOW_SCHEMA}.{shadow}", error=str(e))


def _swap(s: Settings, table: str, shadow: str, started: datetime, res: ReplayResult) -> None:
    """Make bronze.<table> equal to the shadow in ONE transaction (readers never see it empty)."""
    tgt = staging_table(table)
    sh = sql.SQL("{}.{}").format(ident(SHADOW_SCHEMA), ident(shadow))
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in _CONTENT)
    sets = sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in _CONTENT)
    old = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in _CONTENT)
    new = sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in _CONTENT)
    with connect(s, autocommit=True, application_name="trialsync-replay") as conn:
        with conn.transaction():
            # writers (a live loader) wait for the swap; readers (ACCESS SHARE) are not blocked
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(tgt))
            row = conn.execute(sql.SQL("""
                SELECT count(*), min(t.source_id) FROM {tgt} t
                WHERE NOT t.is_deleted AND t.loaded_at < %s
                  AND NOT EXISTS (SELECT 1 FROM {sh} s WHERE s.source_id = t.source_id)""").format(tgt=tgt, sh=sh),
                (started,)).fetchone()
            assert row is not None  # an aggregate answers one row
            missing, sample = row
            if missing:
                raise ReplayError(
                    f"topic {res.topic} has lost history: {missing} live row(s) of bronze.{table} (e.g. "
                    f"source_id {sample!r}) are not in it (earliest offsets read: "
                    f"{dict(sorted(res.first_offsets.items())) or 'none'}). Not rebuilding: the table keeps its "
                    f"{res.rows_before} rows. Replay without --truncate to upsert what the topic has, or "
                    "re-extract the table's jobs (full run) first")
            removed = conn.execute(sql.SQL("""
                DELETE FROM {tgt} t WHERE t.loaded_at < %s
                  AND NOT EXISTS (SELECT 1 FROM {sh} s WHERE s.source_id = t.source_id)""").format(tgt=tgt, sh=sh),
                (started,)).rowcount
            conn.execute(sql.SQL("""
                INSERT INTO {tgt} AS t (source_id, {cols}, created_at)
                SELECT s.source_id, {scols}, s.created_at FROM {sh} s
                ON CONFLICT (source_id) DO UPDATE SET {sets}
                WHERE ({old}) IS DISTINCT FROM ({new})
                  AND (t.extracted_at IS NULL
                       OR (EXCLUDED.extracted_at, EXCLUDED.kafka_offset)
                          >= (t.extracted_at, coalesce(t.kafka_offset, -1)))""").format(
                tgt=tgt, sh=sh, cols=cols, sets=sets, old=old, new=new,
                scols=sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in _CONTENT)))
    res.rebuilt = True
    res.rows_removed = removed
