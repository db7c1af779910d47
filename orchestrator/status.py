"""``trialsync status`` and ``trialsync history``: what every job did last, and a job's past runs.

Both read only ``etl.dw_etl_jobs`` / ``etl.dw_etl_runs`` (what an analyst can read too), print rich
tables on a terminal and JSON with ``--json``. "Lag" is the time since the job's last successful
run -- the number an on-call engineer looks at first; "next fire" is computed from the job's cron
schedule in SCHEDULER_TIMEZONE.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from common.config import Settings
from common.db import connect

STATUS_STYLE = {"success": "green", "partial": "yellow", "failed": "red", "running": "cyan", "skipped": "magenta",
                "cancelled": "dim", "pending": "cyan"}

_STATUS_SQL = """
SELECT j.id, j.name, j.category, j.is_active AND j.is_valid AS runnable, j.schedule, j.last_success_at,
       r.id, r.run_status, r.mode, r.trigger, r.attempt, r.started_at, r.completed_at, r.duration_seconds,
       r.records_extracted, r.records_loaded, r.records_rejected, r.error_message, r.load_completed_at,
       r.parents_total, r.parents_failed
  FROM etl.dw_etl_jobs j
  LEFT JOIN LATERAL (SELECT * FROM etl.dw_etl_runs x WHERE x.job_id = j.id
                      ORDER BY x.started_at DESC, x.id DESC LIMIT 1) r ON true
 WHERE (%(job)s::int IS NULL AND (j.is_active AND j.is_valid OR r.id IS NOT NULL)) OR j.id = %(job)s
 ORDER BY j.id
"""

_HISTORY_SQL = """
SELECT r.id, r.run_status, r.mode, r.trigger, r.attempt, r.parent_run_id, r.orchestration_id, r.started_at,
       r.completed_at, r.duration_seconds, r.records_extracted, r.records_published, r.records_loaded,
       r.records_rejected, r.api_calls, r.parents_total, r.parents_failed, r.error_class, r.error_message,
       r.load_completed_at
  FROM etl.dw_etl_runs r WHERE r.job_id = %s ORDER BY r.started_at DESC, r.id DESC LIMIT %s
