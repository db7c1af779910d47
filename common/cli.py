"""The ``trialsync`` command: one typer app composed from each package's commands.

Foundation commands live here (``stack``, ``db``, ``jobs``); each package registers its own
(``producers/cli.py``: extract; ``consumers/cli.py``: load, replay, transform; ``simulator/cli.py``:
simulator; ``orchestrator/cli.py``: run, retry, schedule, scheduler, status, history, demo, api,
doctor). Expected failures (bad config, unknown job, database down...) print one line and exit
non-zero; only bugs show a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.config import ConfigError, get_settings

app = typer.Typer(
    name="trialsync", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="TrialSync: Clinical Conductor -> Kafka-API topics -> PostgreSQL 16 warehouse.",
)
stack_app = typer.Typer(no_args_is_help=True, help="Embedded PostgreSQL 16 + Kafka-API broker for laptops and CI.")
db_app = typer.Typer(no_args_is_help=True, help="Warehouse schema: migrations.")
jobs_app = typer.Typer(no_args_is_help=True, help="The job catalog: sync to the database, list, show.")
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")

console = Console()
err_console = Console(stderr=True)


class UserError(Exception):
    """An expected failure: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def expected_errors() -> tuple[type[BaseException], ...]:
    from common.db import DatabaseError
    from common.stack import StackError
    from schemas.jobs import CatalogError

    return (ConfigError, CatalogError, StackError, DatabaseError, UserError)


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


# -- stack ---------------------------------------------------------------------------------------

@stack_app.command("up")
def stack_up() -> None:
    """Start the embedded PostgreSQL and broker (idempotent); print where they listen."""
    from common import stack

    st = stack.up()
    _print_stack(stack.status())
    if st.pg_port is None and st.kafka_port is None:
        console.print("nothing embedded to start: DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS point elsewhere")


@stack_app.command("down")
def stack_down(purge: Annotated[bool, typer.Option(help="also delete the state directory (all data)")] = False) -> None:
    """Stop the embedded services (PostgreSQL with a fast shutdown: connected services are disconnected)."""
    from common import stack

    where = stack.state_dir()
    if not stack.has_stack():
        console.print(f"no embedded stack under {where} (looked for {where / 'stack.json'}): nothing to stop; "
                      "TRIALSYNC_STATE_DIR selects another", highlight=False, soft_wrap=True)
        return
    parts = stack.running_parts()
    stack.down(purge=purge)
    if parts:
        msg = f"embedded stack under {where} stopped ({', '.join(parts)})"
    else:
        msg = f"embedded stack under {where} was not running: nothing to stop"
    console.print(msg + (" and purged" if purge else ""), highlight=False, soft_wrap=True)


@stack_app.command("status")
def stack_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show whether the embedded services answer, and where (exit 3 when one is down)."""
    from common import stack

    st = stack.status()
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        _print_stack(st)
    embedded_down = [k for k, v in st.items() if v["embedded"] and not v["running"]]
    if embedded_down:
        raise typer.Exit(3)


@stack_app.command("retention")
def stack_retention(dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would go")] = False) -> None:
    """Apply the durable broker's retention now (the stack's keeper does it every interval)."""
    from common import broker_retention, stack

    st = stack.read_state()
    if not (stack.s3_running(st) and stack.kafka_running(st)):
        raise UserError("no durable embedded broker is running here: `trialsync stack up` "
                        "(TRIALSYNC_BROKER_STORAGE=durable; memory storage has no retention)")
    rep = broker_retention.sweep(int(st.s3_port or 0), f"127.0.0.1:{st.kafka_port}",
                                 broker_retention.policy_from_settings(), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {rep.deleted_batches} batches ({rep.deleted_bytes:,} bytes); kept {rep.kept_bytes:,} bytes; "
                  f"{rep.held_unloaded} batches not yet loaded are kept whatever the limits", highlight=False)


def _print_stack(st: dict[str, dict[str, object]]) -> None:
    t = Table(title="TrialSync stack")
    for col in ("service", "mode", "running", "where"):
        t.add_column(col)
    for name, info in st.items():
        if info["embedded"]:
            where = f"127.0.0.1:{info['port']}" if info.get("port") else "-"
            if info.get("storage"):
                where += f" ({info['storage']})"
            state = info.get("state")
            running = "yes" if info["running"] else (f"no ({state})" if state and state != "down" else "no")
            t.add_row(name, "embedded", running, where)
        else:
            t.add_row(name, "external", "-", str(info.get("target")))
    console.print(t)


# -- db ------------------------------------------------------------------------------------------

@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations in order (safe to run twice or concurrently)."""
    from common.db import migrate

    applied = migrate()
    if applied:
        for m in applied:
            console.print(f"applied {m.path.name}")
    else:
        console.print("database schema is up to date")


@db_app.command("status")
def db_status() -> None:
    """List migrations and whether each is applied."""
    from common.db import migration_status

    t = Table(title="migrations")
    t.add_column("version")
    t.add_column("name")
    t.add_column("applied")
    for m, done in migration_status():
        t.add_row(f"{m.version:04d}", m.name, "yes" if done else "[yellow]pending[/]")
    console.print(t)


# -- jobs ----------------------------------------------------------------------------------------

@jobs_app.command("sync")
def jobs_sync() -> None:
    """Upsert the catalog (repo file + fixes + config/jobs.yaml) into etl.dw_etl_jobs in one transaction."""
    from common.catalog import load_catalog, sync

    catalog = load_catalog()
    r = sync(catalog)
    console.print(
        f"jobs: {len(catalog)} in catalog, {len(catalog.runnable)} active and valid; "
        f"{r.inserted} inserted, {r.updated} updated, {r.unchanged} unchanged; "
        f"{len(r.staging_created)} staging tables created"
    )


