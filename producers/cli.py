"""Commands of the producers package, registered on the `trialsync` app by common/cli.py.

``trialsync extract --job ID [--full|--incremental] [--dry-run] [--limit N]``, ``--all``,
``--category C``: runs jobs through :func:`producers.extractor.run_job`. On a terminal a progress
bar shows records, pages, parents done/total and the rate; otherwise one JSON log line per event.
Exit code 0 when every run succeeded, 1 when one failed or ended partial, 2 for bad usage.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the top-level app."""
    app.command("extract")(extract)


def extract(
    job: Annotated[list[str] | None, typer.Option("--job", "-j", help="job id or name (repeatable)")] = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="every active job, parents before children")] = False,
    category: Annotated[str | None, typer.Option(help="every active job of this category")] = None,
    full: Annotated[bool, typer.Option("--full/--incremental",
                                       help="ignore watermarks (default: incremental where the endpoint supports it)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the requests it would make; publish nothing")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="stop after N records (watermarks are not advanced)")] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="concurrent requests (default ETL_PARALLEL_JOBS)")] = None,
    processes: Annotated[int, typer.Option(min=0, max=64, help="fan parents out over N worker processes "
                                           "(0 = threads in this process, the default)")] = 0,
    engine: Annotated[str | None, typer.Option(help="HTTP engine: async (uvloop) | threads (requests); "
                                               "default ETL_HTTP_ENGINE (auto)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print each run's result as JSON")] = False,
    max_calls: Annotated[int | None, typer.Option(min=1, help="fan-out jobs: at most N API calls (changed parents "
                                                  "first, then the sweep and unfinished first-pass parents)")] = None,
) -> None:
    """Extract jobs from Clinical Conductor into their Bronze topics."""
    import orjson

    from common.catalog import load_catalog
    from common.cli import UserError, console, err_console
    from common.config import get_settings
    from producers.extractor import JobNotRunnable, run_job

    chosen = sum(bool(x) for x in (job, all_jobs, category))
    if chosen != 1:
        raise UserError("choose what to extract: --job ID (repeatable), --all, or --category C", code=2)
    settings = get_settings()
    catalog = load_catalog(settings)
    if job:
        jobs = [catalog.resolve(j) for j in job]
    else:
        pool = catalog.runnable if all_jobs else [j for j in catalog.by_category(category or "") if j.runnable]
        if not pool:
            raise UserError(f"no active jobs in category {category!r}", code=2)
        levels = catalog.topological_order([j.id for j in pool])
        jobs = [catalog.get(i) for level in levels for i in level]
    _start_metrics()
    _terminate_as_interrupt()
    tty = sys.stderr.isatty() and not as_json
    results = []
    for j in jobs:
        progress = _RichProgress() if tty and not dry_run else None
        try:
            r = run_job(j, mode="full" if full else "incremental", dry_run=dry_run, limit=limit, settings=settings,
                        trigger="cli", progress=progress, workers=workers, processes=processes,
                        engine=engine, max_calls=max_calls)
        except JobNotRunnable as e:
            if len(jobs) == 1:
                raise UserError(str(e), code=2) from None
            err_console.print(f"[yellow]skipped:[/] {e}", highlight=False)
            continue
        finally:
            if progress is not None:
                progress.close()
        results.append(r)
        if as_json:
            print(orjson.dumps(r.to_dict(), option=orjson.OPT_NON_STR_KEYS).decode())
        elif dry_run:
            for line in r.plan:
                console.print(line, highlight=False, soft_wrap=True)
        else:
            _print_result(r, console, err_console)
    bad = [r for r in results if r.status in ("failed", "partial")]
    if bad:
        raise typer.Exit(1)


def _print_result(r: Any, console: Any, err_console: Any) -> None:
    color = {"success": "green", "partial": "yellow", "failed": "red"}.get(r.status, "white")
    parents = "" if r.parents_total is None else f", parents {r.parents_done}/{r.parents_total} ({r.parents_failed} failed)"
    console.print(
        f"job {r.job_id} run {r.run_id}: [{color}]{r.status}[/] -- {r.records_published} records published "
        f"to {r.topic} in {r.duration_s:.1f} s ({r.api_calls} API calls{parents})", highlight=False, soft_wrap=True)
    for w in r.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if r.records_missing_key:
        err_console.print(f"[yellow]warning:[/] {r.records_missing_key} records had no key; published with a null key "
                          "for the loader to dead-letter", highlight=False)
    if r.error:
        err_console.print(f"[bold red]error:[/] {r.error}", highlight=False, soft_wrap=True)


def _terminate_as_interrupt() -> None:
    """SIGTERM (systemd, the orchestrator's timeout) and a first Ctrl-C stop the runs cleanly: no new
    requests, published records acknowledged, the run recorded ``failed`` ("interrupted") instead
    of being left ``running`` until the next start finds it stale. A second Ctrl-C aborts at once."""
    import signal
    import threading

    from producers.extractor import request_stop

    if threading.current_thread() is not threading.main_thread():
        return
    pressed = {"n": 0}

    def on_term(signum: int, frame: object) -> None:
        request_stop("terminated (SIGTERM) before the run finished")

    def on_int(signum: int, frame: object) -> None:
        pressed["n"] += 1
        if pressed["n"] > 1 or not request_stop("interrupted (Ctrl-C) before the run finished"):
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)


def _start_metrics() -> None:
    from common.config import get_settings
    from common.logging import get_logger
    from common.metrics import start_metrics_server

    if not get_settings().enable_metrics:
        return
    try:
        # a one-shot command: if METRICS_PORT is taken (a loader runs beside it), a free port
        start_metrics_server("extractor", any_port_if_taken=True)
    except OSError as e:
        get_logger("extractor").warning("metrics_port_unavailable", error=str(e), port=get_settings().metrics_port)


class _RichProgress:
    """Progress bar on stderr: records, pages, parents done/total, records/s."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[parents]}"), TextColumn("{task.fields[records]} records"),
            TextColumn("{task.fields[pages]} pages"), TextColumn("{task.fields[rate]}/s"), TimeElapsedColumn(),
            console=Console(stderr=True), transient=False, refresh_per_second=4,
        )
        self.task: Any = None
        self.t0 = time.monotonic()
        self._last = 0.0

    def start(self, job: Any, parents_total: int | None) -> None:
        self.progress.start()
        self.t0 = time.monotonic()
        self.task = self.progress.add_task(f"job {job.id} {job.name}", total=parents_total, records=0, pages=0,
                                           parents="", rate=0)

    def update(self, **c: Any) -> None:
        now = time.monotonic()
        if self.task is None or now - self._last < 0.1:
            return
        self._last = now
        parents = "" if c.get("parents_total") is None else f"parents {c.get('parents_done')}/{c['parents_total']}"
        rate = int(c.get("records", 0) / max(1e-6, now - self.t0))
        self.progress.update(self.task, completed=c.get("parents_done") or 0, records=c.get("records", 0),
                             pages=c.get("pages", 0), parents=parents, rate=rate)

    def finish(self, result: Any) -> None:
        if self.task is not None:
            parents = "" if result.parents_total is None else f"parents {result.parents_done}/{result.parents_total}"
            self.progress.update(self.task, completed=result.parents_done or 0, records=result.records_extracted,
                                 pages=result.pages, parents=parents,
                                 rate=int(result.records_extracted / max(1e-6, result.duration_s)))

    def close(self) -> None:
        self.progress.stop()
