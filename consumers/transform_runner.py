"""Runs Silver/Gold procedures: each in its own transaction with a statement timeout, each recorded
in ``etl.dw_transform_runs``, then the data-quality checks of the tables that changed.

Used by the control-topic consumer (consumers/transformer.py) and by ``trialsync transform --now``.

Failure handling, and why it is kept in the database: a failed procedure is recorded with its error
and ``next_retry_at`` (exponential backoff); the procedures that depend on it are recorded as
``skipped`` for that batch; every other procedure still runs. :meth:`ProcedureRunner.due_retries`
reads the schedule back from ``dw_transform_runs``, so a restarted transformer resumes the retries
and ``trialsync transform --status`` shows them. A failing ``error``-severity quality check marks
the run that built its table ``failed`` (error_class ``QualityCheckFailed``): its data is committed,
retrying would not change it, so it is not retried -- the next transform of the table checks again.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from common.config import Settings, get_settings
from common.db import DatabaseError, connect, scalar
from common.logging import get_logger, scrub
from common.metrics import TRANSFORM_DURATION, TRANSFORM_ROWS, TRANSFORM_RUNS
from consumers.quality import QualityResult, open_check_connection, run_quality_checks
from consumers.transform_plan import Procedure, TransformPlan
from consumers.transform_settings import TransformSettings, load_transform_settings

log = get_logger("transform")
QUALITY_ERROR_CLASS = "QualityCheckFailed"
ACTIONS = ("inserted", "updated", "closed", "deleted")


@dataclass
class ProcedureResult:
    procedure: str
    target_table: str
    status: str  # success | failed | skipped
    run_id: int | None = None
    attempt: int = 1
    counts: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    error_class: str | None = None
    error: str | None = None


@dataclass
class BatchResult:
    batch_id: uuid.UUID
    procedures: list[ProcedureResult] = field(default_factory=list)
    quality: list[QualityResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ProcedureResult]:
        return [r for r in self.procedures if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed and not [r for r in self.procedures if r.status == "skipped"]


@dataclass(frozen=True)
class DueRetry:
    procedure: str
    attempt: int  # the attempt that failed
    trigger_run_ids: tuple[int, ...]
    trigger_tables: tuple[str, ...]
    next_retry_at: datetime | None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return scrub(text.splitlines()[0] if text else type(e).__name__)[:2000]


class ProcedureRunner:
    """Executes batches of procedures against one database."""

    def __init__(self, settings: Settings | None = None, tsettings: TransformSettings | None = None,
                 plan: TransformPlan | None = None,
                 on_progress: Callable[[Procedure, str], None] | None = None):
        self.settings = settings or get_settings()
        self.ts = tsettings or load_transform_settings()
        self._work: psycopg.Connection | None = None   # runs the procedures (one transaction each)
        self._meta: psycopg.Connection | None = None   # autocommit: run rows visible while a procedure runs
        self._checks: psycopg.Connection | None = None  # the read-only login: quality checks' SQL
        self._checks_unavailable = False                # no reader login configured (warned once)
        self._plan = plan
        self.on_progress = on_progress
        self.host = socket.gethostname()[:255]

    # -- connections ------------------------------------------------------------------------------
    def _conn(self, meta: bool) -> psycopg.Connection:
        attr = "_meta" if meta else "_work"
        c: psycopg.Connection | None = getattr(self, attr)
        if c is None or c.closed or c.broken:
            if c is not None:
                c.close()
            c = connect(self.settings, autocommit=meta,
                        application_name="trialsync-transform" + ("-meta" if meta else ""))
            if not meta:
                # if this process dies mid-procedure, the server notices within seconds and rolls the
                # procedure back instead of running it to the end for nobody
                c.execute("SET client_connection_check_interval = '5s'")
                c.commit()
            setattr(self, attr, c)
        return c

    def _check_conn(self) -> psycopg.Connection | None:
        """The read-only login's connection the quality checks' SQL runs on (consumers/quality.py);
        None without a reader login (the checks then run read-only on the meta connection)."""
        c = self._checks
        if self._checks_unavailable:
            return None
        if c is None or c.closed or c.broken:
            if c is not None:
                c.close()
            c = open_check_connection(self.settings)
            if c is None:
                self._checks_unavailable = True
                log.warning("quality_checks_without_reader_login",
                            note="check SQL runs read-only on the transformer's own login; set "
                                 "DATABASE_READER_URL or DATABASE_READER_PASSWORD for the read-only login")
            self._checks = c
        return c

    @property
    def plan(self) -> TransformPlan:
        if self._plan is None:
            self._plan = TransformPlan.load(self._conn(meta=True))
        return self._plan

    def close(self) -> None:
        for c in (self._work, self._meta, self._checks):
            if c is not None:
                c.close()
        self._work = self._meta = self._checks = None

    # -- one procedure ----------------------------------------------------------------------------
    def _start_row(self, batch_id: uuid.UUID, p: Procedure, trigger: str, run_ids: Sequence[int],
                   tables: Sequence[str], attempt: int, status: str = "running", db_pid: int | None = None) -> int:
        row = self._conn(meta=True).execute(
            "INSERT INTO etl.dw_transform_runs (batch_id, procedure_name, target_table, trigger, trigger_run_ids, "
            "trigger_tables, attempt, status, host, pid, db_pid) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "RETURNING id",
            (batch_id, p.name, p.target_table, trigger, list(run_ids), list(tables), attempt, status, self.host,
             os.getpid(), db_pid)).fetchone()
        assert row is not None  # INSERT ... RETURNING answers the row
        return int(row[0])

    def _finish_row(self, r: ProcedureResult, next_retry_s: float | None) -> None:
        self._conn(meta=True).execute(
            "UPDATE etl.dw_transform_runs SET status = %s, rows_inserted = %s, rows_updated = %s, rows_closed = %s, "
            "rows_deleted = %s, finished_at = now(), duration_seconds = %s, error_class = %s, error_message = %s, "
            "next_retry_at = CASE WHEN %s::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => %s::float8) END "
            "WHERE id = %s",
            (r.status, r.counts.get("inserted"), r.counts.get("updated"), r.counts.get("closed"),
             r.counts.get("deleted"), round(r.duration_s, 3), r.error_class, r.error, next_retry_s, next_retry_s,
             r.run_id))

    def run_procedure(self, p: Procedure, batch_id: uuid.UUID, trigger: str = "manual",
                      run_ids: Sequence[int] = (), tables: Sequence[str] = (), attempt: int = 1) -> ProcedureResult:
        """CALL one procedure in its own transaction; record it; never raise for a database error."""
        result = ProcedureResult(p.name, p.target_table, "failed", attempt=attempt)
        try:
            db_pid: int | None = self._conn(meta=False).info.backend_pid
        except Exception:  # noqa: BLE001 - the CALL below reports the database error properly
            db_pid = None
        result.run_id = self._start_row(batch_id, p, trigger, run_ids, tables, attempt, db_pid=db_pid)
        plog = log.bind(procedure=p.name, batch_id=str(batch_id), attempt=attempt)
        if self.on_progress:
            self.on_progress(p, "running")
        t0 = time.perf_counter()
        try:
            conn = self._conn(meta=False)
            with conn.transaction():
                conn.execute("SELECT set_config('statement_timeout', %s, true), "
                             "set_config('trialsync.watermark_margin', %s, true), set_config('work_mem', %s, true)",
                             (str(self.ts.statement_timeout_seconds * 1000),
                              f"{self.ts.watermark_margin_seconds} seconds", self.ts.work_mem))
                row = conn.execute(p.call_sql()).fetchone()
            result.counts = dict(zip(ACTIONS, (int(x or 0) for x in (row or (0, 0, 0, 0))), strict=True))
            result.status = "success"
        except psycopg.Error as e:
            result.error_class = type(e).__name__
            result.error = _first_line(e)
        result.duration_s = time.perf_counter() - t0
        next_retry = None
        if result.status == "failed" and attempt < self.ts.max_attempts:
            next_retry = self.ts.retry_delay(attempt)
        try:
            self._finish_row(result, next_retry)
        except psycopg.Error as e:  # the database went away between the CALL and the bookkeeping
            plog.error("transform_run_not_recorded", error=_first_line(e))
        TRANSFORM_DURATION.labels(p.name).observe(result.duration_s)
        TRANSFORM_RUNS.labels(p.name, result.status).inc()
        for action, n in result.counts.items():
            if n:
                TRANSFORM_ROWS.labels(p.name, action).inc(n)
        if result.status == "success":
            plog.info("procedure_succeeded", duration_s=round(result.duration_s, 3), **result.counts)
        else:
            plog.error("procedure_failed", error_class=result.error_class, error=result.error,
                       duration_s=round(result.duration_s, 3), next_retry_s=next_retry)
        if self.on_progress:
            self.on_progress(p, result.status)
        return result

    # -- a batch ----------------------------------------------------------------------------------
    def run_batch(self, procedures: Iterable[Procedure], *, trigger: str = "manual", run_ids: Sequence[int] = (),
                  tables: Sequence[str] = (), attempts: dict[str, int] | None = None,
                  quality: bool | None = None, force_checks: bool | None = None) -> BatchResult:
        """Run ``procedures`` in run order; skip those whose dependency failed here; then check quality.

        ``force_checks`` (default: only for manual batches) runs every check of the changed tables,
        ignoring their min_interval_seconds."""
        procs = sorted(set(procedures), key=lambda p: (p.run_order, p.name))
        batch = BatchResult(uuid.uuid4())
        attempts = attempts if attempts is not None else self.next_attempts([p.name for p in procs])
        failed: set[str] = set()
        blog = log.bind(batch_id=str(batch.batch_id), trigger=trigger)
        blog.info("transform_batch_started", procedures=[p.name for p in procs], tables=list(tables),
                  run_ids=list(run_ids))
        for p in procs:
            blocked = sorted(failed & self.plan.ancestors(p.name)) if p.name in self.plan else []
            if blocked:
                r = ProcedureResult(p.name, p.target_table, "skipped",
                                    error_class="UpstreamFailed", error=f"skipped: {', '.join(blocked)} failed")
                r.run_id = self._start_row(batch.batch_id, p, trigger, run_ids, tables, 1, status="skipped")
                self._finish_row(r, None)
                TRANSFORM_RUNS.labels(p.name, "skipped").inc()
                blog.warning("procedure_skipped", procedure=p.name, failed_upstream=blocked)
                batch.procedures.append(r)
                failed.add(p.name)  # its own dependents wait too
                continue
            r = self.run_procedure(p, batch.batch_id, trigger, run_ids, tables, attempts.get(p.name, 1))
            batch.procedures.append(r)
            if r.status == "failed":
                failed.add(p.name)
        if quality if quality is not None else self.ts.quality_enabled:
            self._check_quality(batch, trigger == "manual" if force_checks is None else force_checks)
        blog.info("transform_batch_finished", ok=batch.ok,
                  failed=[r.procedure for r in batch.failed],
                  quality_failed=[q.check.name for q in batch.quality if q.status in ("fail", "error")])
        return batch

    def _check_quality(self, batch: BatchResult, force: bool) -> None:
        done = {r.target_table: r for r in batch.procedures if r.status == "success"}
        if not done:
            return
        conn = self._conn(meta=True)
        tables = set(done)
        if any(t.startswith("gold.") for t in done):  # Gold views have no procedure of their own
            tables.add("gold.*")
        try:
            batch.quality = run_quality_checks(
                conn, tables, batch_id=batch.batch_id,
                run_ids={t: r.run_id for t, r in done.items() if r.run_id is not None},
                timeout_s=self.ts.quality_timeout_seconds, force=force, reader=self._check_conn())
        except (psycopg.Error, DatabaseError) as e:
            log.error("quality_checks_failed_to_run", error=_first_line(e))
            return
        blocking: dict[str, list[QualityResult]] = {}
        for q in batch.quality:
            if q.is_blocking:
                blocking.setdefault(q.check.target_table, []).append(q)
        for table, qs in blocking.items():
            r = done.get(table)
            if r is None:  # a Gold view: recorded and alerted on, no procedure of its own to fail
                continue
            r.status = "failed"
            r.error_class = QUALITY_ERROR_CLASS
            r.error = "quality check failed: " + "; ".join(q.summary() for q in qs)
            conn.execute("UPDATE etl.dw_transform_runs SET status = 'failed', error_class = %s, error_message = %s, "
                         "next_retry_at = NULL WHERE id = %s", (r.error_class, r.error[:4000], r.run_id))
            TRANSFORM_RUNS.labels(r.procedure, "quality_failed").inc()
            log.error("transform_run_failed_quality", procedure=r.procedure, checks=[q.check.name for q in qs])

    # -- retries ----------------------------------------------------------------------------------
    def latest_runs(self) -> dict[str, tuple]:
        rows = self._conn(meta=True).execute(
            "SELECT DISTINCT ON (procedure_name) procedure_name, status, attempt, error_class, next_retry_at, "
            "trigger_run_ids, trigger_tables FROM etl.dw_transform_runs WHERE status IN ('success', 'failed') "
            "ORDER BY procedure_name, started_at DESC, id DESC").fetchall()
        return {r[0]: r for r in rows}

    def next_attempts(self, names: Iterable[str]) -> dict[str, int]:
        """Attempt numbers: one more than the last failure of a procedure still failing, else 1."""
        latest = self.latest_runs()
        out = {}
        for n in names:
            r = latest.get(n)
            out[n] = r[2] + 1 if r is not None and r[1] == "failed" and r[3] != QUALITY_ERROR_CLASS else 1
        return out

    def due_retries(self, now_only: bool = True) -> list[DueRetry]:
        """Failed procedures whose backoff has elapsed (``now_only``) or is scheduled at all."""
        rows = self._conn(meta=True).execute(
            "SELECT procedure_name, attempt, trigger_run_ids, trigger_tables, next_retry_at FROM ("
            "  SELECT DISTINCT ON (procedure_name) * FROM etl.dw_transform_runs WHERE status IN ('success', 'failed')"
            "  ORDER BY procedure_name, started_at DESC, id DESC) l "
            "WHERE status = 'failed' AND next_retry_at IS NOT NULL AND (NOT %s OR next_retry_at <= now())",
            (now_only,)).fetchall()
        return [DueRetry(r[0], r[1], tuple(r[2] or ()), tuple(r[3] or ()), r[4]) for r in rows if r[0] in self.plan]

    def run_retries(self, retries: Sequence[DueRetry]) -> BatchResult | None:
        """Retry due procedures (and what depends on them) as one batch."""
        if not retries:
            return None
        procs = self.plan.downstream(r.procedure for r in retries)
        attempts = {r.procedure: r.attempt + 1 for r in retries}
        run_ids = sorted({i for r in retries for i in r.trigger_run_ids})
        tables = sorted({t for r in retries for t in r.trigger_tables})
        return self.run_batch(procs, trigger="retry", run_ids=run_ids, tables=tables,
                              attempts={p.name: attempts.get(p.name, 1) for p in procs})

    def mark_abandoned(self) -> int:
        """Runs left 'running' by a process that died: their database backend is gone (a live
        transformer's backend is in pg_stat_activity), or -- when the pid is unknown -- they are older
        than the statement timeout + 5 min. Marked failed and retried at once."""
        rows = self._conn(meta=True).execute(
            "UPDATE etl.dw_transform_runs r SET status = 'failed', finished_at = now(), error_class = 'Abandoned', "
            "error_message = 'the transformer stopped while this procedure ran; its transaction was rolled back', "
            "next_retry_at = now() "
            "WHERE r.status = 'running' AND ("
            "   (r.db_pid IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.db_pid))"
            "   OR r.started_at < now() - make_interval(secs => %s)) RETURNING r.id",
            (self.ts.statement_timeout_seconds + 300,)).fetchall()
        return len(rows)

    def reset_watermarks(self, procedures: Iterable[Procedure] | None = None) -> int:
        """Forget incremental state (all, or of ``procedures``): the next run re-reads all of Bronze."""
        conn = self._conn(meta=True)
        if procedures is None:
            return int(scalar(conn, "SELECT etl.reset_transform_watermarks()"))
        return sum(int(scalar(conn, "SELECT etl.reset_transform_watermarks(%s)", (p.name,))) for p in procedures)