"""


def next_fire(schedule: str | None, now: datetime, timezone: str = "UTC") -> datetime | None:
    if not schedule:
        return None
    from orchestrator.scheduler import cron_trigger

    try:
        trig = cron_trigger(schedule, timezone)
    except ValueError:
        return None
    nf = trig.get_next_fire_time(None, now.astimezone(trig.timezone))
    return nf.astimezone(UTC) if nf else None


def job_status(conn: psycopg.Connection, job_id: int | None = None, timezone: str = "UTC",
               now: datetime | None = None) -> list[dict[str, Any]]:
    """One dict per job: last run, state, records, duration, next fire, lag."""
    now = now or datetime.now(UTC)
    out = []
    for row in conn.execute(_STATUS_SQL, {"job": job_id}).fetchall():
        (jid, name, category, runnable, schedule, last_success, run_id, status, mode, trigger, attempt, started,
         completed, duration, extracted, loaded, rejected, error, load_done, parents_total, parents_failed) = row
        out.append({
            "job_id": jid, "name": name, "category": category, "active": bool(runnable), "schedule": schedule,
            "last_run_id": run_id, "state": status or "never run", "mode": mode, "trigger": trigger,
            "attempt": attempt, "started_at": started, "completed_at": completed,
            "duration_seconds": float(duration) if duration is not None else None,
            "records_extracted": extracted, "records_loaded": loaded, "records_rejected": rejected,
            "loaded": load_done is not None if run_id is not None else None,
            "parents_total": parents_total, "parents_failed": parents_failed,
            "error": error, "last_success_at": last_success,
            "lag_seconds": (now - last_success).total_seconds() if last_success else None,
            "next_fire_at": next_fire(schedule, now, timezone),
        })
    return out


def job_history(conn: psycopg.Connection, job_id: int, limit: int = 10) -> list[dict[str, Any]]:
    cols = ("run_id", "status", "mode", "trigger", "attempt", "parent_run_id", "orchestration_id", "started_at",
            "completed_at", "duration_seconds", "records_extracted", "records_published", "records_loaded",
            "records_rejected", "api_calls", "parents_total", "parents_failed", "error_class", "error",
            "load_completed_at")
    out = []
    for row in conn.execute(_HISTORY_SQL, (job_id, limit)).fetchall():
        d = dict(zip(cols, row, strict=True))
        if d["duration_seconds"] is not None:
            d["duration_seconds"] = float(d["duration_seconds"])
        if d["orchestration_id"] is not None:
            d["orchestration_id"] = str(d["orchestration_id"])
        out.append(d)
    return out


# -- formatting ------------------------------------------------------------------------------------

def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def fmt_time(t: datetime | None) -> str:
    if t is None:
        return "-"
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def styled(status: str | None) -> str:
    st = status or "-"
    color = STATUS_STYLE.get(st)
    return f"[{color}]{st}[/]" if color else st


def status_table(rows: list[dict[str, Any]], width: int = 200) -> Table | None:
    """All jobs; on a narrow console (< 130 columns) without the start and next-fire times.

    Numbers are never cut (:mod:`orchestrator.tables`): names shorten instead, and when even that
    does not fit the width, None -- the caller prints :func:`status_lines`."""
    from orchestrator.tables import Column, fitted_table

    wide = width >= 130
    cols = [Column("job", "right"), Column("name", flexible=True), Column("last run", "right"), Column("state")]
    if wide:
        cols.append(Column("started (UTC)"))
    cols += [Column("extracted", "right"), Column("loaded", "right"), Column("duration", "right"),
             Column("lag", "right")]
    if wide:
        cols.append(Column("next fire (UTC)"))
    cells_by_row = []
    for r in rows:
        state = styled(r["state"])
        if r["state"] in ("success", "partial") and r["loaded"] is False:
            state += " [dim](loading)[/]"
        cells = [str(r["job_id"]), r["name"], str(r["last_run_id"] or "-"), state]
        if wide:
            cells.append(fmt_time(r["started_at"]))
        cells += [fmt_int(r["records_extracted"]), fmt_int(r["records_loaded"]), fmt_duration(r["duration_seconds"]),
                  fmt_duration(r["lag_seconds"]) if r["lag_seconds"] is not None else "[dim]never[/]"]
        if wide:
            cells.append(fmt_time(r["next_fire_at"]) if r["next_fire_at"] else "-")
        cells_by_row.append(cells)
    return fitted_table(cols, cells_by_row, width, title=f"TrialSync jobs ({len(rows)})")


def status_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One plain line per job, for consoles too narrow for any table."""
    out = []
    for r in rows:
        if r["last_run_id"] is None:
            out.append(f"job {r['job_id']} ({r['name']}): {r['state']}")
            continue
        loading = " (loading)" if r["state"] in ("success", "partial") and r["loaded"] is False else ""
        lag = fmt_duration(r["lag_seconds"]) if r["lag_seconds"] is not None else "never"
        out.append(f"job {r['job_id']} ({r['name']}): {r['state']}{loading}, run {r['last_run_id'] or '-'}, "
                   f"{fmt_int(r['records_extracted'])} extracted, {fmt_int(r['records_loaded'])} loaded, "
                   f"{fmt_duration(r['duration_seconds'])}, lag {lag}")
    return out


