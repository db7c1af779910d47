"""The loader: a consumer-group member that micro-batches bronze topics into staging tables.

Delivery contract (what holds after any crash, restart, rebalance or outage)
==========================================================================

1. **Offsets move only after the data is committed.** ``enable.auto.commit`` and
   ``enable.auto.offset.store`` are off. A batch is: consume -> group by table -> COPY into a
   temporary table -> one upsert per table -> dead letters published (delivery confirmed) and
   recorded -> per-run counts and the group's positions -> **database COMMIT** -> then the
   consumer offsets are committed. A crash anywhere before the offset commit replays at most the
   uncommitted batches (the one being written and the one being collected); the upsert (and the
   idempotent rejects insert) makes that harmless, and per-run counts are guarded by
   ``etl.loader_run_partitions.max_offset`` so they do not double.
2. **Last message per key wins.** Inside a batch: the latest ``ts-extracted-at`` (then offset).
   Across batches: keys are partitioned, a partition is consumed and written in order (one
   writer thread, one batch in flight), and the stale-write fence in ``consumers.staging_writer``
   (``(extracted_at, offset)`` must not go backwards) makes late writers harmless -- e.g. a member
   that lost its partitions during a long database stall and commits an old batch after the new
   owner wrote newer content.
3. **Tombstones** (null value) soft-delete (``is_deleted``, ``deleted_at``), keeping the last data;
   a later record un-deletes.
4. **Bad records never stop the line**: no id, bytes PostgreSQL cannot store, invalid JSON,
   refused rows, unknown tables -> ``<prefix>.dlq.<table>`` + ``etl.dw_etl_rejects``
   (``consumers.dlq``); the rest of the batch loads.
5. **Outages pause, never drop.** Database down (or the DLQ not confirmable): the failed batch
   goes back to the front of the buffer, every assigned partition is paused, and the loop keeps
   polling (so the group does not evict us) while backing off exponentially (0.5 s .. 30 s, no
   busy loop, no offset commits); the same records are retried when the dependency is back. A
   broker outage is ridden out by librdkafka's reconnects; failed offset commits are retried.
6. **Rebalance**: before partitions are revoked the batch in flight is finished, the buffer is
   written and the offsets are committed synchronously; if the database is down at that moment
   the revoked partitions' part of the buffer is abandoned (the new owner re-reads it from the
   last committed offset). Lost partitions (session expired) are dropped without committing.
7. **Shutdown** on SIGTERM/SIGINT: stop consuming, finish the batch in flight, one last flush
   attempt, synchronous offset commit, leave the group.
8. **Run accounting** in the batch transaction: ``dw_etl_runs.records_loaded/records_rejected``
   per ``ts-run-id``; ``etl.loader_run_partitions`` and ``etl.loader_positions`` say how far each
   run and partition got; ``consumers.run_progress`` turns that into "run loaded".

Throughput: the consumer loop (main thread) collects the next batch while a writer thread
prepares and writes the previous one, so Python work overlaps the database's. ``--once`` drains:
it exits when every assigned partition has reported end-of-partition (fetch based; ListOffsets is
not trusted on the embedded broker) and everything is committed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import groupby, repeat
from operator import is_not, itemgetter
from typing import Any

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from common.config import Settings, get_settings
from common.db import BRONZE, DatabaseError, connect, qualified
from common.kafka import (
    H_RUN_ID,
    RdkafkaLog,
    bronze_topic,
    bronze_topic_regex,
    consumer_config,
    table_of_topic,
    topic_prefix,
)
from common.logging import get_logger
from common.metrics import (
    BACKOFF,
    BATCH_SIZE,
    CONSUMER_LAG,
    DB_POOL,
    FLUSH_DURATION,
    LOAD_LAG,
    RECORDS_LOADED,
)
from consumers import run_progress
from consumers.dlq import UNROUTED, DeadLetters, DlqUnavailable
from consumers.staging_writer import (
    UNKNOWN_TABLE,
    PreparedBatch,
    Reject,
    StagingWriter,
    WriteResult,
    prepare,
)
from schemas.jobs import check_identifier

SERVICE = "loader"
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
LAG_SAMPLES = 32
EVALUATE_EVERY = 1.0  # s between run-completion evaluations of the topics just written
EVALUATE_ALL_EVERY = 5.0  # s between evaluations of every waiting run while idle
SWITCH_INTERVAL = 0.001  # s, see Loader.run
IDLE_PROBE_WINDOW_S = 0.25  # how long an idle loader fetches when it looks for records (Loader._idle_tick)
WAKEUP_POLL_S = 0.2  # how often an idle loader looks at its control-topic watcher (Loader._idle_tick)
#: the watcher's fetch wait: the embedded broker answers a waiting fetch only when the wait expires,
#: so this bounds how late a run start is seen -- and each fetch costs it CPU (100 ms: +1.5 % of a core)
WAKEUP_FETCH_WAIT_MS = 500
ONCE_POLL_S = 0.05  # consume() timeout of a one-shot load (Loader._consume_once)
IDLE_POLL_S = 1.0  # consume() timeout of a service with nothing buffered
CONSUME_MAX = 2000  # messages per consume() call (Loader._consume_once)
EAGER_FRACTION = 20  # an idle writer takes a batch of >= batch_size / this (Loader._flush_due)
GC_THRESHOLD = 100_000  # generation-0 allocations between collections while the loop runs (Loader.run)
DEFAULT_BATCH_SIZE = 20_000  # = LOADER_BATCH_SIZE default; bench/loader_bench.py
DEFAULT_FLUSH_MS = 250  # = LOADER_FLUSH_MS default

_FIRST = itemgetter(0)
_SECOND = itemgetter(1)
TP = tuple[str, int]
Batch = dict[TP, list[Any]]
Results = dict[str, tuple[str, WriteResult]]  # topic -> (table, result)
Prepared = dict[str, tuple[str | None, PreparedBatch]]  # topic -> (table, COPY payload)


def default_group(settings: Settings | None = None) -> str:
    """``<prefix>-loader`` (``trialsync-loader`` by default)."""
    return f"{topic_prefix(settings)}-loader"


def subscription(tables: Iterable[str] | None, settings: Settings | None = None) -> list[str]:
    """Topics (or one ``^regex``) for ``--tables``: names or globs (``*``, ``?``), comma-separated.

    No tables = every bronze topic. Only ``[a-z0-9_]`` names and the two glob characters are
    accepted, so the regex handed to librdkafka is built from checked pieces only.
    """
    s = settings or get_settings()
    items = [t.strip() for t in (tables or []) for t in t.split(",") if t.strip()]
    if not items:
        return [bronze_topic_regex(s)]
    plain, globs = [], []
    for t in items:
        if "*" in t or "?" in t:
            check_identifier(t.replace("*", "x").replace("?", "x"), "table pattern")
            globs.append(t)
        else:
            plain.append(bronze_topic(t, s))
    if not globs:
        return plain
    prefix = (topic_prefix(s) + ".bronze.").replace(".", "\\.")
    alts = [g.replace("*", "[a-z0-9_]*").replace("?", "[a-z0-9_]") for g in globs]
    alts += [t.split(".bronze.", 1)[1] for t in plain]
    return ["^" + prefix + "(" + "|".join(alts) + ")$"]


class DatabaseUnavailable(RuntimeError):
    """The database could not take the batch now (connection lost, shutting down, timeout...)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _run_id(raw: bytes | None) -> int | None:
    if raw and raw.isdigit() and len(raw) <= 18:
        return int(raw)
    return None


