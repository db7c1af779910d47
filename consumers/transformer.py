"""The transform consumer: end-of-run control messages in, Silver/Gold procedures out.

Delivery contract
-----------------
poll ``<prefix>.control.runs`` (group ``trialsync-transformer``, manual commits) → for a
``run_finished`` of a table some procedure reads: wait until the loader reports the run loaded
(``consumers.run_progress``: every record it published is committed in Bronze) → once
``TRANSFORM_COALESCE_SECONDS`` have passed since the first loaded run, run **one batch**: the
procedures all loaded tables trigger, each once, in dependency order (dims → facts → gold refresh),
each in its own transaction with a statement timeout, each recorded in ``etl.dw_transform_runs`` →
quality checks → **then** commit the control offsets of the messages the batch covered.

* A crash before the commit re-delivers the messages; the procedures are idempotent and
  incremental, so the replay costs one no-op run.
* Offsets are committed per partition up to the first message not yet handled, so a run that is
  never loaded holds back only its own partition's commit, never other tables' transforms (after
  ``TRANSFORM_LOAD_WAIT_TIMEOUT_SECONDS`` it is transformed anyway, with a warning).
* Messages that need no transform -- ``run_started``, runs of tables no procedure reads, runs that
  published nothing, unreadable values -- are logged and committed.
* A failed procedure is recorded (error, ``next_retry_at``); its dependents in the batch are
  skipped; all other procedures run; the messages are committed (the failure and its retry
  schedule live in the database, see consumers/transform_runner.py) and the retry runs when due.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
from pydantic import ValidationError

from common import kafka as ck
from common.config import Settings, get_settings
from common.db import DatabaseError, connect, scalar
from common.logging import get_logger
from common.metrics import BACKOFF, start_metrics_server
from consumers.transform_runner import BatchResult, ProcedureRunner
from consumers.transform_settings import TransformSettings, load_transform_settings
from schemas.messages import RunFinished, RunStarted, parse_control

if TYPE_CHECKING:
    from confluent_kafka import Consumer

log = get_logger("transformer")

RunsLoaded = Callable[[psycopg.Connection, Sequence[int]], dict[int, bool]]


def default_runs_loaded() -> RunsLoaded:
    """The loader's "is this run in Bronze?" (consumers/run_progress.py): evaluated from the
    loader's committed positions, so it does not depend on a loader being up to set the flag."""
    from consumers.run_progress import runs_loaded

    return runs_loaded


# -- offsets ---------------------------------------------------------------------------------------

class OffsetTracker:
    """Which control messages are handled, per partition; what may be committed.

    The committable offset of a partition is one past the highest offset below which every
    received message is handled -- never past a message still waiting.
    """

    def __init__(self) -> None:
        self._open: dict[int, dict[int, bool]] = {}  # partition -> offset -> handled
        self._committed: dict[int, int] = {}

    def add(self, partition: int, offset: int) -> None:
        self._open.setdefault(partition, {})[offset] = False

    def done(self, partition: int, offset: int) -> None:
        if offset in self._open.get(partition, {}):
            self._open[partition][offset] = True

    def committable(self) -> dict[int, int]:
        """partition -> next offset to commit (only partitions that moved)."""
        out = {}
        for p, offs in self._open.items():
            nxt = None
            for off in sorted(offs):
                if not offs[off]:
                    break
                nxt = off + 1
            if nxt is not None and nxt > self._committed.get(p, -1):
                out[p] = nxt
        return out

    def committed(self, partition: int, next_offset: int) -> None:
        self._committed[partition] = next_offset
        offs = self._open.get(partition, {})
        for off in [o for o in offs if o < next_offset]:
            del offs[off]

    def drop(self, partitions: Sequence[int]) -> None:
        for p in partitions:
            self._open.pop(p, None)
            self._committed.pop(p, None)

    def pending(self) -> int:
        return sum(1 for offs in self._open.values() for handled in offs.values() if not handled)


@dataclass
class PendingRun:
    """A run_finished waiting for its records to be loaded, then for a batch."""

    run_id: int
    table: str
    partition: int
    offset: int
    received_at: float
    loaded_at: float | None = None
    forced: bool = False


@dataclass
class Pending:
    runs: dict[tuple[int, int], PendingRun] = field(default_factory=dict)  # (partition, offset) -> run

    def ready(self) -> list[PendingRun]:
        return [r for r in self.runs.values() if r.loaded_at is not None]

    def waiting(self) -> list[PendingRun]:
        return [r for r in self.runs.values() if r.loaded_at is None]


# -- the consumer ----------------------------------------------------------------------------------

