"""Run bookkeeping in ``etl.dw_etl_runs`` and ``etl.dw_etl_jobs.last_run_*``.

Lifecycle: ``create_run`` inserts a ``running`` row (host, pid, process start time) →
a :class:`Heartbeat` thread refreshes ``heartbeat_at`` and the live counters every few seconds →
``record_results`` writes the final counters, end offsets, failed parents and watermarks while the
row is still ``running`` → ``finish_run`` sets the final status (``success`` | ``partial`` |
``failed``), ``completed_at``, the duration, and the job's ``last_run_*``/``last_success_at``.

Counters and ``run_context`` are written **before** the status changes, so whoever reacts to a
final status (the loader marking ``records_loaded``/``load_completed_at``, the orchestrator, a
``retry``) always finds them. This module never writes ``records_loaded`` or
``load_completed_at``: those belong to the loader.

Stale runs: a process killed midway (``kill -9``, OOM, power loss) leaves its row ``running``.
:func:`detect_stale_runs`, called whenever a run starts, marks such rows ``failed`` when their
heartbeat is older than ``STALE_AFTER_SECONDS``, or at once when they ran on this host and their
process is gone (pid absent, a zombie, or reused by another process -- compared by start time).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg

from common.config import Settings
from common.logging import get_logger

log = get_logger("runs")

HEARTBEAT_SECONDS = 5.0
#: a run whose heartbeat is older than this is dead, wherever it ran
STALE_AFTER_SECONDS = 120.0
HOST = socket.gethostname()[:255]


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    rest = data[data.rfind(b")") + 2:].split()
    if not rest or rest[0] in (b"Z", b"X"):
        return None
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start_time: int | None) -> bool:
    """True when ``pid`` runs on this host and (if known) is the same process that started the run."""
    if pid <= 0:
        return False
    if os.path.exists("/proc"):
        st = process_start_time(pid)
        if st is None:
            return False
        return start_time is None or st == start_time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StaleRun:
    run_id: int
    job_id: int
    reason: str


def create_run(conn: psycopg.Connection, *, job_id: int, mode: str, trigger: str = "cli",
               parent_run_id: int | None = None, orchestration_id: str | None = None, attempt: int = 1,
               context: dict[str, Any] | None = None) -> int:
    """Insert the ``running`` row and point the job's ``last_run_*`` at it; return the run id."""
    pid = os.getpid()
    ctx = {"host": HOST, "pid": pid, "proc_start": process_start_time(pid), **(context or {})}
    with conn.transaction():
        row = conn.execute(
            """INSERT INTO etl.dw_etl_runs (job_id, run_status, mode, trigger, parent_run_id, orchestration_id,
                                            attempt, host, pid, run_context)
               VALUES (%s, 'running', %s, %s, %s, %s, %s, %s, %s, %s::jsonb)
               RETURNING id, started_at""",
            (job_id, mode, trigger[:32], parent_run_id, orchestration_id, attempt, HOST, pid, _json(ctx)),
        ).fetchone()
        assert row is not None
        run_id, started = int(row[0]), row[1]
        conn.execute(
            """UPDATE etl.dw_etl_jobs SET last_run_id = %s, last_run_at = %s, last_run_status = 'running',
                      last_run_records = NULL
               WHERE id = %s""",
            (run_id, started, job_id),
        )
    return run_id


def detect_stale_runs(conn: psycopg.Connection, *, stale_after: float = STALE_AFTER_SECONDS,
                      job_id: int | None = None) -> list[StaleRun]:
    """Mark abandoned ``running`` rows ``failed`` (reason in ``error_message``); return them."""
    found: list[StaleRun] = []
    with conn.transaction():
        rows = conn.execute(
            """SELECT id, job_id, host, pid, run_context->>'proc_start',
                      extract(epoch FROM now() - heartbeat_at)
               FROM etl.dw_etl_runs
               WHERE run_status = 'running' AND (%(job)s::int IS NULL OR job_id = %(job)s)
               FOR UPDATE SKIP LOCKED""",
            {"job": job_id},
        ).fetchall()
        for run_id, jid, host, pid, proc_start, age in rows:
            reason = None
            if age is not None and float(age) > stale_after:
                reason = f"no heartbeat for {float(age):.0f} s (threshold {stale_after:.0f} s): the extractor died"
            elif host == HOST and pid is not None:
                start = int(proc_start) if proc_start and str(proc_start).isdigit() else None
                if pid == os.getpid() and (start is None or start == process_start_time(pid)):
                    continue  # a run of this very process (e.g. the orchestrator runs jobs in threads)
                if not process_alive(int(pid), start):
                    reason = f"process {pid} on {host} is gone (killed or crashed while running)"
            if reason is None:
                continue
            conn.execute(
                """UPDATE etl.dw_etl_runs SET run_status = 'failed', error_class = 'StaleRun', error_message = %s,
                          completed_at = now(),
                          duration_seconds = round(extract(epoch FROM now() - started_at)::numeric, 3)
                   WHERE id = %s""",
                (f"stale run: {reason}", run_id),
            )
            conn.execute(
                """UPDATE etl.dw_etl_jobs SET last_run_status = 'failed'
                   WHERE id = %s AND last_run_id = %s""",
                (jid, run_id),
            )
            found.append(StaleRun(int(run_id), int(jid), reason))
    for s in found:
        log.warning("stale_run_marked_failed", run_id=s.run_id, job_id=s.job_id, reason=s.reason)
    return found