# ================================================================================================
# The batch sink: one database transaction per buffer (also used by replay)
# ================================================================================================

class BatchSink:
    """Writes a buffer of bronze messages in ONE transaction: staging upserts, dead letters,
    per-run accounting and group positions. Owns one database connection (not thread-safe: one
    thread at a time).

    ``target`` maps a table name to the ``(schema, table)`` actually written (replay with
    ``--truncate`` writes into a shadow table); ``account`` is off for replays, which are not part
    of any run's load.
    """

    def __init__(self, settings: Settings, group: str, account: bool = True,
                 dlq: DeadLetters | None = None, target: Callable[[str], tuple[str, str]] | None = None,
                 application_name: str = "trialsync-loader", verify_data: bool = False):
        self.settings = settings
        self.verify_data = verify_data  # StagingWriter.verify_data (replays)
        self.group = group
        self.account = account
        self.dlq = dlq or DeadLetters(settings)
        self.target = target or (lambda t: (BRONZE, t))
        self.application_name = f"{application_name}-{os.getpid()}"
        self.conn: psycopg.Connection | None = None
        self.writer: StagingWriter | None = None
        self.log = get_logger("loader.sink").bind(group=group)
        self._eval_topics: set[str] = set()
        self._last_eval = 0.0
        self._unknown_logged: dict[str, float] = {}

    def connection(self) -> psycopg.Connection:
        if self.conn is not None and (self.conn.closed or self.conn.broken):
            self.conn = None
        if self.conn is None:
            try:
                self.conn = connect(self.settings, autocommit=True, application_name=self.application_name)
            except DatabaseError as e:
                raise DatabaseUnavailable(str(e)) from None
            self.writer = StagingWriter(self.conn, verify_data=self.verify_data)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.dlq.close()

    def prepare(self, batch: Batch) -> Prepared:
        """The Python half of a write (COPY payloads); the loader runs it on the consumer thread
        so it overlaps the database work of the previous batch."""
        by_topic: dict[str, list[Any]] = {}
        for (topic, _p), lst in batch.items():
            by_topic.setdefault(topic, []).extend(lst)
        return {topic: (table_of_topic(topic, self.settings), prepare(msgs)) for topic, msgs in by_topic.items()}

    def write(self, batch: Batch, prepared: Prepared | None = None) -> Results:
        """Write ``batch``; raises DatabaseUnavailable/DlqUnavailable (nothing committed then)."""
        batch = {tp: lst for tp, lst in batch.items() if lst}
        if prepared is None:
            prepared = self.prepare(batch)
        DB_POOL.labels("loader", "in_use").set(1)
        DB_POOL.labels("loader", "idle").set(0)
        try:
            conn = self.connection()
            assert self.writer is not None
            results: Results = {}
            rejects: list[tuple[str | None, Reject]] = []
            db_rejected: set[tuple[str, int, int]] = set()
            try:
                with conn.transaction():
                    for topic, (table, pb) in prepared.items():
                        res = self._write_table(topic, table, pb)
                        results[topic] = (table or UNROUTED, res)
                        db_rejected.update((r.topic, r.partition, r.offset) for r in res.rejects)
                        rejects.extend((table, r) for r in pb.rejects)
                        rejects.extend((table, r) for r in res.rejects)
                    if rejects:
                        self.dlq.publish(rejects)
                        self.dlq.record(conn, rejects)
                    if self.account:
                        self._account(conn, batch, prepared, rejects, db_rejected)
            except psycopg.Error as e:
                self.writer.reset_connection_state()
                if conn.broken or conn.closed:
                    self.conn = None
                raise DatabaseUnavailable(f"{type(e).__name__}: {_first_line(e)}") from e
            except BaseException:
                self.writer.reset_connection_state()  # rolled back: the temp table may be gone
                raise
            self.writer.after_commit()
            for topic, (_table, pb) in prepared.items():
                res = results[topic][1]
                res.rejects = list(pb.rejects) + res.rejects
            DeadLetters.count(rejects)
            self._eval_topics.update(prepared)
            return results
        finally:
            DB_POOL.labels("loader", "in_use").set(0)
            DB_POOL.labels("loader", "idle").set(1 if self.conn is not None else 0)

    def _write_table(self, topic: str, table: str | None, pb: PreparedBatch) -> WriteResult:
        assert self.writer is not None and self.conn is not None
        if not pb.msgs:
            return WriteResult()
        if table is None:
            why = (f"topic {topic!r} does not name a staging table (expected {topic_prefix(self.settings)}"
                   ".bronze.<table> with a lower-case table name of at most 63 characters)")
            return WriteResult(rejects=[Reject.of(m, "UnroutedTopic", why) for m in pb.msgs])
        schema, name = self.target(table)
        # No savepoint here (round trips cost throughput): a table dropped after the (cached)
        # check fails the transaction, the batch is retried, and the re-check dead-letters it.
        if not self.writer.table_ready(schema, name):
            return self._unknown_table(table, pb)
        return self.writer.write(qualified(schema, name), pb)

    def _unknown_table(self, table: str, pb: PreparedBatch) -> WriteResult:
        why = (f"staging table bronze.{table} does not exist: add a job with target_table {table} "
               "(config/jobs.yaml) and run `trialsync jobs sync`, then `trialsync replay --table "
               f"{table} --from-beginning` to load these records")
        now = time.monotonic()
        if now - self._unknown_logged.get(table, -1e9) > 60:  # one line a minute per table, not per batch
            self._unknown_logged[table] = now
            self.log.warning("unknown_table", table=table, records=len(pb.msgs), hint=why)
        return WriteResult(rejects=[Reject.of(m, UNKNOWN_TABLE, why) for m in pb.msgs])

    # -- accounting ------------------------------------------------------------------------------
    def _account(self, conn: psycopg.Connection, batch: Batch, prepared: Prepared,
                 rejects: list[tuple[str | None, Reject]], db_rejected: set[tuple[str, int, int]]) -> None:
        """Per-run counts, per-(run, partition) progress and group positions, in the batch's transaction.

        Counting is C-speed (``Counter``/``dict`` over zipped lists); the per-message path only
        runs for a (run, partition) whose stored ``max_offset`` overlaps the batch, i.e. a batch
        replayed after a crash.
        """
        groups: dict[tuple[int, str, int], list[int]] = {}  # -> [loaded, rejected, min off, max off]
        for topic, (_table, pb) in prepared.items():
            if not pb.msgs:
                continue
            offs = pb.offsets
            run = pb.single_run()
            if run is not None:  # the usual case: per partition only
                rid = _run_id(run)
                if rid is None:
                    continue
                parts = pb.partitions
                hi_p = dict(zip(parts, offs, strict=True))
                lo_p = dict(zip(reversed(parts), reversed(offs), strict=True))
                for part, n in Counter(parts).items():
                    groups[(rid, topic, part)] = [n, 0, lo_p[part], hi_p[part]]
                continue
            keys = list(zip(pb.run_ids, pb.partitions, strict=True))
            counts = Counter(keys)
            hi = dict(zip(keys, offs, strict=True))
            lo = dict(zip(reversed(keys), reversed(offs), strict=True))
            for (run, part), n in counts.items():
                rid = _run_id(run)
                if rid is not None:
                    groups[(rid, topic, part)] = [n, 0, lo[(run, part)], hi[(run, part)]]
        for _table, r in rejects:
            rid = _run_id(r.header(H_RUN_ID))
            if rid is None:
                continue
            g = groups.setdefault((rid, r.topic, r.partition), [0, 0, r.offset, r.offset])
            g[1] += 1
            g[2] = min(g[2], r.offset)
            g[3] = max(g[3], r.offset)
            if (r.topic, r.partition, r.offset) in db_rejected:
                g[0] -= 1  # counted as loaded above: refused by the database after it was prepared
        tps = sorted(batch)
        pos_args = (self.group, [t for t, _ in tps], [p for _, p in tps], [batch[tp][-1].offset() + 1 for tp in tps])
        if not groups:
            conn.execute(_POSITIONS_SQL, pos_args)
            return
        keys_sorted = sorted(groups)  # one lock order for every loader process
        key_cols = ([k[0] for k in keys_sorted], [k[1] for k in keys_sorted], [k[2] for k in keys_sorted])
        # 1) lock the run rows (id order), then this batch's (run, partition) rows, reading what
        #    is already counted
        stored = {(rid, t, p): mx for rid, t, p, mx in conn.execute(_LOCK_SQL, (
            sorted({k[0] for k in keys_sorted}), *key_cols, [-1] * len(keys_sorted))).fetchall()}
        for k in keys_sorted:
            g = groups[k]
            done = stored.get(k, -1)
            if done >= g[2]:  # replayed after a crash: count only what is past the stored mark
                g[0], g[1] = _recount(k, done, prepared, rejects)
        # 2) progress, run counts and group positions in one statement
        conn.execute(_ACCOUNT_SQL, (*key_cols, [groups[k][3] for k in keys_sorted],
                                    [groups[k][0] for k in keys_sorted], [groups[k][1] for k in keys_sorted],
                                    *pos_args))

    # -- run completion --------------------------------------------------------------------------
    def evaluate_runs(self, force: bool = False, everything: bool = False) -> None:
        """Mark runs loaded (short separate transaction); errors are logged, never raised."""
        if not self.account:
            return
        now = time.monotonic()
        if not everything and not self._eval_topics:
            return
        if not force and now - self._last_eval < EVALUATE_EVERY:
            return
        if self.conn is None or self.conn.closed or self.conn.broken:
            return
        try:
            run_progress.mark_loaded(self.conn, topics=None if everything else sorted(self._eval_topics))
            self._last_eval = now
            if not everything:
                self._eval_topics.clear()
        except psycopg.Error as e:
            self.log.warning("run_evaluation_failed", error=_first_line(e))
            if self.writer is not None:
                self.writer.reset_connection_state()


