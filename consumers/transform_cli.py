"""``trialsync transform``: the control-topic consumer, on-demand runs and status.

* ``trialsync transform`` -- run the consumer (a long-running service, metrics on METRICS_PORT);
* ``trialsync transform --now [--procedure P ...] [--downstream] [--full]`` -- run procedures now
  (all of them by default), each recorded like the consumer's, then the quality checks; exit 1 when
  a procedure or an error-severity check failed;
* ``trialsync transform --status [--json]`` -- last run of every procedure, pending retries, failing
  quality checks; exit 1 when something is failing.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table


def register(app: typer.Typer) -> None:
    """Add ``transform`` to the top-level app."""

    @app.command("transform")
    def transform(
        now: Annotated[bool, typer.Option("--now", help="run procedures now instead of consuming control messages")] = False,
        procedure: Annotated[list[str] | None, typer.Option(
            "--procedure", "-p", help="with --now: only this procedure (repeatable; e.g. load_dim_studies)")] = None,
        downstream: Annotated[bool, typer.Option(help="with --procedure: also the procedures that depend on it")] = False,
        full: Annotated[bool, typer.Option(
            "--full", help="with --now: forget the incremental watermarks first and re-read all of Bronze")] = False,
        status: Annotated[bool, typer.Option("--status", help="show procedure status, retries and failing checks")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="with --status/--now: JSON output")] = False,
        metrics_port: Annotated[int | None, typer.Option(help="metrics/health port (default METRICS_PORT)")] = None,
    ) -> None:
        """Build Silver/Gold from Bronze: consume end-of-run control messages, or run now, or show status."""
        from common.cli import UserError

        if status:
            raise typer.Exit(_status(as_json))
        if now:
            raise typer.Exit(_run_now(procedure or [], downstream, full, as_json))
        if procedure or full or downstream:
            raise UserError("--procedure, --downstream and --full need --now", code=2)
        from consumers.transformer import serve

        serve(metrics_port=metrics_port)


def _run_now(names: list[str], downstream: bool, full: bool, as_json: bool) -> int:
    from rich.console import Console

    from common.cli import UserError
    from consumers.transform_plan import Procedure, UnknownProcedure
    from consumers.transform_runner import ProcedureRunner

    console = Console(stderr=True)
    progress_cb = None
    progress: Any = None
    if sys.stderr.isatty() and not as_json:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
        tasks: dict[str, Any] = {}

        def progress_cb(p: Procedure, state: str) -> None:
            if state == "running":
                tasks[p.name] = progress.add_task(p.name, total=1)
            else:
                progress.update(tasks[p.name], completed=1, description=f"{p.name} [{state}]")

    runner = ProcedureRunner(on_progress=progress_cb)
    try:
        plan = runner.plan
        try:
            chosen = [plan.resolve(n) for n in names]
        except UnknownProcedure as e:
            raise UserError(str(e), code=2) from None
        procs = (plan.downstream(p.name for p in chosen) if downstream else chosen) if chosen else plan.all()
        if full:
            runner.reset_watermarks(procs)
        if progress is not None:
            with progress:
                batch = runner.run_batch(procs, trigger="manual")
        else:
            batch = runner.run_batch(procs, trigger="manual")
    finally:
        runner.close()
    failed_checks = [q for q in batch.quality if q.status in ("fail", "error")]
    empty_checks = [q.check.name for q in batch.quality if q.status == "empty"]
    if as_json:
        print(json.dumps({
            "batch_id": str(batch.batch_id),
            "procedures": [{"procedure": r.procedure, "status": r.status, "duration_s": round(r.duration_s, 3),
                            **r.counts, "error": r.error} for r in batch.procedures],
            "quality": [{"check": q.check.name, "severity": q.check.severity, "status": q.status,
                         "failed_rows": q.failed_rows, "checked_rows": q.checked_rows, "sample_keys": q.sample_keys}
                        for q in batch.quality],
        }, indent=2))
    else:
        out = _out()
        t = Table(title=f"transform batch {batch.batch_id}")
        for col in ("procedure", "status", "seconds", "inserted", "updated", "closed", "deleted", "error"):
            t.add_column(col, overflow="fold")
        for r in batch.procedures:
            colour = {"success": "green", "failed": "red"}.get(r.status, "yellow")
            t.add_row(r.procedure, f"[{colour}]{r.status}[/]", f"{r.duration_s:.2f}",
                      *(str(r.counts.get(a, "")) for a in ("inserted", "updated", "closed", "deleted")), r.error or "")
        out.print(t)
        if failed_checks:
            out.print(_quality_table([(q.check.name, q.check.severity, q.status, q.failed_rows,
                                       ", ".join(q.sample_keys[:3]) or (q.error or "")) for q in failed_checks]))
        else:
            out.print(f"quality: {len(batch.quality) - len(empty_checks)} checks passed")
        if empty_checks:
            out.print(f"quality: nothing to check for {len(empty_checks)}: {', '.join(empty_checks)}", highlight=False)
    blocking = [q for q in failed_checks if q.check.severity == "error"]
    return 1 if batch.failed or blocking else 0


def _out():  # -> rich Console
    from rich.console import Console

    # off a terminal rich assumes 80 columns, which folds every procedure name
    return Console() if sys.stdout.isatty() else Console(width=200)


def _quality_table(rows: list[tuple]) -> Table:
    t = Table(title="failing quality checks")
    for col in ("check", "severity", "status", "failed rows", "sample / error"):
        t.add_column(col, overflow="fold")
    for name, severity, status, n, detail in rows:
        t.add_row(name, f"[{'red' if severity == 'error' else 'yellow'}]{severity}[/]", status, str(n), detail)
    return t


def _fmt(v: object) -> str:
    return "" if v is None else str(v)


def _status(as_json: bool) -> int:

    from psycopg.rows import dict_row

    from common.db import connect

    with connect(autocommit=True, application_name="trialsync-transform-status") as conn:
        procs = conn.cursor(row_factory=dict_row).execute(
            "SELECT procedure_name, layer, last_status, last_finished_at, last_duration_seconds, rows_inserted, "
            "rows_updated, rows_closed, rows_deleted, attempt, next_retry_at, is_failing, error_class, error_message, "
            "last_success_at FROM etl.v_transform_status ORDER BY run_order").fetchall()
        checks = conn.cursor(row_factory=dict_row).execute(
            "SELECT check_name, target_table, severity, status, failed_rows, sample_keys, checked_at, error_message "
            "FROM etl.v_quality_latest WHERE status NOT IN ('pass', 'empty') "
            "ORDER BY severity, check_name").fetchall()
        empty = [r[0] for r in conn.execute("SELECT check_name FROM etl.v_quality_latest WHERE status = 'empty' "
                                            "ORDER BY check_name").fetchall()]
    failing = [p for p in procs if p["is_failing"]]
    blocking = [c for c in checks if c["severity"] == "error"]
    if as_json:
        print(json.dumps({"procedures": procs, "failing_checks": checks, "nothing_to_check": empty}, indent=2,
                         default=str))
    else:
        out = _out()
        t = Table(title="transform procedures")
        for col in ("procedure", "last status", "finished", "s", "ins", "upd", "closed", "del", "retry at", "error"):
            t.add_column(col, overflow="fold")
        for p in procs:
            st = p["last_status"] or "never run"
            colour = {"success": "green", "failed": "red", "running": "cyan"}.get(st, "dim")
            t.add_row(p["procedure_name"], f"[{colour}]{st}[/]",
                      p["last_finished_at"].strftime("%Y-%m-%d %H:%M:%S") if p["last_finished_at"] else "",
                      _fmt(p["last_duration_seconds"]), _fmt(p["rows_inserted"]), _fmt(p["rows_updated"]),
                      _fmt(p["rows_closed"]), _fmt(p["rows_deleted"]),
                      p["next_retry_at"].strftime("%H:%M:%S") if p["next_retry_at"] and p["is_failing"] else "",
                      (f"{p['error_class']}: {p['error_message']}" if p["is_failing"] else ""))
        out.print(t)
        if checks:
            out.print(_quality_table([(c["check_name"], c["severity"], c["status"], c["failed_rows"],
                                       ", ".join((c["sample_keys"] or [])[:3]) or (c["error_message"] or ""))
                                      for c in checks]))
        else:
            out.print("quality: no failing checks")
        if empty:
            out.print(f"quality: nothing to check for {len(empty)}: {', '.join(empty)}", highlight=False)
    return 1 if failing or blocking else 0
