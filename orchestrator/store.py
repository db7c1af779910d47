"""What the runner reads and writes in PostgreSQL: orchestration rows, skipped/failed run rows,
per-job advisory locks, "is this run loaded?", live counters.

Kept apart from the scheduling logic in ``runner.py`` so that logic is testable with an in-memory
fake (tests/unit) and this module with the real database (tests/integration).

Advisory locks: ``pg_try_advisory_lock(LOCK_CLASS, job_id)`` on one dedicated session, held for as
long as the job's attempts run. Two orchestrators (two scheduler replicas, a scheduler and an
operator's ``trialsync run``) therefore never extract the same job at the same time; if the
orchestrator dies, PostgreSQL releases the lock with its session.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import psycopg
from psycopg import sql
from psycopg.abc import Params, QueryNoTemplate

from common.config import Settings, get_settings
from common.db import connect
from common.logging import get_logger
from schemas.jobs import Job

log = get_logger("orchestrator.store")

#: first key of the two-int advisory lock space used for jobs ('TS' + 1); the migration runner
#: uses the single-bigint space, so the two can never collide
LOCK_CLASS = 0x5453_0001
HOST = socket.gethostname()[:255]


@dataclass
class RunRow:
    run_id: int
    job_id: int
    status: str
    records_extracted: int = 0
    records_published: int = 0
    records_loaded: int = 0
    records_rejected: int = 0
    api_calls: int = 0
    duration_seconds: float | None = None
    error_class: str | None = None
    error_message: str | None = None
    load_completed: bool = False
    failed_parents: list[dict[str, Any]] | None = None


class RunStore(Protocol):
    def begin_orchestration(self, oid: str, trigger: str, selection: dict[str, Any], mode: str,
                            jobs_total: int) -> None: ...

    def finish_orchestration(self, oid: str, status: str, counts: dict[str, int], error: str | None = None) -> None: ...

    def open_budget(self, oid: str, budget: int, jobs: Sequence[Job]) -> None: ...

    def record_skipped(self, job_id: int, oid: str, trigger: str, reason: str) -> int: ...

    def mark_failed(self, job_id: int, oid: str, attempt: int, trigger: str, error_class: str, message: str,
                    parent_run_id: int | None = None, status: str = "failed") -> int: ...

    def mark_cancelled(self, run_id: int, reason: str) -> None: ...

    def try_lock(self, job_id: int) -> bool: ...

    def unlock(self, job_id: int) -> None: ...

    def loaded(self, run_ids: Sequence[int]) -> dict[int, bool]: ...

    def run_rows(self, run_ids: Sequence[int]) -> dict[int, RunRow]: ...

    def last_costs(self, job_ids: Sequence[int]) -> dict[int, float]: ...

    def count_rows(self, table: str) -> int: ...

    def recent_run(self, job_id: int, since: float, exclude_orchestration: str) -> tuple[int, str] | None: ...

    def close(self) -> None: ...


def mark_stale_orchestrations(conn: psycopg.Connection) -> list[str]:
    """Orchestrations left 'running' by an orchestrator process that died on this host -> failed.

    Their extraction runs are found stale by the extractor (``producers.runs``); this closes the
    orchestration itself, so alerting stops waiting for retries that will never come.
    """
    from common.stack import pid_alive

    out = []
    rows = conn.execute("""SELECT id::text, pid FROM etl.dw_orchestrations
                            WHERE status = 'running' AND host = %s AND pid IS NOT NULL""", (HOST,)).fetchall()
    for oid, pid in rows:
        if pid == os.getpid() or pid_alive(int(pid)):
            continue
        conn.execute(
            """UPDATE etl.dw_orchestrations SET status = 'failed', completed_at = now(),
                      duration_seconds = round(extract(epoch FROM now() - started_at)::numeric, 3),
                      error_message = %s
                WHERE id = %s AND status = 'running'""",
            (f"the orchestrator process {pid} on {HOST} died before finishing", oid))
        out.append(oid)
    if out:
        log.warning("stale_orchestrations_closed", orchestration_ids=out)
    return out


def _json(obj: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


class DbRunStore:
    """The real store: one connection for queries, one session holding the job locks."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self._conn: psycopg.Connection | None = None
        self._lock_conn: psycopg.Connection | None = None
        self._held: set[int] = set()

    # -- connections ---------------------------------------------------------------------------
    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.settings, autocommit=True, application_name="trialsync-orchestrator")
        return self._conn

    def _exec(self, query: QueryNoTemplate, params: Params | None = None) -> psycopg.Cursor[Any]:
        """Execute with one reconnect: a database restart mid-run should cost a retry, not the run."""
        try:
            return self.conn.execute(query, params)
        except psycopg.OperationalError:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return self.conn.execute(query, params)

    def close(self) -> None:
        for c in (self._conn, self._lock_conn):
            if c is not None and not c.closed:
                c.close()
        self._conn = self._lock_conn = None
        self._held.clear()

    # -- orchestrations ------------------------------------------------------------------------
    def preflight(self, job_ids: Sequence[int]) -> None:
        """Fail early, in one line, when the schema or the catalog rows a run needs are missing."""
        from common.db import DatabaseError

        row = self._exec("SELECT to_regclass('etl.dw_orchestrations') IS NOT NULL").fetchone()
        if not row or not row[0]:
            raise DatabaseError("the orchestration tables are missing (migration 0400): run `trialsync db migrate`")
        have = {int(r[0]) for r in self._exec("SELECT id FROM etl.dw_etl_jobs WHERE id = ANY(%s)",
                                              (list(job_ids),)).fetchall()}
        missing = sorted(set(job_ids) - have)
        if missing:
            raise DatabaseError(f"job(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} are not in "
                                "etl.dw_etl_jobs: run `trialsync jobs sync`")

    def begin_orchestration(self, oid: str, trigger: str, selection: dict[str, Any], mode: str,
                            jobs_total: int) -> None:
        try:
            mark_stale_orchestrations(self.conn)
        except psycopg.Error as e:
            log.warning("stale_orchestration_check_failed", error=str(e).splitlines()[0] if str(e) else "")
        self._exec(
            """INSERT INTO etl.dw_orchestrations (id, trigger, selection, mode, jobs_total, host, pid)
               VALUES (%s, %s, %s::jsonb, %s, %s, %s, %s)""",
            (oid, trigger[:32], _json(selection), mode, jobs_total, HOST, os.getpid()))

    def open_budget(self, oid: str, budget: int, jobs: Sequence[Job]) -> None:
        """The night's call budget, with every job's expected changed-parent calls (producers.call_plan)."""
        from producers.call_plan import estimate_all, open_night

        open_night(self.conn, oid, budget, estimate_all(self.conn, list(jobs), self.settings))

    def finish_orchestration(self, oid: str, status: str, counts: dict[str, int], error: str | None = None) -> None:
        self._exec(
            """UPDATE etl.dw_orchestrations SET status = %(status)s, completed_at = now(),
                      duration_seconds = round(extract(epoch FROM now() - started_at)::numeric, 3),
                      jobs_succeeded = %(success)s, jobs_partial = %(partial)s, jobs_failed = %(failed)s,
                      jobs_skipped = %(skipped)s, records_extracted = %(records_extracted)s,
                      records_loaded = %(records_loaded)s, error_message = %(error)s
               WHERE id = %(oid)s""",
            {"oid": oid, "status": status, "error": error,
             **{k: int(counts.get(k, 0)) for k in ("success", "partial", "failed", "skipped",
                                                    "records_extracted", "records_loaded")}})

    # -- run rows the orchestrator writes itself -----------------------------------------------
    def record_skipped(self, job_id: int, oid: str, trigger: str, reason: str) -> int:
        """A 'skipped' run row: the job was part of the run but did not start, and why."""
        with self.conn.transaction():
            row = self._exec(
                """INSERT INTO etl.dw_etl_runs (job_id, run_status, mode, trigger, orchestration_id, attempt,
                                                error_class, error_message, completed_at, duration_seconds,
                                                host, pid, run_context)
                   VALUES (%s, 'skipped', 'full', %s, %s, 0, 'Skipped', %s, now(), 0, %s, %s, %s::jsonb)
                   RETURNING id""",
                (job_id, trigger[:32], oid, reason, HOST, os.getpid(), _json({"skip_reason": reason}))).fetchone()
            assert row is not None
            self._exec("""UPDATE etl.dw_etl_jobs SET last_run_id = %s, last_run_at = now(), last_run_status = 'skipped',
                                 last_run_records = 0 WHERE id = %s""", (row[0], job_id))
        return int(row[0])

    def mark_failed(self, job_id: int, oid: str, attempt: int, trigger: str, error_class: str, message: str,
                    parent_run_id: int | None = None, status: str = "failed") -> int:
        """Record that an attempt was stopped (timeout) or died: fail its row, or insert one if the
        process never got as far as creating it. A row already final (the child finished just as it
        was stopped) is left as it is."""
        with self.conn.transaction():
            row = self._exec(
                """SELECT id, run_status FROM etl.dw_etl_runs
                   WHERE orchestration_id = %s AND job_id = %s AND attempt = %s AND run_status <> 'skipped'
                   ORDER BY id DESC LIMIT 1 FOR UPDATE""", (oid, job_id, attempt)).fetchone()
            if row is not None and row[1] != "running":
                return int(row[0])
            if row is not None:
                run_id = int(row[0])
                self._exec(
                    """UPDATE etl.dw_etl_runs SET run_status = %s, error_class = %s, error_message = %s,
                              completed_at = now(), heartbeat_at = now(),
                              duration_seconds = round(extract(epoch FROM now() - started_at)::numeric, 3)
                       WHERE id = %s""", (status, error_class, message, run_id))
            else:
                ins = self._exec(
                    """INSERT INTO etl.dw_etl_runs (job_id, run_status, mode, trigger, parent_run_id, orchestration_id,
                                                    attempt, error_class, error_message, completed_at,
                                                    duration_seconds, host, pid)
                       VALUES (%s, %s, 'full', %s, %s, %s, %s, %s, %s, now(), 0, %s, %s) RETURNING id""",
                    (job_id, status, trigger[:32], parent_run_id, oid, attempt, error_class, message, HOST,
                     os.getpid())).fetchone()
                assert ins is not None
                run_id = int(ins[0])
            self._exec("""UPDATE etl.dw_etl_jobs SET last_run_id = %s, last_run_at = now(), last_run_status = %s,
                                 last_run_records = (SELECT records_published FROM etl.dw_etl_runs WHERE id = %s)
                          WHERE id = %s""", (run_id, status, run_id, job_id))
        return run_id

    def mark_cancelled(self, run_id: int, reason: str) -> None:
        """A run stopped on purpose (it recorded itself failed/interrupted, or is still running): cancelled."""
        with self.conn.transaction():
            row = self._exec(
                """UPDATE etl.dw_etl_runs SET run_status = 'cancelled', error_class = 'Cancelled',
                          error_message = %s, completed_at = coalesce(completed_at, now()),
                          duration_seconds = coalesce(duration_seconds,
                                                      round(extract(epoch FROM now() - started_at)::numeric, 3))
                    WHERE id = %s AND run_status IN ('running', 'failed') RETURNING job_id""",
                (reason, run_id)).fetchone()
            if row is not None:
                self._exec("""UPDATE etl.dw_etl_jobs SET last_run_status = 'cancelled'
                               WHERE id = %s AND last_run_id = %s""", (row[0], run_id))

    # -- locks ---------------------------------------------------------------------------------
    def _locks(self) -> psycopg.Connection:
        if self._lock_conn is None or self._lock_conn.closed or self._lock_conn.broken:
            lost = sorted(self._held)
            self._held.clear()
            self._lock_conn = connect(self.settings, autocommit=True, application_name="trialsync-orchestrator-locks")
            if lost:
                # the session holding our advisory locks ended (database restart, network cut): take
                # them again at once, so a second orchestrator cannot start these jobs meanwhile
                regained = [j for j in lost if self._relock(j)]
                log.warning("lock_session_lost", jobs=lost, regained=regained,
                            not_regained=[j for j in lost if j not in regained])
        return self._lock_conn

    def _relock(self, job_id: int) -> bool:
        assert self._lock_conn is not None
        got = self._lock_conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, job_id)).fetchone()
        if got and got[0]:
            self._held.add(job_id)
            return True
        return False

    def try_lock(self, job_id: int) -> bool:
        got = self._locks().execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, job_id)).fetchone()
        ok = bool(got and got[0])
        if ok:
            self._held.add(job_id)
        return ok

    def unlock(self, job_id: int) -> None:
        if job_id not in self._held:
            return
        self._held.discard(job_id)
        try:
            self._locks().execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, job_id))
        except psycopg.Error as e:
            log.warning("unlock_failed", job_id=job_id, error=str(e).splitlines()[0] if str(e) else "")

    # -- reading runs --------------------------------------------------------------------------
    def loaded(self, run_ids: Sequence[int]) -> dict[int, bool]:
        if not run_ids:
            return {}
        try:
            from consumers.run_progress import runs_loaded
        except ImportError:  # pragma: no cover - before the loader's module exists
            rows = self._exec("SELECT id, load_completed_at IS NOT NULL FROM etl.dw_etl_runs WHERE id = ANY(%s)",
                              (list(run_ids),)).fetchall()
            return {int(r): bool(ok) for r, ok in rows}
        try:
            return runs_loaded(self.conn, list(run_ids))
        except psycopg.OperationalError:
            self._conn = None
            return runs_loaded(self.conn, list(run_ids))

    def run_rows(self, run_ids: Sequence[int]) -> dict[int, RunRow]:
        if not run_ids:
            return {}
        rows = self._exec(
            """SELECT id, job_id, run_status, records_extracted, records_published, records_loaded,
                      records_rejected, api_calls, duration_seconds, error_class, error_message,
                      load_completed_at IS NOT NULL, run_context -> 'failed_parents'
               FROM etl.dw_etl_runs WHERE id = ANY(%s)""", (list(run_ids),)).fetchall()
        out = {}
        for r in rows:
            out[int(r[0])] = RunRow(
                run_id=int(r[0]), job_id=int(r[1]), status=r[2], records_extracted=int(r[3] or 0),
                records_published=int(r[4] or 0), records_loaded=int(r[5] or 0), records_rejected=int(r[6] or 0),
                api_calls=int(r[7] or 0), duration_seconds=float(r[8]) if r[8] is not None else None,
                error_class=r[9], error_message=r[10], load_completed=bool(r[11]),
                failed_parents=r[12] if isinstance(r[12], list) else None)
        return out

    def recent_run(self, job_id: int, since: float, exclude_orchestration: str) -> tuple[int, str] | None:
        """The latest complete (non-retry) run of ``job_id`` another process started at or after
        ``since`` (epoch seconds) and finished: ``(run_id, status)``, or None. Asked while holding
        the job's lock, so the answer cannot change under the caller."""
        row = self._exec(
            """SELECT id, run_status FROM etl.dw_etl_runs
               WHERE job_id = %s AND started_at >= to_timestamp(%s) AND mode IN ('full', 'incremental')
                 AND run_status IN ('success', 'partial', 'failed')
                 AND orchestration_id IS DISTINCT FROM %s::uuid
               ORDER BY started_at DESC, id DESC LIMIT 1""", (job_id, since, exclude_orchestration)).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def last_costs(self, job_ids: Sequence[int]) -> dict[int, float]:
        """API calls of each job's last successful run: the weights of the critical-path order."""
        if not job_ids:
            return {}
        rows = self._exec(
            """SELECT DISTINCT ON (job_id) job_id, api_calls FROM etl.dw_etl_runs
               WHERE job_id = ANY(%s) AND run_status IN ('success', 'partial') AND mode IN ('full', 'incremental')
               ORDER BY job_id, started_at DESC""", (list(job_ids),)).fetchall()
        return {int(j): float(n) for j, n in rows if n}

    def count_rows(self, table: str) -> int:
        """Rows of a Bronze staging table (a parameterized job makes about one call per row)."""
        from common.db import staging_table

        row = self._exec(sql.SQL("SELECT count(*) FROM {} WHERE NOT is_deleted").format(staging_table(table))).fetchone()
        return int(row[0]) if row else 0