def job_detail_table(r: dict[str, Any]) -> Table:
    t = Table(title=f"job {r['job_id']}: {r['name']}", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    rows = [
        ("category", r["category"]), ("active", "yes" if r["active"] else "no"),
        ("schedule", r["schedule"] or "-"), ("next fire (UTC)", fmt_time(r["next_fire_at"])),
        ("last run", str(r["last_run_id"] or "-")), ("state", styled(r["state"])),
        ("mode / trigger / attempt", f"{r['mode'] or '-'} / {r['trigger'] or '-'} / {r['attempt'] or '-'}"),
        ("started (UTC)", fmt_time(r["started_at"])), ("completed (UTC)", fmt_time(r["completed_at"])),
        ("duration", fmt_duration(r["duration_seconds"])),
        ("records extracted / loaded / rejected",
         f"{fmt_int(r['records_extracted'])} / {fmt_int(r['records_loaded'])} / {fmt_int(r['records_rejected'])}"),
        ("parents (failed)", f"{fmt_int(r['parents_total'])} ({fmt_int(r['parents_failed'])})"),
        ("loaded", {True: "yes", False: "not yet", None: "-"}[r["loaded"]]),
        ("last success (UTC)", fmt_time(r["last_success_at"])),
        ("lag", fmt_duration(r["lag_seconds"]) if r["lag_seconds"] is not None else "never succeeded"),
    ]
    if r["error"]:
        rows.append(("error", f"[red]{r['error']}[/]"))
    for k, v in rows:
        t.add_row(k, v)
    return t


def history_table(job_id: int, name: str, rows: list[dict[str, Any]], width: int = 200) -> Table | None:
    """The job's runs; None when no table fits ``width`` without cutting a number."""
    from orchestrator.tables import Column, fitted_table

    cols = [Column("run", "right"), Column("started (UTC)"), Column("state"),
            Column("mode / trigger / try", flexible=True), Column("extracted", "right"), Column("loaded", "right"),
            Column("duration", "right")]
    cells = [[str(r["run_id"]), fmt_time(r["started_at"]), styled(r["status"]),
              f"{r['mode']} / {r['trigger']} / {r['attempt']}", fmt_int(r["records_extracted"]),
              fmt_int(r["records_loaded"]), fmt_duration(r["duration_seconds"])] for r in rows]
    return fitted_table(cols, cells, width, title=f"job {job_id} ({name}): last {len(rows)} runs")


def history_lines(rows: list[dict[str, Any]]) -> list[str]:
    return [f"run {r['run_id']} {fmt_time(r['started_at'])}: {r['status']} ({r['mode']} / {r['trigger']} / "
            f"{r['attempt']}), {fmt_int(r['records_extracted'])} extracted, {fmt_int(r['records_loaded'])} loaded, "
            f"{fmt_duration(r['duration_seconds'])}" for r in rows]


def history_errors(rows: list[dict[str, Any]]) -> list[str]:
    """The error of each shown run, in full, below the table (a table column would be cut)."""
    return [f"run {r['run_id']} ({r['status']}): {r['error']}" for r in rows if r["error"]]


def to_json(obj: Any) -> str:
    import orjson

    return orjson.dumps(obj, default=str, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()


def settle_stale_runs(conn: psycopg.Connection, job_id: int | None = None) -> None:
    """Mark runs whose extractor died ``failed`` before showing them -- the same check an extractor
    makes when it starts (``producers.runs.detect_stale_runs``: heartbeat older than 120 s, or its
    process on this host is gone). Without it a killed run stays ``running`` in ``status`` until the
    next extract of that job. A read-only login cannot mark anything: it sees the rows as they are."""
    from producers.runs import detect_stale_runs

    try:
        detect_stale_runs(conn, job_id=job_id)
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction):
        pass


def show_status(settings: Settings, job_id: int | None, as_json: bool, console: Console, timezone: str) -> int:
    with connect(settings, autocommit=True, application_name="trialsync-status") as conn:
        settle_stale_runs(conn, job_id)
        rows = job_status(conn, job_id, timezone)
    if job_id is not None and not rows:
        from schemas.jobs import CatalogError

        raise CatalogError(f"job {job_id} is not in etl.dw_etl_jobs: run `trialsync jobs sync`, "
                           "or see `trialsync jobs list`")
    if as_json:
        print(to_json(rows[0] if job_id is not None else rows))
    elif job_id is not None:
        console.print(job_detail_table(rows[0]))
    else:
        table = status_table(rows, console.width)
        if table is not None:
            console.print(table)
        else:
            for line in status_lines(rows):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        console.print("  ".join(f"{styled(k)}: {v}" for k, v in sorted(counts.items())))
    return 0


def show_history(settings: Settings, job_id: int, limit: int, as_json: bool, console: Console) -> int:
    with connect(settings, autocommit=True, application_name="trialsync-history") as conn:
        row = conn.execute("SELECT name FROM etl.dw_etl_jobs WHERE id = %s", (job_id,)).fetchone()
        if row is None:
            from schemas.jobs import CatalogError

            raise CatalogError(f"job {job_id} is not in etl.dw_etl_jobs: run `trialsync jobs sync`, "
                               "or see `trialsync jobs list`")
        settle_stale_runs(conn, job_id)
        rows = job_history(conn, job_id, limit)
    if as_json:
        print(to_json(rows))
    else:
        table = history_table(job_id, row[0], rows, console.width)
        if table is not None:
            console.print(table)
        else:
            for line in history_lines(rows):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
        for line in history_errors(rows):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        if not rows:
            console.print(f"job {job_id} has never run: `trialsync run --job {job_id} --with-deps`")
    return 0
