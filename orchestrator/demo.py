"""``trialsync demo``: the whole system on one laptop, in one command.

1. embedded PostgreSQL 16 + Kafka-API broker up (``common.stack``; skipped where DATABASE_URL /
   KAFKA_BOOTSTRAP_SERVERS point elsewhere), migrations, job catalog sync, system topics;
2. the CC simulator at ``--scale`` with a fixed ``--seed`` and a random throwaway API key that only
   child processes see (environment; never printed, never written to disk);
3. the loader and the transformer as background services, each with its metrics/health port;
4. ``run --all``: all 72 active jobs in dependency order with a live progress display, each
   parameterized job starting once its parent's records are loaded;
5. wait until every run is loaded and transformed, then a summary: per job records extracted /
   loaded, duration, status; totals; Silver/Gold row counts; where to look next.

Running it again tells the story of a **night**: the state directory (``.trialsync/``) keeps the
database, whose ``etl.dw_etl_watermarks`` are the truth about what was extracted; the simulator is
restarted with the same seed and the nights applied so far (orchestrator/demo_night.py), then a day
of realistic activity passes at the simulated sites, the run is **incremental**, and the summary says
what changed in Bronze, which SCD2 versions opened and how the Gold numbers moved. The services are
restarted too. The embedded broker's topics vanish whenever the broker restarts; nothing depends on
them surviving: topics are re-created on first use and the loader/transformer start from the new
topics' beginning.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from common.config import Settings, get_settings, reset_settings
from common.logging import add_secret, get_logger
from orchestrator.status import fmt_duration, fmt_int

log = get_logger("demo")

DEFAULT_SEED = 42


@dataclass
class DemoReport:
    status: str
    mode: str
    duration_s: float
    result: Any = None
    layer_counts: dict[str, int] = field(default_factory=dict)
    services: dict[str, Any] = field(default_factory=dict)
    transform_pending: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    night: Any = None  # demo_night.NightSummary of a re-run


def _route_logs_to_file(path: str, stderr_level: str | None = None) -> None:
    """Structured logs to ``path``; on stderr nothing (a live display owns the terminal) or only
    ``stderr_level`` and above (plain output, e.g. ``demo > out.txt 2>&1``)."""
    from common.logging import route_logs_to_file

    route_logs_to_file(path, "demo", stderr_level)


def safe_dsn(dsn: str) -> str:
    """The DSN with its password removed (what the summary prints)."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[1]}"))


