"""``trialsync report``: write the HTML run report of one orchestration (orchestrator/report.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    run: Annotated[str | None, typer.Option("--run", help="orchestration id (or a unique prefix; see "
                                                          "`trialsync history`)")] = None,
    last: Annotated[bool, typer.Option("--last", help="the latest orchestration (the default)")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file to write "
                                                                "(default <state dir>/reports/run-<id>.html)")] = None,
) -> None:
    """Write one self-contained HTML page about a run: job timeline by dependency level, records and API
    calls per job, extract-to-load lag, failures and skips with reasons, quality checks."""
    from common.cli import UserError, console
    from common.db import connect
    from common.stack import state_dir
    from orchestrator.report import ReportError, write_report

    if run and last:
        raise UserError("give --run ID or --last, not both", code=2)
    with connect(autocommit=True, application_name="trialsync-report") as conn:
        try:
            path, data = write_report(conn, out, run=run, state_dir=state_dir())
        except ReportError as e:
            raise UserError(str(e)) from None
    o = data.orchestration
    console.print(f"run report ({o['status']}, {len(data.jobs)} jobs): {path.resolve()}", highlight=False,
                  soft_wrap=True)