class Transformer:
    """Consumes control messages and runs the triggered procedures (see the module contract)."""

    def __init__(self, settings: Settings | None = None, tsettings: TransformSettings | None = None,
                 runner: ProcedureRunner | None = None, runs_loaded: RunsLoaded | None = None,
                 consumer_factory: Callable[[dict], Consumer] | None = None):
        self.settings = settings or get_settings()
        self.ts = tsettings or load_transform_settings()
        self.runner = runner or ProcedureRunner(self.settings, self.ts)
        self.runs_loaded = runs_loaded or default_runs_loaded()
        self._consumer_factory = consumer_factory
        self.topic = ck.control_topic(self.settings)
        self.tracker = OffsetTracker()
        self.pending = Pending()
        self.stop_event = threading.Event()
        self.consumer: Consumer | None = None
        self._db: psycopg.Connection | None = None
        self._last_retry_check = 0.0
        self._last_prune = 0.0
        self.batches: list[BatchResult] = []  # most recent last (tests, status); bounded below
        self.skipped = 0

    # -- plumbing ---------------------------------------------------------------------------------
    def _conn(self) -> psycopg.Connection:
        if self._db is None or self._db.closed or self._db.broken:
            self._db = connect(self.settings, autocommit=True, application_name="trialsync-transformer")
        return self._db

    def _consumer_config(self) -> dict:
        # a batch can run as long as its procedures' timeouts; librdkafka must not leave the group
        # meanwhile (heartbeats continue in the background; session.timeout still detects a dead process)
        max_poll_ms = min(86_400_000, max(300_000, (self.ts.statement_timeout_seconds * 13 + 600) * 1000))
        return ck.consumer_config(self.ts.group_id, self.settings, **{
            "client.id": "trialsync-transformer", "max.poll.interval.ms": max_poll_ms})

    def open(self) -> None:
        from confluent_kafka import Consumer

        ck.ensure_system_topics(self.settings)
        factory = self._consumer_factory or Consumer
        self.consumer = factory(self._consumer_config())
        self.consumer.subscribe([self.topic], on_revoke=self._on_revoke, on_lost=self._on_revoke)
        abandoned = self.runner.mark_abandoned()
        if abandoned:
            log.warning("abandoned_runs_marked_failed", runs=abandoned)
        log.info("transformer_started", topic=self.topic, group=self.ts.group_id,
                 coalesce_s=self.ts.coalesce_seconds, tables=sorted(self.runner.plan.known_tables))

    def _on_revoke(self, consumer: object, partitions: list) -> None:
        mine = [tp.partition for tp in partitions if tp.topic == self.topic]
        self._commit(only=mine)
        self.tracker.drop(mine)
        for key in [k for k in self.pending.runs if k[0] in mine]:
            del self.pending.runs[key]
        log.info("partitions_revoked", partitions=mine)

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self._commit()
            finally:
                self.consumer.close()
                self.consumer = None
        if self._db is not None:
            self._db.close()
        self.runner.close()

    # -- message handling -------------------------------------------------------------------------
    def handle_message(self, partition: int, offset: int, value: bytes | None) -> None:
        """Classify one control message: pending (needs a transform) or handled right away."""
        self.tracker.add(partition, offset)
        mlog = log.bind(partition=partition, offset=offset)
        if value is None:
            mlog.warning("control_message_skipped", reason="empty value")
            return self._skip(partition, offset)
        try:
            msg = parse_control(value)
        except ValidationError as e:
            mlog.error("control_message_skipped", reason="not a control message",
                       error=str(e).splitlines()[0][:300])
            return self._skip(partition, offset)
        if isinstance(msg, RunStarted):
            mlog.debug("control_message_ignored", type=msg.type, run_id=msg.run_id)
            return self._skip(partition, offset)
        assert isinstance(msg, RunFinished)
        mlog = mlog.bind(run_id=msg.run_id, job_id=msg.job_id, table=msg.target_table)
        if msg.target_table not in self.runner.plan.known_tables:
            mlog.warning("control_message_skipped", reason="unknown table: no transform reads it")
            return self._skip(partition, offset)
        if msg.records_published == 0:
            mlog.info("control_message_skipped", reason="the run published no records", status=msg.status)
            return self._skip(partition, offset)
        self.pending.runs[(partition, offset)] = PendingRun(msg.run_id, msg.target_table, partition, offset,
                                                            time.monotonic())
        mlog.info("run_finished_received", status=msg.status, records=msg.records_published)

    def _skip(self, partition: int, offset: int) -> None:
        self.skipped += 1
        self.tracker.done(partition, offset)

    def refresh_loaded(self) -> None:
        """Ask the loader's bookkeeping which waiting runs are in Bronze now."""
        waiting = self.pending.waiting()
        if not waiting:
            return
        try:
            got = self.runs_loaded(self._conn(), sorted({r.run_id for r in waiting}))
        except (psycopg.OperationalError, psycopg.InterfaceError, DatabaseError) as e:
            BACKOFF.labels("transformer", "postgres").inc()
            log.warning("load_check_failed", error=str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            self._db = None
            return
        now = time.monotonic()
        for r in waiting:
            if got.get(r.run_id):
                r.loaded_at = now
            elif now - r.received_at >= self.ts.load_wait_timeout_seconds:
                r.loaded_at, r.forced = now, True
                log.warning("run_load_wait_timeout", run_id=r.run_id, table=r.table,
                            exists=r.run_id in got, waited_s=round(now - r.received_at))

    def batch_due(self) -> bool:
        ready = self.pending.ready()
        if not ready:
            return False
        oldest = min(r.loaded_at for r in ready if r.loaded_at is not None)  # all of them: they are ready
        return time.monotonic() - oldest >= self.ts.coalesce_seconds

    def run_ready(self) -> BatchResult | None:
        """One batch for every loaded run; then mark their messages handled."""
        ready = self.pending.ready()
        if not ready:
            return None
        tables = sorted({r.table for r in ready})
        run_ids = sorted({r.run_id for r in ready})
        procs = self.runner.plan.for_tables(tables)
        batch = self.runner.run_batch(procs, trigger="control", run_ids=run_ids, tables=tables)
        self._remember(batch)
        for r in ready:
            del self.pending.runs[(r.partition, r.offset)]
            self.tracker.done(r.partition, r.offset)
        return batch

    def run_due_retries(self, force: bool = False) -> BatchResult | None:
        now = time.monotonic()
        if not force and now - self._last_retry_check < max(1.0, self.ts.poll_interval_seconds * 5):
            return None
        self._last_retry_check = now
        try:
            abandoned = self.runner.mark_abandoned()  # a peer transformer that died mid-procedure
            if abandoned:
                log.warning("abandoned_runs_marked_failed", runs=abandoned)
            due = self.runner.due_retries()
        except psycopg.Error as e:
            log.warning("retry_check_failed", error=str(e).strip().splitlines()[0])
            return None
        if not due:
            return None
        log.info("retrying_procedures", procedures=[d.procedure for d in due], attempts=[d.attempt + 1 for d in due])
        batch = self.runner.run_retries(due)
        if batch is not None:
            self._remember(batch)
        return batch

    def prune_history(self, force: bool = False) -> int:
        """Hourly: drop transform runs and quality results past the retention (latest ones stay)."""
        now = time.monotonic()
        if not force and now - self._last_prune < 3600:
            return 0
        self._last_prune = now
        try:
            n = int(scalar(self._conn(), "SELECT etl.prune_transform_history(make_interval(days => %s))",
                           (self.ts.history_retention_days,)))
        except psycopg.Error as e:
            log.warning("history_prune_failed", error=str(e).strip().splitlines()[0])
            return 0
        if n:
            log.info("history_pruned", rows=n, retention_days=self.ts.history_retention_days)
        return n

    def _remember(self, batch: BatchResult) -> None:
        self.batches.append(batch)
        del self.batches[:-20]

    def _commit(self, only: Sequence[int] | None = None) -> None:
        if self.consumer is None:
            return
        from confluent_kafka import KafkaException, TopicPartition

        todo = {p: o for p, o in self.tracker.committable().items() if only is None or p in only}
        if not todo:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in todo.items()],
                                 asynchronous=False)
        except KafkaException as e:
            log.warning("offset_commit_failed", error=str(e))
            return
        for p, o in todo.items():
            self.tracker.committed(p, o)
        log.debug("offsets_committed", offsets=todo)

    # -- the loop ---------------------------------------------------------------------------------
    def step(self) -> BatchResult | None:
        """One iteration: poll, classify, check loads, maybe run a batch or due retries, commit."""
        from confluent_kafka import KafkaError

        assert self.consumer is not None, "step() before open()"
        msgs = self.consumer.consume(num_messages=500, timeout=self.ts.poll_interval_seconds)
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer_error", error=str(err))
                continue
            partition, offset = m.partition(), m.offset()
            assert partition is not None and offset is not None  # a consumed record has both
            self.handle_message(partition, offset, m.value())
        self.refresh_loaded()
        batch = self.run_ready() if self.batch_due() else None
        retry = self.run_due_retries()
        self._commit()
        self.prune_history()
        return batch or retry

    def run_forever(self) -> None:
        self.open()
        try:
            while not self.stop_event.is_set():
                try:
                    self.step()
                except (psycopg.OperationalError, psycopg.InterfaceError, DatabaseError) as e:
                    # DatabaseError: a (re)connect found the server down -- restarting, failing over
                    BACKOFF.labels("transformer", "postgres").inc()
                    log.warning("database_unavailable", error=str(e).strip().splitlines()[0])
                    self.stop_event.wait(5)
        finally:
            self.close()
            log.info("transformer_stopped")

    def install_signal_handlers(self) -> None:
        def _stop(signum: int, frame: object) -> None:
            log.info("transformer_stopping", signal=signum)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)


def serve(settings: Settings | None = None, tsettings: TransformSettings | None = None,
          metrics_port: int | None = None) -> None:
    """``trialsync transform``: the long-running service with its metrics endpoint."""
    s = settings or get_settings()
    t = Transformer(s, tsettings)
    # /readyz: the standard checks of a transformer (database, broker; common.health)
    server = start_metrics_server("transformer", metrics_port)
    t.install_signal_handlers()
    try:
        t.run_forever()
    finally:
        if server is not None:
            server.stop()