def layer_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Row counts of every Silver/Gold table, materialized view and view."""
    rels = conn.execute(
        """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname IN ('silver', 'gold') AND c.relkind IN ('r', 'p', 'm', 'v')
            ORDER BY n.nspname DESC, c.relname""").fetchall()
    out = {}
    for schema, name in rels:
        try:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema),
                                                                             sql.Identifier(name))).fetchone()
            out[f"{schema}.{name}"] = int(row[0]) if row else 0
        except psycopg.Error:
            out[f"{schema}.{name}"] = -1
    return out


def pending_transforms(conn: psycopg.Connection, run_ids: list[int]) -> list[int]:
    """Runs of this demo whose tables feed a procedure but that no finished transform covered yet."""
    if not run_ids:
        return []
    exists = conn.execute("SELECT to_regclass('etl.dw_transform_runs') IS NOT NULL "
                          "AND to_regclass('etl.dw_transform_procedures') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    rows = conn.execute(
        """SELECT r.id FROM etl.dw_etl_runs r JOIN etl.dw_etl_jobs j ON j.id = r.job_id
            WHERE r.id = ANY(%s) AND r.records_published > 0 AND r.run_status IN ('success', 'partial')
              AND EXISTS (SELECT 1 FROM etl.dw_transform_procedures p
                           WHERE p.is_active AND j.target_table = ANY(p.source_tables))
              AND NOT EXISTS (SELECT 1 FROM etl.dw_transform_runs t
                               WHERE r.id = ANY(t.trigger_run_ids) AND t.status <> 'running')""",
        (run_ids,)).fetchall()
    return [int(r[0]) for r in rows]


def wait_for_transforms(settings: Settings, run_ids: list[int], timeout: float) -> list[int]:
    """Block until the transformer has covered every run of the demo (or ``timeout``); return the rest."""
    from common.db import connect

    deadline = time.monotonic() + timeout
    with connect(settings, autocommit=True, application_name="trialsync-demo") as conn:
        has_table = conn.execute("SELECT to_regclass('etl.dw_transform_runs') IS NOT NULL").fetchone()
        while True:
            pending = pending_transforms(conn, run_ids)
            running = 0
            if has_table and has_table[0]:
                row = conn.execute("SELECT count(*) FROM etl.dw_transform_runs WHERE status = 'running'").fetchone()
                running = int(row[0]) if row else 0
            if (not pending and not running) or time.monotonic() >= deadline:
                return pending
            time.sleep(1.0)


def _remember_dataset(sd: Any, scale: float, seed: int) -> dict[str, Any] | None:
    """Record which simulated data set the warehouse holds; return the previous one if it differs."""
    import json

    f = sd / "demo.json"
    prev = None
    try:
        prev = json.loads(f.read_text()) if f.exists() else None
    except ValueError:
        prev = None
    known: dict[str, Any] = prev if isinstance(prev, dict) else {}
    same = bool(known) and known.get("scale") == scale and known.get("seed") == seed
    # the simulated nights belong to one data set: kept while it stays, forgotten when it changes
    f.write_text(json.dumps({"scale": scale, "seed": seed, "nights": known.get("nights", []) if same else []}))
    if known and not same:
        return {"scale": known.get("scale"), "seed": known.get("seed")}
    return None


def run_demo(scale: float, seed: int = DEFAULT_SEED, console: Console | None = None, full: bool = False,
             parallel: int | None = None, transform_timeout: float = 600.0, night: bool = True) -> DemoReport:
    """Everything ``trialsync demo`` does; returns the report the CLI prints."""
    from common import kafka, stack
    from common.catalog import load_catalog, sync
    from common.db import connect, migrate
    from orchestrator.dag import build_plan, select_jobs
    from orchestrator.display import LiveDisplay
    from orchestrator.launcher import PoolLauncher
    from orchestrator.runner import RunnerOptions, run_plan
    from orchestrator.services import Services

    console = console or Console()
    tty = console.is_terminal
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    s = get_settings()

    def step(msg: str) -> None:
        console.print(f"[bold cyan]▸[/] {msg}", highlight=False)

    log_dir = stack.state_dir(s) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # people read stdout; the machine record goes to the log file (warnings also to stderr, unless
    # the live display owns the terminal)
    _route_logs_to_file(str(log_dir / "demo.log"), stderr_level=None if tty else "WARNING")
    step(f"embedded stack (state in {stack.state_dir(s)})")
    st = stack.up(s)
    applied = migrate(s)
    catalog = load_catalog(s)
    r = sync(catalog, s)
    kafka.ensure_system_topics(s)
    timings["stack_migrate_sync_s"] = time.monotonic() - t0
    console.print(f"  PostgreSQL {'127.0.0.1:' + str(st.pg_port) if s.uses_embedded_database else '(DATABASE_URL)'}, "
                  f"broker {kafka.bootstrap_servers(s)}; {len(applied)} migration(s) applied; "
                  f"{len(catalog.runnable)} active jobs ({r.inserted} new)", highlight=False)

    with connect(s, autocommit=True, application_name="trialsync-demo") as conn:
        row = conn.execute("SELECT count(*) FROM etl.dw_etl_watermarks").fetchone()
        had_watermarks = bool(row and row[0])
    mode = "full" if full else "incremental"
    mode_label = "full" if full or not had_watermarks else "incremental"

    previous = _remember_dataset(stack.state_dir(s), scale, seed)
    if previous is not None and had_watermarks:
        console.print(f"[yellow]note:[/] the warehouse holds data of a simulator at scale {previous['scale']}, seed "
                      f"{previous['seed']}; this run uses scale {scale}, seed {seed}, so Bronze will mix both. "
                      "For a clean start: `trialsync demo --stop && trialsync stack down --purge`.", highlight=False)
    step(f"services: CC simulator (scale {scale}, seed {seed}), loader, transformer (logs in {log_dir})")
    t1 = time.monotonic()
    api_key = secrets.token_urlsafe(24)
    add_secret(api_key)
    services = Services(s)
    sim = services.start_simulator(scale, seed, api_key)
    from orchestrator import demo_night

    state_file = stack.state_dir(s) / "demo.json"
    demo_night.replay_nights(sim.urls["admin"], demo_night.recorded_nights(state_file))
    os.environ["CC_API_BASE_URL"] = sim.urls["api"]
    os.environ["CC_API_KEY"] = api_key
    reset_settings()
    s = get_settings()
    loader = services.start_loader()
    transformer = services.start_transformer()
    timings["services_s"] = time.monotonic() - t1
    console.print(f"  simulator {sim.urls['api']} · loader {loader.urls['metrics']} · "
                  f"transformer {transformer.urls['metrics']}", highlight=False)

    night_result: dict[str, Any] | None = None
    before = None
    if night and had_watermarks:
        with connect(s, autocommit=True, application_name="trialsync-demo") as conn:
            before = demo_night.snapshot(conn)
        night_result = demo_night.apply_night(sim.urls["admin"], days=1)
        demo_night.record_night(state_file, {"days": 1, "seq": night_result.get("seq"), "clock": night_result.get("clock")})
        counts = night_result.get("counts", {})
        step(f"a night passes at the simulated sites (realistic model, {night_result.get('days')} day, clock now "
             f"{night_result.get('clock')}): {night_result.get('changed', 0)} records changed in "
             f"{len(night_result.get('studies', []))} active studies -- "
             + ", ".join(f"{k} {v['modified']}~ {v['inserted']}+" for k, v in sorted(counts.items())))

    ids = select_jobs(catalog, all_jobs=True)
    plan = build_plan(catalog, ids)
    step(f"run --all: {len(plan)} jobs in {len(plan.levels)} dependency levels, {mode_label} "
         f"({parallel or s.etl_parallel_jobs} in parallel)")
    options = RunnerOptions.from_settings(s, trigger="demo", mode=mode, wait_all_loads=True, parallel=parallel)
    launcher = PoolLauncher(log_path=str(log_dir / "extract.log"))
    t2 = time.monotonic()
    try:
        if tty:
            with LiveDisplay(console, f"TrialSync demo · {mode_label}") as display:
                result = run_plan(plan, options=options, launcher=launcher, on_tick=display.tick, settings=s,
                                  selection={"all": True, "demo": True, "scale": scale})
        else:
            result = run_plan(plan, options=options, launcher=launcher, settings=s,
                              selection={"all": True, "demo": True, "scale": scale})
    finally:
        launcher.close()
    timings["run_s"] = time.monotonic() - t2

    t3 = time.monotonic()
    run_ids = [rid for st_ in result.jobs.values() for rid in st_.data_run_ids]
    pending = wait_for_transforms(s, run_ids, transform_timeout)
    timings["transform_wait_s"] = time.monotonic() - t3
    with connect(s, autocommit=True, application_name="trialsync-demo") as conn:
        counts = layer_counts(conn)
        night_summary = demo_night.summarise(conn, night_result, before) if before and night_result else None
    try:
        from orchestrator.alerts import evaluate_and_notify

        evaluate_and_notify(s)
    except Exception as e:  # noqa: BLE001 - alerting never fails the demo
        log.warning("alert_evaluation_failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
    return DemoReport(status=result.status, mode=mode_label, duration_s=time.monotonic() - t0, result=result,
                      layer_counts=counts, services=services.status(), transform_pending=pending, timings=timings,
                      night=night_summary)


def print_report(report: DemoReport, console: Console, settings: Settings | None = None) -> None:
    from common.stack import state_dir
    from orchestrator.display import print_result_lines, summary_notes, summary_table

    s = settings or get_settings()
    res = report.result
    console.print()
    table = summary_table(res, title=f"TrialSync demo ({report.mode} run): {res.status} -- "
                                     f"{len(res.jobs)} jobs in {fmt_duration(res.duration)}", width=console.width)
    if table is None:
        print_result_lines(res, console)
    else:
        console.print(table)
        if console.width < 140:
            for line in summary_notes(res):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
    from orchestrator.tables import Column, fitted_table

    layer_rows = [[name, fmt_int(n) if n >= 0 else "[red]error[/]"] for name, n in report.layer_counts.items()]
    layers = fitted_table([Column("table / view", flexible=True), Column("rows", "right")], layer_rows,
                          console.width, title="Silver / Gold")
    if report.layer_counts:
        if layers is not None:
            console.print(layers)
        else:
            for name, n in layer_rows:
                console.print(f"{name}: {n}", highlight=False)
    if report.night is not None:
        print_night(report.night, console)
    if report.transform_pending:
        console.print(f"[yellow]transform still catching up on {len(report.transform_pending)} run(s): "
                      "`trialsync transform --status`[/]")
    c = res.counts
    console.print(f"[bold]{c['success']}[/] succeeded, {c['partial']} partial, {c['failed']} failed, "
                  f"{c['skipped']} skipped · {fmt_int(c['records_extracted'])} records extracted, "
                  f"{fmt_int(c['records_loaded'])} loaded, {fmt_int(c['api_calls'])} API calls · "
                  f"total {fmt_duration(report.duration_s)}", highlight=False)
    sd = state_dir(s)
    nxt = Table(title="where to look next", title_justify="left", show_header=False)
    nxt.add_column("what", style="bold")
    nxt.add_column("how", overflow="fold")
    nxt.add_row("job status", "trialsync status   ·   trialsync history --job 2   ·   trialsync status --job 10")
    nxt.add_row("the warehouse", f"{reader_psql(s)}   (read-only login; schemas bronze, silver, gold, etl)")
    for name, info in report.services.items():
        urls = info.get("urls", {})
        shown = "   ".join(f"{k}: {v}" for k, v in urls.items() if k in ("metrics", "health", "ready"))
        nxt.add_row(f"{name}", shown + ("" if info.get("alive") else "   [red](not running)[/]"))
    nxt.add_row("logs", str(sd / "logs"))
    nxt.add_row("run report", _run_report(s, sd))
    nxt.add_row("run it again", "trialsync demo   (a day passes at the simulated sites, then an incremental run)")
    nxt.add_row("stop everything", "trialsync demo --stop   (services and the embedded stack; data stays in "
                                    f"{sd}; `trialsync stack down --purge` deletes it)")
    console.print(nxt)


def reader_psql(settings: Settings) -> str:
    """A psql command line for the read-only login (the one analysts use), without its password:
    for the embedded stack the password goes to a pgpass file next to the data (mode 0600)."""
    from common.stack import PG_DATABASE, PG_LOGINS, database_dsn, embedded_passwords, read_state, state_dir

    dsn = database_dsn(settings, login="reader")
    if not settings.uses_embedded_database:
        return f"psql {safe_dsn(dsn)}"
    user = PG_LOGINS["reader"]
    port = read_state(settings).pg_port
    pgpass = state_dir(settings) / "pg" / "reader.pgpass"
    fd = os.open(pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"127.0.0.1:{port}:{PG_DATABASE}:{user}:{embedded_passwords(settings)[user]}\n")
    return f"PGPASSFILE={pgpass} psql {safe_dsn(dsn)}"


def _run_report(settings: Settings, sd: Path) -> str:
    """Write the HTML run report of this run (orchestrator/report.py); say where, or how to make it."""
    try:
        from common.db import connect
        from orchestrator.report import write_report

        with connect(settings, autocommit=True, application_name="trialsync-demo") as conn:
            path, _ = write_report(conn, None, state_dir=sd)
        return f"{path.resolve()}   (open it in a browser; `trialsync report --last` writes it again)"
    except Exception as e:  # noqa: BLE001 - the report never fails the demo
        return f"trialsync report --last   (could not write it now: {str(e).splitlines()[0] if str(e) else type(e).__name__})"


def print_night(night: Any, console: Console) -> None:
    """The night's story: Bronze changes, SCD2 versions opened, Gold before -> after."""
    bronze = Table(title="the night in Bronze (rows since this run started)", title_justify="left")
    for col in ("staging table", "inserted", "updated", "deleted"):
        bronze.add_column(col, justify="left" if col == "staging table" else "right")
    for t, c in night.bronze.items():
        bronze.add_row(t, fmt_int(c["inserted"]), fmt_int(c["updated"]), fmt_int(c["deleted"]))
    if not night.bronze:
        bronze.add_row("(nothing changed)", "", "", "")
    console.print(bronze)
    versions = Table(title="SCD2 versions opened", title_justify="left")
    for col in ("dimension", "new keys", "new versions", "examples (previous -> new)"):
        versions.add_column(col, overflow="fold")
    for t, v in night.versions.items():
        versions.add_row(t, fmt_int(v["new_keys"]), fmt_int(v["new_versions"]),
                         f"{v['attribute']}: " + "; ".join(v["examples"]) if v["examples"] else "")
    if not night.versions:
        versions.add_row("(none)", "", "", "")
    console.print(versions)
    gold = Table(title="how Gold moved", title_justify="left")
    for col in ("metric", "before", "after", "change"):
        gold.add_column(col, justify="left" if col == "metric" else "right")
    for label, b, a in night.gold:
        delta = "" if b is None or a is None else (f"{a - b:+}" if a != b else "=")
        gold.add_row(label, "" if b is None else str(b), "" if a is None else str(a), delta)
    console.print(gold)


def stop_demo(console: Console, settings: Settings | None = None) -> None:
    from common import stack
    from orchestrator.services import Services

    s = settings or get_settings()
    stopped = Services(s).stop_all()
    stack.down(s)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'no services running'}; embedded stack down "
                  f"(data kept in {stack.state_dir(s)})")
