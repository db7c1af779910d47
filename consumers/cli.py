"""Commands of the consumers package, registered on the `trialsync` app by common/cli.py."""

from __future__ import annotations

import typer

from consumers import loader_cli, transform_cli


def register(app: typer.Typer) -> None:
    """Add this package's commands to the top-level app."""
    loader_cli.register(app)
    transform_cli.register(app)