@jobs_app.command("list")
def jobs_list(
    category: Annotated[str | None, typer.Option(help="only this category")] = None,
    active: Annotated[bool, typer.Option("--active", help="only active and valid jobs")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs from the catalog."""
    from common.catalog import load_catalog

    catalog = load_catalog()
    jobs = catalog.by_category(category) if category else list(catalog)
    if active:
        jobs = [j for j in jobs if j.runnable]
    if as_json:
        print(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
        return
    t = Table(title=f"{len(jobs)} jobs")
    for col in ("id", "name", "category", "endpoint", "target table", "state", "params", "incr."):
        t.add_column(col, overflow="fold")
    for j in jobs:
        state = "[green]active[/]" if j.runnable else ("[red]invalid[/]" if not j.is_valid else "[dim]disabled[/]")
        t.add_row(str(j.id), j.name, j.category, j.endpoint, j.target_table, state,
                  ",".join(j.parameters) or "-", "yes" if j.supports_incremental else "no")
    console.print(t)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[int, typer.Argument(help="job id")]) -> None:
    """Show one job's full configuration, its dependencies and why it was corrected."""
    from common.catalog import load_catalog

    catalog = load_catalog()
    job = catalog.get(job_id)
    t = Table(title=f"job {job.id}: {job.name}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    # the export's last_status / last_records are the legacy system's runs, not this installation's
    legacy = {"last_status": "export: last status (legacy system)",
              "last_records": "export: last records (legacy system)"}
    for k, v in job.model_dump().items():
        if v in (None, (), {}, []) or k in legacy:
            continue
        t.add_row(k, ", ".join(map(str, v)) if isinstance(v, tuple | list) else str(v))
    if job.source_type == "cc_api":
        t.add_row("paging (how)", job.paging_description)
    t.add_row("incremental (effective)", "yes" if job.supports_incremental else "no")
    t.add_row("runs after", ", ".join(f"{p} ({catalog.get(p).name})" for p in catalog.parents(job)) or "-")
    t.add_row("runs here", f"`trialsync status --job {job.id}` (latest), `trialsync history --job {job.id}`")
    for k, label in legacy.items():
        v = getattr(job, k)
        if v is not None:
            t.add_row(f"[dim]{label}[/]", f"[dim]{v} (from the CC job export; not a TrialSync run)[/]")
    console.print(t)


# -- composition ---------------------------------------------------------------------------------

def _register_packages() -> None:
    import importlib

    for mod in ("simulator.cli", "producers.cli", "consumers.cli", "orchestrator.cli"):
        module = importlib.import_module(mod)
        module.register(app)


_register_packages()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning expected errors into one red line and an exit code."""
    from common.logging import setup_logging

    errors = expected_errors()
    try:
        get_settings()
        setup_logging("cli")
        rv = app(args=argv, prog_name="trialsync", standalone_mode=False)
        # with standalone_mode=False click returns a typer.Exit's code instead of raising it
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except errors as e:
        from common.logging import scrub

        code = getattr(e, "code", 2 if isinstance(e, ConfigError) else 1)
        err_console.print(f"[bold red]error:[/] {scrub(str(e))}", highlight=False, soft_wrap=True)
        return int(code)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted")
        return 130
    except Exception as e:
        usage = usage_error_line(e)
        if usage is None:
            raise  # a bug: the traceback is the report
        from rich.markup import escape

        err_console.print("[bold red]error:[/] " + escape(usage[0]), highlight=False, soft_wrap=True)
        return usage[1]


def _usage_exception_types() -> tuple[type[BaseException], ...]:
    """Click's exception base classes: typer >= 0.29 vendors click as ``typer._click`` (its own
    classes), older typer raises ``click.exceptions``; both may be installed, so match both."""
    out: list[type[BaseException]] = []
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        out.append(VendoredClickException)
    except ImportError:  # pragma: no cover - typer < 0.29
        pass
    try:
        import click

        out.append(click.exceptions.ClickException)
    except ImportError:  # pragma: no cover - click not installed
        pass
    return tuple(out)


def usage_error_line(e: BaseException) -> tuple[str, int] | None:
    """``(one line, exit code)`` for a command-line usage error (unknown option or command, a
    missing or out-of-range value, no command at all); None when ``e`` is not one.

    Why not click's own ``show()``: it prints the usage block and, for a missing command, the whole
    help -- 20 to 60 lines for a typo. One line names the problem and where the help is.
    """
    if not isinstance(e, _usage_exception_types()):
        return None
    ctx = getattr(e, "ctx", None)
    path = getattr(ctx, "command_path", None) or "trialsync"
    code = int(getattr(e, "exit_code", 1) or 1)
    if type(e).__name__ == "NoArgsIsHelpError":
        names: list[str] = []
        cmd = getattr(ctx, "command", None)
        with_commands = getattr(cmd, "list_commands", None)
        if cmd is not None and with_commands is not None:
            names = [n for n in with_commands(ctx) if not getattr(cmd.get_command(ctx, n), "hidden", False)]
        what = f": one of {', '.join(names)}" if names else ""
        return f"{path}: missing command{what} (`{path} --help` explains each)", 2
    try:
        message = e.format_message()  # type: ignore[attr-defined]  # a ClickException (typer's vendored or click's): isinstance on a runtime tuple does not narrow
    except Exception:  # noqa: BLE001 - fall back to the plain text
        message = str(e)
    message = " ".join(message.split())  # one line, whatever click put in it
    if code == 2:
        return f"{path}: {message} (see `{path} --help`)", 2
    return f"{path}: {message}", code


if __name__ == "__main__":  # pragma: no cover
    # run the canonical module, not this __main__ copy: packages raise common.cli.UserError
    from common.cli import main as _main

    sys.exit(_main())
