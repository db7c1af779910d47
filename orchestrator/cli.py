"""Commands of the orchestrator package, registered on the `trialsync` app by common/cli.py.

``run``, ``retry``, ``schedule``, ``scheduler``, ``status``, ``history``, ``alerts``, ``demo``.
Exit codes: 0 everything succeeded, 1 a job failed/partial/skipped (or an expected error), 2 bad
usage or configuration, 3 a service is not running.
"""

from __future__ import annotations

import signal
import sys
from typing import Annotated, Any

import typer

alerts_app = typer.Typer(no_args_is_help=True, help="Alerting: evaluate now, or send a test message.")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the top-level app."""
    app.command("run")(run)
    app.command("retry")(retry)
    app.command("schedule")(schedule)
    app.command("scheduler")(scheduler)
    app.command("status")(status)
    app.command("history")(history)
    app.add_typer(alerts_app, name="alerts")
    app.command("demo")(demo)
    __import__("orchestrator.ops_cli", fromlist=["register"]).register(app)
    __import__("orchestrator.report_cli", fromlist=["register"]).register(app)


# -- helpers ---------------------------------------------------------------------------------------

def _console() -> Any:
    from common.cli import console

    return console


def _interactive(as_json: bool) -> bool:
    return sys.stderr.isatty() and sys.stdout.isatty() and not as_json


def _run_with_display(plan: Any, options: Any, title: str, as_json: bool, selection: dict[str, Any],
                      initial: dict[int, Any] | None = None) -> Any:
    """Run a plan: live display on a terminal (logs to a file), JSON logs otherwise; Ctrl-C cancels."""
    from common.config import get_settings
    from common.stack import state_dir
    from orchestrator.display import LiveDisplay
    from orchestrator.launcher import PoolLauncher
    from orchestrator.runner import run_plan

    s = get_settings()
    interactive = _interactive(as_json)
    log_path = None
    if interactive:
        from orchestrator.demo import _route_logs_to_file

        logs = state_dir(s) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = str(logs / "extract.log")
        _route_logs_to_file(str(logs / "run.log"))
    holder: dict[str, Any] = {}

    def hook(runner: Any) -> None:
        holder["runner"] = runner

        def stop(signum: int, frame: Any) -> None:
            runner.cancel(f"stopped by signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    launcher = PoolLauncher(log_path=log_path)
    try:
        if interactive:
            with LiveDisplay(_console(), title) as display:
                return run_plan(plan, options=options, launcher=launcher, on_tick=display.tick, runner_hook=hook,
                                initial_requests=initial, selection=selection, settings=s)
        return run_plan(plan, options=options, launcher=launcher, runner_hook=hook, initial_requests=initial,
                        selection=selection, settings=s)
    finally:
        launcher.close()


def _finish(result: Any, as_json: bool) -> None:
    from orchestrator.display import print_result_lines, summary_notes, summary_table
    from orchestrator.status import to_json

    console = _console()
    if as_json:
        print(to_json(result.as_dict()))
    elif _interactive(False) and (table := summary_table(result, width=console.width)) is not None:
        console.print(table)
        if console.width < 140:
            for line in summary_notes(result):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
    else:
        print_result_lines(result, console)
    _evaluate_alerts()
    if result.status != "success":
        raise typer.Exit(1)


def _evaluate_alerts() -> None:
    from common.logging import get_logger

    try:
        from orchestrator.alerts import evaluate_and_notify

        evaluate_and_notify()
    except Exception as e:  # noqa: BLE001 - never fail a run because alerting failed
        get_logger("alerts").warning("alert_evaluation_failed", error=str(e).splitlines()[0] if str(e) else "")


# -- run -------------------------------------------------------------------------------------------

def run(
    all_jobs: Annotated[bool, typer.Option("--all", help="every active job")] = False,
    category: Annotated[str | None, typer.Option(help="every active job of this category")] = None,
    job: Annotated[list[str] | None, typer.Option("--job", "-j", help="job id or name (repeatable)")] = None,
    with_deps: Annotated[bool, typer.Option("--with-deps", help="also run every job the selected ones depend on")] = False,
    full: Annotated[bool, typer.Option("--full/--incremental",
                                       help="ignore watermarks (default: incremental where supported)")] = False,
    parallel: Annotated[int | None, typer.Option(min=1, max=64, help="jobs at once (default ETL_PARALLEL_JOBS)")] = None,
    wait_load: Annotated[bool, typer.Option("--wait-load", help="return only when every run is loaded into Bronze")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan (levels, order); run nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Run jobs in dependency order: parallel where independent, children after their parents are loaded."""
    from common.catalog import load_catalog
    from common.cli import UserError
    from common.config import get_settings
    from orchestrator.dag import SelectionError, build_plan, select_jobs
    from orchestrator.runner import RunnerOptions

    s = get_settings()
    catalog = load_catalog(s)
    try:
        ids = select_jobs(catalog, all_jobs=all_jobs, category=category, job_refs=job or [], with_deps=with_deps)
    except SelectionError as e:
        raise UserError(str(e), code=2) from None
    plan = build_plan(catalog, ids)
    if dry_run:
        _print_plan(plan, as_json, s, "full" if full else "incremental")
        return
    options = RunnerOptions.from_settings(s, trigger="cli", mode="full" if full else "incremental",
                                          parallel=parallel, wait_all_loads=wait_load)
    selection = {"all": all_jobs, "category": category, "jobs": job or [], "with_deps": with_deps}
    result = _run_with_display(plan, options, f"trialsync run · {len(plan)} jobs", as_json, selection)
    _finish(result, as_json)


