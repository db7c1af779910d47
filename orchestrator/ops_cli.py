"""Operator commands: ``trialsync api`` (job-history HTTP API) and ``trialsync doctor``.

Registered by ``orchestrator/cli.py``'s ``register()``; kept apart from the run/schedule commands
so the orchestration package and the operations tooling evolve independently.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add ``api`` and ``doctor`` to the top-level app."""
    app.command("api")(api)
    app.command("doctor")(doctor)


def api(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 in containers)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port of the API")] = 8000,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="serve without API_TOKEN on a non-loopback "
                                          "interface, on purpose (anyone who reaches it reads the history)")] = False,
) -> None:
    """Serve the read-only job-history API (JSON; OpenAPI at /openapi.json; bearer token from API_TOKEN).

    Without API_TOKEN it only starts on a loopback interface (127.0.0.1, ::1, localhost), unless
    told ``--no-auth``. Also serves /metrics, /healthz and /readyz on METRICS_PORT like every
    TrialSync service. Reads the database as the read-only login (embedded stack:
    trialsync_reader; else DATABASE_READER_URL / DATABASE_READER_PASSWORD when set).
    """
    from common.cli import UserError
    from common.config import get_settings
    from common.health import service_checks
    from common.logging import setup_logging
    from common.metrics import start_metrics_server
    from orchestrator.history_api import serve

    setup_logging("api")
    s = get_settings()
    if s.api_token is None and not no_auth and not is_loopback(host):
        raise UserError(f"API_TOKEN is not set and --host {host} would serve the run history (errors, rejected "
                        "records) to anyone who can reach it: set API_TOKEN (e.g. `openssl rand -hex 32`), "
                        "or bind to 127.0.0.1, or pass --no-auth to serve it openly on purpose", code=2)
    metrics = start_metrics_server("api", checks=service_checks("api", s)) if s.metrics_port != port else None
    try:
        serve(host=host, port=port, settings=s)
    finally:
        if metrics is not None:
            metrics.stop()


def is_loopback(host: str) -> bool:
    """True for an interface only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: assume it faces a network


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="print the findings as JSON")] = False,
    api_timeout: Annotated[float, typer.Option(help="seconds to wait for the Clinical Conductor API")] = 5.0,
    sources: Annotated[bool, typer.Option("--sources", help="check, on the live API, whether each fan-out job's "
                                          "cheaper list source returns the same records as asking each parent")] = False,
    job: Annotated[list[str] | None, typer.Option("--job", "-j", help="with --sources: only these jobs")] = None,
    sample: Annotated[int, typer.Option(min=1, max=1000, help="with --sources: parents compared per job")] = 20,
) -> None:
    """Check configuration, database, broker and the Clinical Conductor API; say what to fix.

    ``--sources``: compare each fan-out job's list across parents with its per-parent endpoint on
    the live API and say, per job, whether ``source: list`` in config/jobs.yaml can be trusted.

    Exit code 0 when nothing is wrong (warnings allowed), 1 when any check failed.
    """
    from rich.console import Console
    from rich.table import Table

    from orchestrator.doctor import STATUS_STYLE, run_doctor

    if sources:
        _doctor_sources(job or [], sample, as_json)
        return

    d = run_doctor(api_timeout=api_timeout)
    if as_json:
        print(json.dumps({"ok": not d.failed, "findings": [f.as_dict() for f in d.findings]}, indent=2))
    else:
        console = Console()
        t = Table(title="trialsync doctor")
        for col in ("area", "check", "status", "detail", "how to fix"):
            t.add_column(col, overflow="fold")
        for f in d.findings:
            t.add_row(f.area, f.check, STATUS_STYLE[f.status](f.status), f.detail, f.fix)
        console.print(t)
        bad = [f for f in d.findings if f.status == "fail"]
        if bad:
            console.print(f"[bold red]{len(bad)} problem(s)[/] -- fix them in the order shown, then run "
                          "`trialsync doctor` again", highlight=False)
        else:
            console.print("[green]everything TrialSync needs is in place[/]")
    if d.failed:
        raise typer.Exit(1)


def _doctor_sources(job_refs: list[str], sample: int, as_json: bool) -> None:
    """``trialsync doctor --sources``: one verdict per job with a cheaper list source."""
    from rich.console import Console
    from rich.table import Table

    from common.catalog import load_catalog
    from common.cli import UserError
    from common.config import get_settings
    from common.db import connect
    from producers.source_check import check_sources

    s = get_settings()
    catalog = load_catalog(s)
    jobs = [catalog.resolve(j) for j in job_refs] if job_refs else [j for j in catalog.runnable if j.list_source]
    without = [j for j in jobs if j.list_source is None]
    if without:
        raise UserError(f"job {without[0].id} ({without[0].name}) has no cheaper list source to check; jobs that "
                        f"have one: {', '.join(str(j.id) for j in catalog if j.list_source)}", code=2)
    console = Console(stderr=as_json)
    with connect(s, autocommit=True, application_name="trialsync-doctor") as conn:
        verdicts = check_sources(conn, jobs, s, sample=sample,
                                 progress=lambda j: console.print(f"checking job {j.id} ({j.name}) ...",
                                                                  highlight=False))
    if as_json:
        print(json.dumps({"ok": all(v.trusted for v in verdicts), "jobs": [v.as_dict() for v in verdicts]}, indent=2))
    else:
        t = Table(title="cheaper sources: list across parents vs one call per parent")
        for col in ("job", "list", "parents compared", "records", "calls: list / per parent", "verdict"):
            t.add_column(col, overflow="fold")
        for v in verdicts:
            if v.error:
                verdict = f"[red]not checked[/]: {v.error}"
            elif v.trusted:
                verdict = "[green]trusted[/]: set `source: list` for it in config/jobs.yaml"
            else:
                d = v.differences[0] if v.differences else None
                why = (f"parent {d.params}: {len(d.only_per_parent)} only per parent, {len(d.only_in_list)} only "
                       f"in the list, {len(d.different)} different" if d else
                       f"{v.records_without_parent} list records name no parent")
                verdict = f"[red]not trusted[/]: {why}"
            t.add_row(f"{v.job_id} {v.name}", v.list_endpoint, f"{v.parents_sampled} of {v.parent_rows}",
                      f"{v.records_compared:,}", f"{v.list_calls:,} / {v.parent_rows:,}", verdict)
        console.print(t)
    if not all(v.trusted for v in verdicts):
        raise typer.Exit(1)