_LOCK_SQL = """
WITH runs AS (SELECT id FROM etl.dw_etl_runs WHERE id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE)
INSERT INTO etl.loader_run_partitions AS l (run_id, topic, kafka_partition, max_offset)
SELECT v.* FROM unnest(%s::bigint[], %s::text[], %s::integer[], %s::bigint[]) AS v
WHERE (SELECT count(*) FROM runs) >= 0
ORDER BY 1, 2, 3
ON CONFLICT (run_id, topic, kafka_partition) DO UPDATE SET max_offset = l.max_offset
RETURNING run_id, topic, kafka_partition, max_offset"""

_POSITIONS_SQL = """
INSERT INTO etl.loader_positions (group_id, topic, kafka_partition, next_offset, updated_at)
SELECT %s, v.*, now() FROM unnest(%s::text[], %s::integer[], %s::bigint[]) AS v
ON CONFLICT (topic, kafka_partition, group_id) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()"""

_ACCOUNT_SQL = """
WITH v AS (SELECT * FROM unnest(%s::bigint[], %s::text[], %s::integer[], %s::bigint[], %s::bigint[], %s::bigint[])
           AS v(run_id, topic, part, max_offset, loaded, rejected)),
lrp AS (
    UPDATE etl.loader_run_partitions l SET max_offset = GREATEST(l.max_offset, v.max_offset),
        records_loaded = l.records_loaded + v.loaded, records_rejected = l.records_rejected + v.rejected,
        updated_at = now()
    FROM v WHERE l.run_id = v.run_id AND l.topic = v.topic AND l.kafka_partition = v.part
    RETURNING 1),
runs AS (
    UPDATE etl.dw_etl_runs r SET records_loaded = r.records_loaded + s.loaded,
        records_rejected = r.records_rejected + s.rejected
    FROM (SELECT run_id, sum(loaded) AS loaded, sum(rejected) AS rejected FROM v GROUP BY run_id) s
    WHERE r.id = s.run_id AND (s.loaded > 0 OR s.rejected > 0)
    RETURNING 1),
pos AS (
    INSERT INTO etl.loader_positions (group_id, topic, kafka_partition, next_offset, updated_at)
    SELECT %s, v.*, now() FROM unnest(%s::text[], %s::integer[], %s::bigint[]) AS v
    ON CONFLICT (topic, kafka_partition, group_id)
    DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()
    RETURNING 1)
SELECT (SELECT count(*) FROM lrp), (SELECT count(*) FROM runs), (SELECT count(*) FROM pos)"""