def _print_plan(plan: Any, as_json: bool, settings: Any, mode: str) -> None:
    """The plan: levels and order, and per job the API calls a full and an incremental run would make
    now (from Bronze and the jobs' history), the time at CC_RATE_LIMIT_RPS, and what the night's
    call budget would cover."""
    from rich.table import Table

    from common.db import DatabaseError, connect
    from orchestrator.status import to_json
    from producers.call_plan import allocate, estimate_all

    jobs = [plan.job(j) for level in plan.levels for j in level]
    estimates: dict[int, Any] = {}
    note = None
    try:
        with connect(settings, autocommit=True, application_name="trialsync-plan") as conn:
            estimates = {e.job_id: e for e in estimate_all(conn, jobs, settings)}
    except DatabaseError as e:
        note = f"no call estimates: {e}"
    budget = settings.call_budget()
    rate = settings.cc_rate_limit_rps
    alloc = allocate(list(estimates.values()), budget) if estimates and mode == "incremental" else {}
    if as_json:
        print(to_json({"levels": [list(level) for level in plan.levels],
                       "parents": {str(k): list(v) for k, v in plan.parents.items()},
                       "external_parents": {str(k): list(v) for k, v in plan.external_parents.items()},
                       "calls": {str(k): v.as_dict() for k, v in estimates.items()},
                       "budget": budget, "rate_limit_rps": rate, "allocation": {str(k): v for k, v in alloc.items()},
                       "note": note}))
        return
    t = Table(title=f"plan: {len(plan)} jobs in {len(plan.levels)} levels", title_justify="left")
    for col in ("level", "job", "name", "waits for (loaded)", "calls full", "calls now", "why (now)"):
        t.add_column(col, overflow="fold", justify="right" if col.startswith("calls") else "left")
    total_full = total_now = 0
    for i, level in enumerate(plan.levels):
        for j in level:
            est = estimates.get(j)
            now = "-" if est is None else (est.full if mode == "full" else est.incremental)
            why = "" if est is None else (", ".join(f"{n:,} {k}" for k, n in est.by_reason.items() if n) or est.note)
            if est is not None:
                total_full += est.full
                total_now += est.full if mode == "full" else est.incremental
            t.add_row(str(i), str(j), plan.job(j).name, ", ".join(map(str, plan.parents.get(j, ()))) or "-",
                      "-" if est is None else f"{est.full:,}", now if isinstance(now, str) else f"{now:,}", why)
    c = _console()
    c.print(t)
    if note:
        c.print(f"[yellow]{note}[/]", highlight=False)
        return

    def at_rate(calls: int) -> str:
        return f"{calls / rate / 3600:.1f} h at {rate:g} req/s" if rate else "no CC_RATE_LIMIT_RPS set"

    c.print(f"a full run: {total_full:,} calls ({at_rate(total_full)}); this {mode} run now: {total_now:,} calls "
            f"({at_rate(total_now)})", highlight=False)
    if budget is not None and mode == "incremental":
        left = sum(a["left"] for a in alloc.values())
        c.print(f"the night's budget: {budget:,} calls (ETL_CALL_BUDGET or ETL_NIGHT_WINDOW_HOURS x "
                f"CC_RATE_LIMIT_RPS): " + ("covers it" if not left else
                                           f"{left:,} calls left for the next night (changed parents first)"),
                highlight=False)


# -- retry -----------------------------------------------------------------------------------------

