"""Commands of the orchestrator package, registered on the `trialsync` app by common/cli.py."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the top-level app."""
    app.command("demo")(demo)
    __import__("orchestrator.ops_cli", fromlist=["register"]).register(app)


def demo(scale: Annotated[float, typer.Option(help="simulated data volume (1.0 = production)")] = 0.01) -> None:
    """Set up the embedded stack and the warehouse schema, then sync the job catalog."""
    from rich.console import Console

    from common import stack
    from common.db import migrate
    from orchestrator.catalog import load_catalog, sync

    console = Console()
    stack.up()
    applied = migrate()
    catalog = load_catalog()
    r = sync(catalog)
    console.print(f"stack up; {len(applied)} migrations applied; {len(catalog)} jobs synced "
                  f"({len(catalog.runnable)} active), {r.inserted} new")