def _recount(key: tuple[int, str, int], done: int, prepared: Prepared,
             rejects: list[tuple[str | None, Reject]]) -> tuple[int, int]:
    """Loaded/rejected of one (run, topic, partition) counting only offsets above ``done``."""
    rid, topic, part = key
    rejected_offs = {r.offset for _, r in rejects
                     if r.topic == topic and r.partition == part and _run_id(r.header(H_RUN_ID)) == rid}
    loaded = 0
    pb = prepared.get(topic, (None, None))[1]
    if pb is not None:
        for m, run in zip(pb.msgs, pb.run_ids, strict=True):
            off = m.offset()
            if m.partition() == part and off > done and off not in rejected_offs and _run_id(run) == rid:
                loaded += 1
    rejected = sum(1 for o in rejected_offs if o > done)
    return loaded, rejected


# ================================================================================================
# The writer thread: one batch in flight while the consumer loop collects the next
# ================================================================================================

@dataclass
class _Done:
    batch: Batch
    n: int
    results: Results | None
    error: BaseException | None
    started: float
    finished: float
    written_at: float


class _WriterThread:
    """Runs ``BatchSink.write`` off the consumer thread. ``submit`` one batch, ``wait`` for it."""

    def __init__(self, sink: BatchSink):
        self.sink = sink
        self._in: queue.Queue[tuple[str, Batch, int, Prepared | None] | None] = queue.Queue(maxsize=1)
        self._out: queue.Queue[_Done] = queue.Queue()
        self.busy = False
        self.thread = threading.Thread(target=self._run, name="loader-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            task = self._in.get()
            if task is None:
                return
            kind, batch, n, prepared = task
            t0 = time.monotonic()
            if kind == "eval":
                self.sink.evaluate_runs(force=True, everything=True)
                self._out.put(_Done(batch, 0, None, None, t0, time.monotonic(), time.time()))
                continue
            try:
                results = self.sink.write(batch, prepared)
                err: BaseException | None = None
            except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
                results, err = None, e
            written_at = time.time()
            if err is None:
                self.sink.evaluate_runs()
            self._out.put(_Done(batch, n, results, err, t0, time.monotonic(), written_at))

    def submit(self, batch: Batch, n: int, kind: str = "batch", prepared: Prepared | None = None) -> None:
        assert not self.busy
        self.busy = True
        self._in.put((kind, batch, n, prepared))

    def poll(self, timeout: float | None) -> _Done | None:
        """The finished task, or None if still running after ``timeout`` (None = wait)."""
        if not self.busy:
            return None
        try:
            done = self._out.get(timeout=timeout) if timeout != 0 else self._out.get_nowait()
        except queue.Empty:
            return None
        self.busy = False
        return done

    def stop(self) -> None:
        self._in.put(None)
        self.thread.join(timeout=60)


# ================================================================================================
# The consumer loop
# ================================================================================================

@dataclass
class LoaderOptions:
    group: str
    tables: list[str] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    flush_ms: int = DEFAULT_FLUSH_MS
    once: bool = False
    #: write per-run counts and group positions
    account: bool = True
    #: ``--once`` with nothing assigned: exit after this long
    idle_exit_s: float = 15.0
    #: extra consumer settings (tests, tuning)
    consumer_overrides: dict[str, Any] = field(default_factory=dict)
    install_signal_handlers: bool = True
    #: ``once``: take every partition without joining the group when no member is active
    #: (Loader._group_idle); off for several one-shot processes sharing the work
    assign_when_alone: bool = True
    #: stop fetching after this long without records; then a run announced on the control topic
    #: wakes the loader, and it looks for other records every ``idle_probe_s`` (Loader._idle_tick;
    #: 0 = always fetch)
    idle_after_s: float = 5.0
    idle_probe_s: float = 5.0


@dataclass
class LoaderStats:
    batches: int = 0
    records: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    rejected: int = 0
    backoffs: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        secs = max(1e-9, time.monotonic() - self.started)
        return {"batches": self.batches, "records": self.records, "inserted": self.inserted,
                "updated": self.updated, "unchanged": self.unchanged, "deleted": self.deleted,
                "rejected": self.rejected, "backoffs": self.backoffs, "seconds": round(secs, 3),
                "records_per_second": round(self.records / secs, 1)}


class Loader:
    """One loader process: ``run()`` until stopped (or drained with ``once``)."""

    def __init__(self, options: LoaderOptions, settings: Settings | None = None,
                 on_batch: Callable[[dict[str, Any]], None] | None = None):
        self.settings = settings or get_settings()
        self.opts = options
        self.on_batch = on_batch
        self.log = get_logger("loader").bind(group=options.group)
        self.stats = LoaderStats()
        self.consumer: Consumer | None = None
        self.sink = BatchSink(self.settings, options.group, account=options.account)
        self.writer: _WriterThread | None = None
        self._stop = threading.Event()
        # buffered messages per (topic, partition), consume order
        self.pending: Batch = {}
        self.pending_n = 0
        self.pending_since = 0.0
        self.assigned: set[TP] = set()
        self.eof: set[TP] = set()
        self.seen_assignment = False
        # offsets whose records are committed in the database, not yet confirmed by the broker
        self.to_commit: dict[TP, int] = {}
        # next offset to read per partition, as far as this member has written it (consumer lag)
        self.written: dict[TP, int] = {}
        self.commit_failed = False
        self.paused = False
        self._pause_new = False
        self.backoff_until = 0.0
        self.backoff_delay = 0.0
        self.backoff_dep = ""
        self._closing = False
        self._last_lag = 0.0
        self._last_eval_all = 0.0
        self._last_broker_error = 0.0
        # idle fetching (_idle_tick): awake -> asleep (all paused) -> probing (resumed briefly)
        self._idle_state = "awake"
        self._idle_next = 0.0
        self._last_activity = time.monotonic()
        self._wakeup: Consumer | None = None  # control-topic watcher (_open_wakeup)

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        """Ask the loop to finish (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _consumer_config(self) -> dict[str, Any]:
        cfg = consumer_config(self.opts.group, self.settings, **{
            "client.id": f"trialsync-loader-{os.getpid()}",
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 100,
        })
        cfg.update(self.opts.consumer_overrides)
        cfg["on_commit"] = self._on_commit
        cfg["error_cb"] = self._on_error
        cfg["logger"] = RdkafkaLog()
        cfg.setdefault("reconnect.backoff.ms", 250)
        cfg.setdefault("reconnect.backoff.max.ms", 5000)
        return cfg

    def run(self) -> LoaderStats:
        if self.opts.install_signal_handlers and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        topics = subscription(self.opts.tables, self.settings)
        # the writer thread waits on the database with the GIL released; when a reply arrives it
        # should get the GIL back within ~1 ms, not the default 5 ms (~8 round trips per batch)
        old_switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        # A batch allocates ~10 objects per record (messages, tuples, bytes) that all die together
        # when it is written; CPython's default generation-0 threshold (700 allocations) then runs
        # a collection every few dozen records, each traversing the buffered messages -- ~8 % of
        # the loader's CPU (py-spy, bench/RESULTS.md). Start-up objects are frozen out of the
        # collector and collections are made rarer while the loop runs.
        old_gc = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *old_gc[1:])
        self.writer = _WriterThread(self.sink)
        self.consumer = Consumer(self._consumer_config())
        if not self.opts.once and self.opts.idle_probe_s > 0:
            self._open_wakeup()
        assigned = self.opts.once and self.opts.assign_when_alone and self._group_idle()
        if assigned:
            self._assign_all(topics)
        else:
            self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_lost)
        self.log.info("loader_started", topics=topics, batch_size=self.opts.batch_size,
                      flush_ms=self.opts.flush_ms, once=self.opts.once,
                      membership="assigned" if assigned else "group")
        started = time.monotonic()
        try:
            while not self.stopping:
                self._reap(0)
                if self.backoff_until:
                    self._backoff_tick()
                    continue
                self._idle_tick()
                self._consume_once()
                self._reap(0)
                if self._flush_due():
                    self._flush()
                elif not self.pending_n and not self.writer.busy:
                    self._idle_housekeeping()
                if self.opts.once and self._drained(started):
                    break
        finally:
            self._shutdown()
            sys.setswitchinterval(old_switch)
            gc.set_threshold(*old_gc)
            gc.unfreeze()
        self.log.info("loader_stopped", **self.stats.as_dict())
        return self.stats

    # -- idle: fetch now and then, not ten times a second ------------------------------------------
    def _idle_tick(self) -> None:
        """Pause every partition after ``idle_after_s`` without records; wake when a run is
        announced on the control topic (``_open_wakeup``), and look for other records for
        ``IDLE_PROBE_WINDOW_S`` every ``idle_probe_s``.

        Why: a fetch request names every assigned partition (~210 on a full catalog), and the
        embedded broker spends ~16 ms of CPU on each, ten per second at ``fetch.wait.max.ms`` 100:
        17 % of a core with nothing to do. A longer fetch wait is no cure there -- tansu answers a
        waiting fetch only when the wait expires, even when records arrive -- so the loader stops
        fetching instead. The price: records a run publishes wait until its ``run_started`` is seen
        (~0.5 s); records published without one (a replay tool, another producer) up to
        ``idle_probe_s``. Only the first ones: the loader is awake from then on. Not in ``--once``
        mode, and never while a batch is buffered, being written or backing off."""
        if self.opts.once or self.consumer is None or self.opts.idle_probe_s <= 0:
            return
        now = time.monotonic()
        if self.pending_n or self.backoff_until or self.paused or (self.writer is not None and self.writer.busy):
            self._last_activity = now
            return
        if self._idle_state == "awake":
            if now - self._last_activity >= self.opts.idle_after_s and self.assigned:
                self._set_fetching(False)
                self._idle_state, self._idle_next = "asleep", now + self.opts.idle_probe_s
        elif self._idle_state == "asleep":
            if self._run_announced():
                self._wake()
                self.log.debug("loader_woken", by="control topic")
            elif now >= self._idle_next:
                self._set_fetching(True)
                self._idle_state, self._idle_next = "probing", now + IDLE_PROBE_WINDOW_S
        elif now >= self._idle_next:  # probing, and no record came (_add would have woken us)
            if self._records_waiting():
                self._wake()  # fetched but not handed out yet: stay awake
                return
            self._set_fetching(False)
            self._idle_state, self._idle_next = "asleep", now + self.opts.idle_probe_s

    def _open_wakeup(self) -> None:
        """A group-less consumer at the end of the control topic: a run starting (or finishing)
        wakes an idle loader at once instead of at its next probe (``_idle_tick``). It fetches one
        small topic, which costs the broker little; without it (no control topic) the probes do."""
        from confluent_kafka import OFFSET_END

        from common.kafka import control_topic, ensure_system_topics

        try:
            ensure_system_topics(self.settings)
            topic = control_topic(self.settings)
            cfg = consumer_config(f"{self.opts.group}-wakeup", self.settings, **{
                "client.id": f"trialsync-loader-wakeup-{os.getpid()}", "fetch.wait.max.ms": WAKEUP_FETCH_WAIT_MS,
                "enable.partition.eof": False, "logger": RdkafkaLog()})
            watcher = Consumer(cfg)
            meta = watcher.list_topics(topic, timeout=5).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                watcher.close()
                return
            watcher.assign([TopicPartition(topic, p, OFFSET_END) for p in sorted(meta.partitions)])
            self._wakeup = watcher
        except (KafkaException, RuntimeError) as e:
            self.log.info("wakeup_watcher_unavailable", error=str(e)[:300], note="idle probes only")

    def _run_announced(self) -> bool:
        if self._wakeup is None:
            return False
        try:
            return any(m.error() is None for m in self._wakeup.consume(num_messages=100, timeout=0))
        except (KafkaException, RuntimeError):
            return False

    def _records_waiting(self) -> bool:
        """A partition whose last fetch response saw records past our position (cached, no request)."""
        assert self.consumer is not None
        try:
            for tp in self.consumer.position(self.consumer.assignment()):
                if tp.offset >= 0:
                    _lo, hi = self.consumer.get_watermark_offsets(tp, cached=True)
                    if hi is not None and hi > tp.offset:
                        return True
        except KafkaException:
            return True  # in doubt, fetch
        return False

    def _set_fetching(self, on: bool) -> None:
        assert self.consumer is not None
        parts = self.consumer.assignment()
        if parts:
            (self.consumer.resume if on else self.consumer.pause)(parts)

    def _wake(self) -> None:
        """Records (or a new assignment) arrived: fetch normally again."""
        self._last_activity = time.monotonic()
        if self._idle_state == "asleep" and self.consumer is not None:
            self._set_fetching(True)
        self._idle_state = "awake"

    # -- one-shot loads without a group join -------------------------------------------------------
    def _group_idle(self) -> bool:
        """True when no member of our group is active (so a one-shot load may take every partition).

        Why: joining a group costs seconds (the broker waits for other members; ~3 s on the
        embedded broker), more than a small ``load --once`` takes otherwise. Alone, the one-shot
        loader assigns itself every partition and commits offsets as a simple consumer would --
        the broker accepts that only while the group has no members. If a ``trialsync load``
        service is running in the group, the one-shot load joins it like any member instead. Any
        doubt (a broker that cannot describe groups) means joining."""
        from confluent_kafka import ConsumerGroupState
        from confluent_kafka.admin import AdminClient

        try:
            admin = AdminClient({"bootstrap.servers": self._consumer_config()["bootstrap.servers"],
                                 "logger": RdkafkaLog()})  # type: ignore[dict-item]  # the stubs omit the documented `logger` object
            desc = admin.describe_consumer_groups([self.opts.group], request_timeout=5)[self.opts.group].result(5)
        except (KafkaException, RuntimeError, KeyError, ValueError) as e:
            self.log.info("group_not_described", error=str(e)[:300], note="joining the group")
            return False
        return desc.state in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD) and not desc.members

    def _assign_all(self, topics: list[str]) -> None:
        """Assign every partition of the subscription's topics; offsets: the group's committed ones
        (``auto.offset.reset`` where there are none), as a group member would start."""
        assert self.consumer is not None
        md = self.consumer.list_topics(timeout=10)
        pattern = re.compile(topics[0]) if len(topics) == 1 and topics[0].startswith("^") else None
        names = sorted(t for t, meta in md.topics.items() if meta.error is None
                       and (pattern.match(t) if pattern is not None else t in topics))
        parts = [TopicPartition(t, p) for t in names for p in sorted(md.topics[t].partitions)]
        self.consumer.assign(parts)
        self._on_assign(self.consumer, parts)

    def _shutdown(self) -> None:
        try:
            self._reap(None)
            if self.pending_n:
                if not self.flush_sync():
                    self.log.warning("batch_abandoned_on_shutdown", records=self.pending_n,
                                     note="not committed: re-read from the last committed offset on restart")
            self._commit_offsets(sync=True)
            self._update_lag(force=True)  # the final lag (0 when drained) before leaving the group
            if self.writer is not None and not self.writer.busy:
                self.writer.submit({}, 0, kind="eval")
                self._reap(None)
        finally:
            if self.consumer is not None:
                self._closing = True
                try:
                    self.consumer.close()  # leaves the group
                except (KafkaException, RuntimeError) as e:
                    self.log.warning("consumer_close_failed", error=str(e))
                self.consumer = None
            if self._wakeup is not None:
                with contextlib.suppress(KafkaException, RuntimeError):
                    self._wakeup.close()
                self._wakeup = None
            if self.writer is not None:
                self.writer.stop()
            self.sink.close()
            DB_POOL.labels("loader", "in_use").set(0)
            DB_POOL.labels("loader", "idle").set(0)

    # -- consuming -------------------------------------------------------------------------------
    def _consume_once(self) -> None:
        assert self.consumer is not None
        # at most CONSUME_MAX per call: creating the Message objects holds the GIL, which the writer
        # thread needs between the database's replies (see staging_writer.prepare)
        room = max(1, min(CONSUME_MAX, self.opts.batch_size - self.pending_n))
        # consume() waits its whole timeout unless it gets num_messages
        if self.opts.once:
            # short waits: a one-shot load sees its partitions' ends (and exits) as soon as reported
            timeout = ONCE_POLL_S
        elif self.pending_n:
            timeout = max(0.0, self.opts.flush_ms / 1000 - (time.monotonic() - self.pending_since))
        else:
            # idle: one wake-up a second at most, and back at the first message that arrives; while
            # probing for records (_idle_tick) no longer than the probe window
            timeout, room = IDLE_POLL_S, 1
            if self._idle_state != "awake":
                timeout = min(timeout, max(0.01, self._idle_next - time.monotonic()))
                if self._wakeup is not None:
                    timeout = min(timeout, WAKEUP_POLL_S)  # (a paused consumer: a local queue check)
        called = time.monotonic()
        msgs = self.consumer.consume(num_messages=room, timeout=timeout)
        if msgs:
            self._add(msgs, called)

    def _add(self, msgs: list[Any], since: float | None = None) -> None:
        """Buffer ``msgs``; ``since`` = when the consume call that got them started (they may have
        arrived right then), so a record waits at most ``flush_ms`` before its batch is flushed.

        A batch without events (the usual case) is grouped by partition with C-level maps and
        ``groupby`` (the broker hands out runs of one partition); one with events (end of
        partition, errors) is walked in order, since an event and a message of the same partition
        must be seen in the order they came."""
        if not msgs:
            return
        n = len(msgs)
        # (not ``errs.count(None)``: KafkaError's == against None leaves a TypeError set in C)
        if any(map(is_not, map(Message.error, msgs), repeat(None))):
            n = self._add_in_order(msgs)
        else:
            pending = self.pending
            eof = self.eof if self.opts.once else None
            tps = zip(map(Message.topic, msgs), map(Message.partition, msgs), strict=True)
            for tp, run in groupby(zip(tps, msgs, strict=True), _FIRST):
                lst = pending.get(tp)
                if lst is None:
                    lst = pending[tp] = []
                lst.extend(map(_SECOND, run))
                if eof is not None:
                    eof.discard(tp)
        if n:
            if not self.pending_n:
                self.pending_since = since if since is not None else time.monotonic()
            self.pending_n += n
            if self._idle_state != "awake":
                self._wake()
            else:
                self._last_activity = time.monotonic()

    def _add_in_order(self, msgs: list[Any]) -> int:
        pending = self.pending
        once = self.opts.once
        n = 0
        last_tp: TP | None = None
        lst: list[Any] = []
        for m in msgs:
            err = m.error()
            if err is not None:
                self._on_message_error(m, err)
                last_tp = None
                continue
            tp = (m.topic(), m.partition())
            if tp != last_tp:
                got = pending.get(tp)
                if got is None:
                    got = pending[tp] = []
                lst = got
                last_tp = tp
                if once:
                    self.eof.discard(tp)
            lst.append(m)
            n += 1
        return n

    def _on_message_error(self, m: Any, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            self.eof.add((m.topic(), m.partition()))
            return
        if err.fatal():
            raise KafkaException(err)
        if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
            self.log.warning("topic_not_found", topic=m.topic(), error=err.str())
            return
        self._broker_trouble(err.str())

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.log.error("broker_fatal_error", error=err.str())
            self.stop()
            return
        self._broker_trouble(err.str())

    def _broker_trouble(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_broker_error > 10:
            BACKOFF.labels(SERVICE, "broker").inc()
            self.log.warning("broker_unavailable", error=text,
                             hint="librdkafka reconnects by itself; buffered records are kept")
        self._last_broker_error = now

    def _flush_due(self) -> bool:
        if not self.pending_n:
            return False
        if self.pending_n >= self.opts.batch_size:
            return True
        # The database is idle: a smaller batch now beats a full one later. While it writes, the
        # next batch grows by what arrives meanwhile, so under load batches reach batch_size by
        # themselves; without this the first batch of a backlog (and every batch after an idle
        # spell) kept the database waiting while batch_size records were collected.
        assert self.writer is not None
        if not self.writer.busy and self.pending_n >= max(1, self.opts.batch_size // EAGER_FRACTION):
            return True
        if (time.monotonic() - self.pending_since) * 1000 >= self.opts.flush_ms:
            return True
        # --once: everything assigned is at its end, no point waiting for the timer
        return self.opts.once and bool(self.assigned) and self.assigned <= self.eof

    def _drained(self, started: float) -> bool:
        assert self.writer is not None
        if self.pending_n or self.writer.busy or self.backoff_until or (self.to_commit and self.commit_failed):
            return False
        if not self.assigned:
            # nothing for us: either no topic matches or the group gave our share to others
            return self.seen_assignment or time.monotonic() - started > self.opts.idle_exit_s
        return self.assigned <= self.eof

    # -- rebalance callbacks (run inside consume()) ----------------------------------------------
    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self.seen_assignment = True
        tps = {(p.topic, p.partition) for p in parts}
        self.assigned |= tps
        self.eof -= tps
        if self.paused and parts:
            self._pause_new = True  # paused on the next backoff tick, once librdkafka has assigned them
        elif parts:
            self._wake()  # an idle loader's paused partitions fetch again with the new ones
        if parts:
            self.log.info("partitions_assigned", partitions=sorted(f"{t}[{p}]" for t, p in tps))

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in parts}
        if not tps:
            return
        if not self._closing:
            # write what we have before the partitions move; if impossible, abandon their share
            self._reap(None)
            if any(tp in self.pending for tp in tps):
                if self.backoff_until or not self.flush_sync():
                    self._drop(tps, "revoked")
            self._commit_offsets(sync=True, only=tps)
        for tp in tps:
            self.to_commit.pop(tp, None)
            self.written.pop(tp, None)
        self.assigned -= tps
        self.eof -= tps
        self.log.info("partitions_revoked", partitions=sorted(f"{t}[{p}]" for t, p in tps))

    def _on_lost(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in parts}
        self._drop(tps, "lost")
        for tp in tps:
            self.to_commit.pop(tp, None)
            self.written.pop(tp, None)
        self.assigned -= tps
        self.eof -= tps
        self.log.warning("partitions_lost", partitions=sorted(f"{t}[{p}]" for t, p in tps),
                         note="a batch in flight for them may still commit; the stale-write fence keeps "
                              "the new owner's newer content")

    def _drop(self, tps: set[TP], why: str) -> None:
        dropped = 0
        for tp in tps:
            lst = self.pending.pop(tp, None)
            if lst:
                dropped += len(lst)
        if dropped:
            self.pending_n -= dropped
            self.log.warning("buffer_abandoned", reason=why, records=dropped,
                             note="not committed: the partition's next owner re-reads them")

    # -- flushing --------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Hand the buffer to the writer thread.

        The COPY payload is built here, while the previous batch is still being written, and
        only then do we wait for that batch: Python work overlaps database work.
        """
        assert self.writer is not None
        if not self.pending_n:
            return
        batch, n = self.pending, self.pending_n
        self.pending, self.pending_n = {}, 0
        prepared = self.sink.prepare(batch)
        if self.writer.busy:
            self._reap(None)
            if self.backoff_until:  # the previous batch failed and is back in the buffer: ours follows it
                for tp, lst in batch.items():
                    cur = self.pending.get(tp)
                    self.pending[tp] = cur + lst if cur else lst
                if not self.pending_n:
                    self.pending_since = time.monotonic()
                self.pending_n += n
                return
        self.writer.submit(batch, n, prepared=prepared)

    def flush_sync(self) -> bool:
        """Write everything buffered now and wait; False = the dependency is down (buffer kept)."""
        assert self.writer is not None
        self._reap(None)
        if self.backoff_until and not self._closing:
            # an earlier failure: try once more right now (rebalance/shutdown cannot wait)
            self.backoff_until = 0.0
        if self.pending_n:
            self._flush()
            self._reap(None)
        return not self.pending_n

    def _reap(self, timeout: float | None) -> None:
        """Collect the writer's result: commit offsets on success, back off on failure."""
        assert self.writer is not None
        done = self.writer.poll(timeout)
        if done is None or done.results is None and done.error is None:
            return
        if done.error is not None:
            if not isinstance(done.error, (DatabaseUnavailable, DlqUnavailable)):
                raise done.error
            # put the batch back in front of whatever arrived meanwhile (same order per partition)
            if not self.pending_n:
                self.pending_since = time.monotonic()
            for tp, lst in done.batch.items():
                if tp not in self.assigned:
                    continue  # revoked while it was being written: the new owner reads it
                newer = self.pending.get(tp)
                self.pending[tp] = lst + newer if newer else lst
                self.pending_n += len(lst)
            self._enter_backoff("database" if isinstance(done.error, DatabaseUnavailable) else "broker",
                                done.error)
            return
        assert done.results is not None
        for tp, lst in done.batch.items():
            if tp in self.assigned:  # a revoked/lost partition's offsets are its new owner's business
                self.to_commit[tp] = self.written[tp] = lst[-1].offset() + 1
        self._commit_offsets(sync=False)
        if self.backoff_delay:
            self.log.info("dependency_recovered", dependency=self.backoff_dep)
        self.backoff_delay = 0.0
        if self.paused:
            self._resume()
        self._observe(done)

    def _observe(self, done: _Done) -> None:
        assert done.results is not None
        st = self.stats
        st.batches += 1
        st.records += done.n
        dt = done.finished - done.started
        samples: dict[str, list[Any]] = {}
        for (topic, _p), lst in done.batch.items():
            samples.setdefault(topic, []).extend(lst[:: max(1, len(lst) // LAG_SAMPLES)][:LAG_SAMPLES])
        now_ms = done.written_at * 1000
        for topic, (table, res) in done.results.items():
            st.inserted += res.inserted
            st.updated += res.updated
            st.deleted += res.deleted
            st.unchanged += res.unchanged
            st.rejected += len(res.rejects)
            for outcome, v in (("inserted", res.inserted), ("updated", res.updated),
                               ("unchanged", res.unchanged), ("deleted", res.deleted)):
                if v:
                    RECORDS_LOADED.labels(table, outcome).inc(v)
            BATCH_SIZE.labels(table).observe(res.accepted + len(res.rejects))
            FLUSH_DURATION.labels(table).observe(dt)
            for m in samples.get(topic, ()):
                ts = m.timestamp()[1]
                if ts > 0:
                    LOAD_LAG.labels(table).observe(max(0.0, (now_ms - ts) / 1000))
        self.log.debug("batch_committed", records=done.n, duration_ms=round(dt * 1000, 1),
                       tables=sorted(t for t, _ in done.results.values()),
                       direct=sorted(t for t, r in done.results.values() if r.direct),
                       unchanged=sum(r.unchanged for _, r in done.results.values()))
        if self.on_batch is not None:
            self.on_batch({"records": done.n, "seconds": dt, "written_at": done.written_at,
                           "batch": done.batch, "results": done.results})
        self._update_lag()

    def _update_lag(self, force: bool = False) -> None:
        """Consumer lag from the cached (fetch-response) high watermark -- never ListOffsets."""
        now = time.monotonic()
        if self.consumer is None or (not force and now - self._last_lag < 5.0):
            return
        self._last_lag = now
        todo: list[tuple[TopicPartition, int]] = []
        for topic, part in sorted(self.assigned):
            tp = TopicPartition(topic, part)
            try:
                _lo, hi = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if hi is not None and hi >= 0:
                todo.append((tp, hi))
        if not todo:
            return
        # how far the database is: what this member wrote, else what the group committed before
        missing = [tp for tp, _ in todo if (tp.topic, tp.partition) not in self.written]
        committed: dict[TP, int] = {}
        if missing:
            try:
                committed = {(p.topic, p.partition): p.offset for p in self.consumer.committed(missing, timeout=5)}
            except KafkaException:
                return
        for tp, hi in todo:
            key = (tp.topic, tp.partition)
            pos = self.written.get(key, committed.get(key, -1))
            if pos < 0:
                continue  # unknown yet (nothing written, nothing committed)
            CONSUMER_LAG.labels(self.opts.group, tp.topic, str(tp.partition)).set(max(0, hi - pos))

    def _idle_housekeeping(self) -> None:
        assert self.writer is not None
        if self.commit_failed and self.to_commit:
            self._commit_offsets(sync=True)
        if self.opts.account and time.monotonic() - self._last_eval_all > EVALUATE_ALL_EVERY:
            # runs that turned final after their records were loaded (nothing new to trigger them)
            self._last_eval_all = time.monotonic()
            self.writer.submit({}, 0, kind="eval")
        self._update_lag()

    # -- offsets ---------------------------------------------------------------------------------
    def _commit_offsets(self, sync: bool = False, only: set[TP] | None = None) -> None:
        if self.consumer is None or not self.to_commit:
            return
        items = [(tp, off) for tp, off in self.to_commit.items()
                 if (only is None or tp in only) and tp in self.assigned]
        if not items:
            return
        offsets = [TopicPartition(t, p, off) for (t, p), off in items]
        try:
            if sync:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            if sync:
                for tp, off in items:
                    if self.to_commit.get(tp) == off:
                        del self.to_commit[tp]
                self.commit_failed = False
        except KafkaException as e:
            self.commit_failed = True
            self.log.warning("offset_commit_failed", error=str(e),
                             note="the batch is safely in the database; the commit is retried")

    def _on_commit(self, err: KafkaError | None, parts: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            self.commit_failed = True
            self.log.warning("offset_commit_failed", error=err.str(),
                             note="the batch is safely in the database; the commit is retried")
            return
        for p in parts or ():
            tp = (p.topic, p.partition)
            if p.error is None and self.to_commit.get(tp) == p.offset:
                del self.to_commit[tp]

    # -- backoff ---------------------------------------------------------------------------------
    def _enter_backoff(self, dependency: str, e: BaseException) -> None:
        self.backoff_delay = min(BACKOFF_MAX, max(BACKOFF_MIN, self.backoff_delay * 2))
        delay = self.backoff_delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
        self.backoff_until = time.monotonic() + delay
        self.backoff_dep = dependency
        self._idle_state = "awake"  # the backoff pauses and resumes everything itself
        self.stats.backoffs += 1
        BACKOFF.labels(SERVICE, dependency).inc()
        self.log.warning("backing_off", dependency=dependency, error=str(e)[:500], retry_in_s=round(delay, 2),
                         buffered=self.pending_n)
        if not self.paused and self.consumer is not None:
            parts = self.consumer.assignment()
            if parts:
                self.consumer.pause(parts)
            self.paused = True

    def _resume(self) -> None:
        if self.consumer is not None:
            parts = self.consumer.assignment()
            if parts:
                self.consumer.resume(parts)
        self.paused = False

    def _backoff_tick(self) -> None:
        """While backing off: keep polling (group membership, callbacks), then retry the batch."""
        assert self.consumer is not None
        if self._pause_new:
            parts = self.consumer.assignment()
            if parts:
                self.consumer.pause(parts)
            self._pause_new = False
        remaining = self.backoff_until - time.monotonic()
        if remaining > 0:
            msgs = self.consumer.consume(num_messages=1000, timeout=min(0.5, remaining))
            if msgs:  # paused partitions deliver nothing; anything here is kept in order
                self._add(msgs)
            return
        self.backoff_until = 0.0
        if self.pending_n:
            self._flush()
        else:
            self.backoff_delay = 0.0
            if self.paused:
                self._resume()


def run_loader(options: LoaderOptions, settings: Settings | None = None) -> LoaderStats:
    """Run one loader in this process until SIGTERM/SIGINT (or drained, with ``once``)."""
    return Loader(options, settings).run()