def update_progress(conn: psycopg.Connection, run_id: int, counters: dict[str, Any]) -> None:
    """Heartbeat: refresh ``heartbeat_at`` and the live counters of a running run, and its resume
    point (``run_context.resume``: where a retry of this run may continue, should it die)."""
    resume = counters.get("resume")
    conn.execute(
        """UPDATE etl.dw_etl_runs SET heartbeat_at = now(),
                  records_extracted = %(records_extracted)s, records_published = %(records_published)s,
                  api_calls = %(api_calls)s, parents_total = %(parents_total)s, parents_done = %(parents_done)s,
                  parents_failed = %(parents_failed)s,
                  run_context = CASE WHEN %(resume)s::jsonb IS NULL THEN run_context
                                     ELSE run_context || jsonb_build_object('resume', %(resume)s::jsonb) END
           WHERE id = %(run_id)s AND run_status = 'running'""",
        {"run_id": run_id, **_counter_defaults(counters), "resume": _json(resume) if resume else None},
    )


def record_plan(conn: psycopg.Connection, run_id: int, context: dict[str, Any], watermark_from: datetime | None) -> None:
    """What the run is about to ask (its ``$filter``, the parents and why), written before it asks:
    visible while it runs and after a crash."""
    conn.execute("""UPDATE etl.dw_etl_runs SET run_context = run_context || %s::jsonb, watermark_from = %s
                    WHERE id = %s""", (_json(context), watermark_from, run_id))


def record_results(conn: psycopg.Connection, run_id: int, counters: dict[str, Any], context: dict[str, Any],
                   watermark_from: datetime | None, watermark_to: datetime | None) -> None:
    """Write the run's final counters and context while it is still ``running``."""
    conn.execute(
        """UPDATE etl.dw_etl_runs SET heartbeat_at = now(),
                  records_extracted = %(records_extracted)s, records_published = %(records_published)s,
                  api_calls = %(api_calls)s, parents_total = %(parents_total)s, parents_done = %(parents_done)s,
                  parents_failed = %(parents_failed)s,
                  run_context = run_context || %(ctx)s::jsonb,
                  watermark_from = %(wm_from)s, watermark_to = %(wm_to)s
           WHERE id = %(run_id)s""",
        {"run_id": run_id, **_counter_defaults(counters), "ctx": _json(context), "wm_from": watermark_from,
         "wm_to": watermark_to},
    )


def finish_run(conn: psycopg.Connection, run_id: int, job_id: int, status: str, *,
               error_class: str | None = None, error_message: str | None = None,
               records: int | None = None) -> None:
    """Set the final status and the job's ``last_run_*`` (``last_success_at`` only on success)."""
    if status not in ("success", "partial", "failed", "cancelled", "skipped"):
        raise ValueError(f"not a final run status: {status}")
    with conn.transaction():
        row = conn.execute(
            """UPDATE etl.dw_etl_runs SET run_status = %s, error_class = %s, error_message = %s,
                      completed_at = now(), heartbeat_at = now(),
                      duration_seconds = round(extract(epoch FROM now() - started_at)::numeric, 3)
               WHERE id = %s
               RETURNING completed_at, records_published""",
            (status, error_class, error_message, run_id),
        ).fetchone()
        completed = row[0] if row else None
        conn.execute(
            """UPDATE etl.dw_etl_jobs SET last_run_status = %s, last_run_records = %s,
                      last_success_at = CASE WHEN %s = 'success' THEN %s ELSE last_success_at END
               WHERE id = %s AND (last_run_id = %s OR last_run_id IS NULL)""",
            (status, records if records is not None else (row[1] if row else None), status, completed, job_id,
             run_id),
        )


class Heartbeat:
    """Background thread: ``update_progress`` every ``interval`` seconds on its own connection."""

    def __init__(self, settings: Settings, run_id: int, counters: Callable[[], dict[str, Any]],
                 interval: float | None = None, on_stall: Callable[[float], None] | None = None):
        self.settings = settings
        self.run_id = run_id
        self.counters = counters
        self.interval = interval or HEARTBEAT_SECONDS
        #: the stall watchdog: called once when no counter moved for ETL_STALL_SECONDS
        self.on_stall = on_stall
        self._moved_at = time.monotonic()
        self._last: tuple[Any, ...] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _loop(self) -> None:
        from common.db import connect

        conn = None
        while not self._stop.wait(self.interval):
            counters = self.counters()
            self._watch(counters)  # also while the database is away
            try:
                if conn is None or conn.closed:
                    conn = connect(self.settings, autocommit=True, application_name="trialsync-heartbeat")
                update_progress(conn, self.run_id, counters)
            except Exception as e:  # noqa: BLE001 - a missed heartbeat must not kill the run
                log.warning("heartbeat_failed", run_id=self.run_id, error=str(e).splitlines()[0] if str(e) else "")
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                    conn = None
        if conn is not None:
            conn.close()

    def _watch(self, c: dict[str, Any]) -> None:
        """A run whose counters stand still for ETL_STALL_SECONDS is stalled (heartbeat alive, no work
        done): tell the run, once, so it fails with the reason instead of waiting for its timeout."""
        sig = (c.get("records_extracted"), c.get("records_published"), c.get("api_calls"), c.get("parents_done"))
        now = time.monotonic()
        if sig != self._last:
            self._last, self._moved_at = sig, now
        elif self.on_stall is not None and now - self._moved_at > self.settings.etl_stall_seconds:
            stalled, self.on_stall = self.on_stall, None
            stalled(now - self._moved_at)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _counter_defaults(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "records_extracted": int(c.get("records_extracted", 0)),
        "records_published": int(c.get("records_published", 0)),
        "api_calls": int(c.get("api_calls", 0)),
        "parents_total": c.get("parents_total"),
        "parents_done": c.get("parents_done"),
        "parents_failed": c.get("parents_failed"),
    }


def _json(obj: Any) -> str:
    return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()