def retry(
    run_id: Annotated[int, typer.Option("--run-id", help="the failed or partial run to redo")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Redo a failed run (for a partial parameterized run: only its failed parents)."""
    from common.catalog import load_catalog
    from common.cli import UserError
    from common.config import get_settings
    from common.db import connect
    from orchestrator.dag import build_plan
    from orchestrator.retry import NotRetryable, RetryPolicy, manual_retry_request
    from orchestrator.runner import RunnerOptions
    from producers.runs import detect_stale_runs

    s = get_settings()
    with connect(s, autocommit=True, application_name="trialsync-retry") as conn:
        detect_stale_runs(conn)  # a run whose process died (kill -9) is failed now, and retryable
        try:
            req = manual_retry_request(conn, run_id)
        except NotRetryable as e:
            raise UserError(str(e), code=2) from None
    catalog = load_catalog(s)
    job = catalog.get(req.job_id)
    if not job.runnable:
        raise UserError(f"job {job.id} ({job.name}) is no longer active and valid; nothing retried", code=2)
    plan = build_plan(catalog, [req.job_id])
    options = RunnerOptions.from_settings(s, trigger="retry", policy=RetryPolicy(max_retries=0),
                                          allow_reuse=False)
    if not as_json:
        _console().print(f"retrying run {run_id} of job {job.id} ({job.name}): attempt {req.attempt}, {req.scope}"
                         + (", continuing from its resume point when it has one" if req.resume_from else ""),
                         highlight=False)
    result = _run_with_display(plan, options, f"trialsync retry · run {run_id}", as_json,
                               {"retry_of": run_id, "scope": req.scope}, initial={req.job_id: req})
    _finish(result, as_json)


# -- schedules -------------------------------------------------------------------------------------

def schedule(
    job: Annotated[str, typer.Option("--job", "-j", help="job id or name")],
    cron: Annotated[str | None, typer.Option(help="5-field cron, e.g. \"0 2 * * *\" (SCHEDULER_TIMEZONE)")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="remove the job's schedule")] = False,
) -> None:
    """Store (or clear, or show) a job's cron schedule in etl.dw_etl_jobs; `trialsync scheduler` picks it up."""
    from datetime import UTC, datetime, timedelta

    from common.catalog import load_catalog
    from common.cli import UserError
    from common.config import get_settings
    from common.db import connect
    from orchestrator.scheduler import cron_trigger
    from orchestrator.settings import get_orchestrator_settings
    from orchestrator.status import fmt_time
    from schemas.jobs import CatalogError

    s = get_settings()
    tz = get_orchestrator_settings().scheduler_timezone
    catalog = load_catalog(s)
    j = catalog.resolve(job)
    if cron is not None and clear:
        raise UserError("give either --cron or --clear", code=2)
    console = _console()
    if cron is not None:
        try:
            trig = cron_trigger(cron, tz)
        except CatalogError as e:
            raise UserError(str(e), code=2) from None
    with connect(s, autocommit=True, application_name="trialsync-schedule") as conn:
        if cron is None and not clear:
            row = conn.execute("SELECT schedule FROM etl.dw_etl_jobs WHERE id = %s", (j.id,)).fetchone()
            if row is None:
                raise UserError(f"job {j.id} is not in etl.dw_etl_jobs: run `trialsync jobs sync`")
            console.print(f"job {j.id} ({j.name}): " + (f"schedule {row[0]!r} ({tz})" if row[0] else "no schedule"),
                          highlight=False)
            return
        row = conn.execute("UPDATE etl.dw_etl_jobs SET schedule = %s, updated_at = now() WHERE id = %s RETURNING id",
                           (None if clear else cron, j.id)).fetchone()
        if row is None:
            raise UserError(f"job {j.id} is not in etl.dw_etl_jobs: run `trialsync jobs sync` first")
    if clear:
        console.print(f"job {j.id} ({j.name}): schedule cleared", highlight=False)
    else:
        now = datetime.now(UTC)
        nxt, times = now, []
        for _ in range(3):
            t = trig.get_next_fire_time(None, nxt)
            if t is None:
                break
            times.append(t)
            nxt = t + timedelta(microseconds=1)
        console.print(f"job {j.id} ({j.name}): schedule {cron!r} ({tz}); next: "
                      + ", ".join(fmt_time(t) + " UTC" for t in times), highlight=False)
        if not j.runnable:
            console.print(f"[yellow]warning:[/] job {j.id} is not active; the scheduler ignores it until it is",
                          highlight=False)
    if j.schedule is not None:
        console.print(f"[yellow]note:[/] config/jobs.yaml also schedules job {j.id} ({j.schedule!r}); "
                      "the next `trialsync jobs sync` puts the file's value back -- change it there to keep it",
                      highlight=False)


def scheduler(
    metrics_port: Annotated[int | None, typer.Option(help="metrics/health port (default METRICS_PORT)")] = None,
    shutdown_grace: Annotated[float, typer.Option(help="seconds a running orchestration gets after SIGTERM")] = 60.0,
) -> None:
    """Run the scheduler service: fire jobs (with dependencies) on their cron schedules until SIGTERM."""
    import os
    import shutil
    import tempfile

    # extractions run in worker processes: prometheus_client's multiprocess mode lets this process's
    # /metrics show their job and record counters too. It must be set before prometheus_client loads.
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="trialsync-scheduler-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    from common.logging import setup_logging
    from orchestrator.scheduler import serve

    setup_logging("scheduler")
    try:
        serve(metrics_port=metrics_port, shutdown_grace=shutdown_grace)
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


# -- status / history ------------------------------------------------------------------------------

def status(
    job: Annotated[str | None, typer.Option("--job", "-j", help="one job (id or name) in detail")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per job: last run, state, records extracted/loaded, duration, lag since the last success, next fire."""
    from common.catalog import load_catalog
    from common.config import get_settings
    from orchestrator.settings import get_orchestrator_settings
    from orchestrator.status import show_status

    s = get_settings()
    job_id = load_catalog(s).resolve(job).id if job is not None else None
    show_status(s, job_id, as_json, _console(), get_orchestrator_settings().scheduler_timezone)


def history(
    job: Annotated[str, typer.Option("--job", "-j", help="job id or name")],
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 10,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The job's last runs, newest first."""
    from common.catalog import load_catalog
    from common.config import get_settings
    from orchestrator.status import show_history

    s = get_settings()
    show_history(s, load_catalog(s).resolve(job).id, limit, as_json, _console())


# -- alerts ----------------------------------------------------------------------------------------

@alerts_app.command("check")
def alerts_check(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Evaluate alert conditions now and send what a state change calls for (once per streak)."""
    from dataclasses import asdict

    from orchestrator.alerts import configured_channels, evaluate_and_notify
    from orchestrator.status import to_json

    out = evaluate_and_notify()
    if as_json:
        print(to_json([asdict(d) for d in out]))
        return
    chans = ", ".join(c.name for c in configured_channels()) or "none configured (ALERT_EMAIL+SMTP_HOST, SLACK_WEBHOOK_URL)"
    _console().print(f"channels: {chans}; {len(out)} delivery(ies)", highlight=False)
    for d in out:
        _console().print(f"  {d.kind} {d.key} via {d.channel}: {'sent' if d.ok else 'FAILED ' + (d.error or '')}",
                         highlight=False)


@alerts_app.command("test")
def alerts_test() -> None:
    """Send one test message to every configured channel."""
    from common.cli import UserError
    from orchestrator.alerts import send_test

    out = send_test()
    if not out:
        raise UserError("no alert channel configured: set ALERT_EMAIL and SMTP_HOST, and/or SLACK_WEBHOOK_URL", code=2)
    for d in out:
        _console().print(f"{d.channel}: {'sent' if d.ok else 'failed: ' + (d.error or '')}", highlight=False)
    if not all(d.ok for d in out):
        raise typer.Exit(1)


# -- demo ------------------------------------------------------------------------------------------

def demo(
    scale: Annotated[float, typer.Option(help="simulated data volume (1.0 = production; 0.01 ≈ 60k records)")] = 0.01,
    seed: Annotated[int, typer.Option(help="simulator seed: same seed, same data")] = 42,
    full: Annotated[bool, typer.Option("--full", help="ignore watermarks: extract everything again")] = False,
    parallel: Annotated[int | None, typer.Option(min=1, max=64, help="jobs at once (default ETL_PARALLEL_JOBS)")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="stop the demo's services and the embedded stack")] = False,
    night: Annotated[bool, typer.Option("--night/--no-night", help="on a re-run, let a day of realistic activity "
                                                                     "pass in the simulator first")] = True,
) -> None:
    """Set everything up and run all 72 jobs against the CC simulator; re-run for an incremental run."""
    from common.cli import UserError
    from orchestrator.demo import print_report, run_demo, stop_demo
    from orchestrator.services import ServiceError

    console = _console()
    if stop:
        stop_demo(console)
        return
    if scale <= 0:
        raise UserError(f"--scale must be > 0, got {scale}", code=2)
    try:
        report = run_demo(scale, seed=seed, console=console, full=full, parallel=parallel, night=night)
    except ServiceError as e:
        raise UserError(str(e), code=3) from None
    print_report(report, console)
    if report.status != "success":
        raise typer.Exit(1)
