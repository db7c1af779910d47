"""``trialsync load`` and ``trialsync replay``.

``load`` runs loader processes in one consumer group. With ``--workers N`` (N > 1) this process
becomes a small supervisor: it spawns N loader processes, restarts one that crashes (with
backoff), forwards SIGTERM/SIGINT, and serves the aggregated metrics of all of them
(prometheus_client multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``) on one port.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from common.config import get_settings


def register(app: typer.Typer) -> None:
    """Add ``load`` and ``replay`` to the top-level app."""
    app.command("load")(load)
    app.command("replay")(replay)


# -- load ------------------------------------------------------------------------------------------

def load(
    tables: Annotated[list[str] | None, typer.Option(
        "--tables", help="staging tables to load: names or globs (dim_patient*), comma-separated or repeated; "
                         "default: every bronze topic")] = None,
    group: Annotated[str | None, typer.Option(help="consumer group (default <prefix>-loader)")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="loader processes in this group")] = 1,
    once: Annotated[bool, typer.Option("--once", help="drain what is there, then exit")] = False,
    batch_size: Annotated[int | None, typer.Option(min=1, help="flush at this many records (LOADER_BATCH_SIZE)")] = None,
    flush_ms: Annotated[int | None, typer.Option(min=1, help="flush after this many ms (LOADER_FLUSH_MS)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve /metrics here (METRICS_PORT; 0 = any free port)")] = None,
) -> None:
    """Load bronze topics into staging tables (consumer group, micro-batches, exactly right after crashes)."""
    from common.logging import get_logger, setup_logging
    from consumers.loader import LoaderOptions, default_group, subscription

    s = get_settings()
    setup_logging("loader")
    opts = LoaderOptions(group=group or default_group(s), tables=tables,
                         batch_size=batch_size or s.loader_batch_size, flush_ms=flush_ms or s.loader_flush_ms,
                         once=once, assign_when_alone=workers == 1, idle_probe_s=s.loader_idle_probe_ms / 1000)
    subscription(tables, s)  # validate names before starting anything
    log = get_logger("loader")
    _preflight(log)
    if workers == 1:
        server = _metrics_server(metrics_port, "loader")
        try:
            from consumers.loader import Loader

            stats = Loader(opts, s).run()
        finally:
            if server is not None:
                server.stop()
        if once:
            typer.echo(_summary(stats.as_dict()))
        return
    code = _supervise(opts, workers, metrics_port, log)
    if code:
        raise typer.Exit(code)


def _preflight(log: Any) -> None:
    """Fail fast on configuration problems; a database that is merely down is waited for."""
    from common.cli import UserError
    from common.db import DatabaseError, connect, scalar
    from common.stack import bootstrap_servers, database_dsn

    database_dsn()  # StackError (one line, exit 1) when nothing is configured
    bootstrap_servers()
    try:
        with connect(connect_timeout=3, application_name="trialsync-loader-preflight") as conn:
            missing = scalar(conn, "SELECT to_regclass('etl.loader_run_partitions') IS NULL")
    except DatabaseError as e:
        log.warning("database_not_reachable_yet", error=str(e), note="the loader starts anyway and waits for it")
        return
    if missing:
        raise UserError("the warehouse schema is not up to date (etl.loader_run_partitions is missing): "
                        "run `trialsync db migrate`")


def _summary(d: dict[str, Any]) -> str:
    return (f"loaded {d['records']} records in {d['seconds']:.1f} s: {d['inserted']} inserted, {d['updated']} updated, "
            f"{d['unchanged']} unchanged, {d['deleted']} deleted, {d['rejected']} rejected")


def _metrics_server(port: int | None, service: str):  # -> MetricsServer | None
    """/metrics, /healthz and /readyz (the standard loader checks: database and broker)."""
    from common.metrics import start_metrics_server

    try:
        return start_metrics_server(service, port)
    except OSError as e:
        from common.cli import UserError

        raise UserError(f"cannot serve metrics on port {port if port is not None else get_settings().metrics_port}: "
                        f"{e.strerror}; pick another with --metrics-port (0 = any free port)") from None


def _worker(opts: Any, idx: int) -> None:
    """Entry point of a spawned loader process; stops by itself if the supervisor dies."""
    import threading

    from common.config import reset_settings
    from common.logging import setup_logging
    from consumers.loader import Loader

    reset_settings()
    setup_logging(f"loader-{idx}")
    loader = Loader(opts)
    parent = os.getppid()

    def watch_parent() -> None:
        while not loader.stopping:
            if os.getppid() != parent:  # re-parented: the supervisor was killed
                loader.stop()
                return
            time.sleep(1.0)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    stats = loader.run()
    if opts.once:
        print(_summary(stats.as_dict()), flush=True)


def _supervise(opts: Any, workers: int, metrics_port: int | None, log: Any) -> int:
    """Run ``workers`` loader processes; restart crashed ones; aggregate their metrics."""
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="trialsync-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    from prometheus_client import multiprocess

    server = _metrics_server(metrics_port, "loader")
    ctx = mp.get_context("spawn")
    procs: dict[int, Any] = {}
    restarts: dict[int, float] = {}
    stopping = False
    failed = 0

    def start(idx: int) -> None:
        p = ctx.Process(target=_worker, args=(opts, idx), name=f"loader-{idx}", daemon=False)
        p.start()
        procs[idx] = p
        log.info("worker_started", worker=idx, worker_pid=p.pid)

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i in range(workers):
            start(i)
        while procs:
            if stopping:
                break
            time.sleep(0.2)
            for idx, p in list(procs.items()):
                if p.is_alive():
                    continue
                p.join()
                multiprocess.mark_process_dead(p.pid)
                del procs[idx]
                if p.exitcode == 0 and opts.once:
                    continue
                if p.exitcode != 0:
                    failed += 1
                if opts.once and p.exitcode != 0:
                    log.error("worker_failed", worker=idx, exitcode=p.exitcode)
                    continue
                delay = min(30.0, max(1.0, restarts.get(idx, 0.5) * 2))
                restarts[idx] = delay
                log.warning("worker_exited", worker=idx, exitcode=p.exitcode, restart_in_s=delay)
                time.sleep(delay)
                if not stopping:
                    start(idx)
        for p in procs.values():
            if p.is_alive() and p.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        for p in procs.values():
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker_killed", pid=p.pid, note="did not stop within 60 s")
                p.kill()
                p.join()
            if p.pid:
                multiprocess.mark_process_dead(p.pid)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        if server is not None:
            server.stop()
        if own_dir:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(own_dir, ignore_errors=True)
    return 1 if (failed and opts.once) else 0


# -- replay ----------------------------------------------------------------------------------------

def _parse_since(value: str) -> datetime:
    from common.cli import UserError

    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"--since {value!r} is not an ISO-8601 timestamp (e.g. 2025-12-01T20:30:00Z)", 2) from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def replay(
    table: Annotated[str, typer.Option("--table", help="staging table to reload, e.g. dim_patients_staging")],
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="every record the topic holds (default)")] = False,
    since: Annotated[str | None, typer.Option(help="records published at/after this ISO-8601 time")] = None,
    run_id: Annotated[int | None, typer.Option("--run-id", help="only the records of this run")] = None,
    truncate: Annotated[bool, typer.Option(
        "--truncate", help="rebuild: the table ends up exactly as the topic says (one transaction; refused when "
                           "the topic lost history)")] = False,
    batch_size: Annotated[int | None, typer.Option(min=1, help="records per transaction")] = None,
) -> None:
    """Re-read a table's topic with a throwaway consumer and reload the table through the loader's writer."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from common.cli import UserError
    from common.logging import setup_logging
    from consumers.replay import Mode as ReplayMode
    from consumers.replay import ReplayError, ReplayOptions
    from consumers.replay import replay as run_replay

    setup_logging("replay")
    chosen = [n for n, on in (("--from-beginning", from_beginning), ("--since", since is not None),
                              ("--run-id", run_id is not None)) if on]
    if len(chosen) > 1:
        raise UserError(f"choose one of --from-beginning, --since, --run-id (got {' and '.join(chosen)})", 2)
    mode: ReplayMode = "since" if since is not None else "run" if run_id is not None else "beginning"
    s = get_settings()
    opts = ReplayOptions(table=table, mode=mode, since=_parse_since(since) if since else None, run_id=run_id,
                         truncate=truncate, batch_size=batch_size or s.loader_batch_size)
    console = Console(stderr=True)
    try:
        if console.is_terminal:
            with Progress(TextColumn("[bold]replay[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=False) as bar:
                task = bar.add_task(table, total=None)

                def progress(done: int, total: int | None) -> None:
                    bar.update(task, completed=done, total=total)

                res = run_replay(opts, s, progress)
        else:
            res = run_replay(opts, s)
    except ReplayError as e:
        raise UserError(str(e)) from None
    what = "rebuilt" if res.rebuilt else "replayed into"
    typer.echo(f"{what} bronze.{res.table} from {res.topic}: {res.records_read} records read, "
               f"{res.records_replayed} replayed ({res.inserted} inserted, {res.updated} updated, "
               f"{res.unchanged} unchanged, {res.deleted} deleted, {res.rejected} rejected"
               + (f", {res.rows_removed} rows not in the topic removed" if res.rebuilt else "")
               + f"); {res.rows_before} -> {res.rows_after} rows in {res.seconds:.1f} s")
