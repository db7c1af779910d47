"""Commands of the consumers package, registered on the `trialsync` app by common/cli.py."""

from __future__ import annotations

import typer

from consumers import transform_cli


def register(app: typer.Typer) -> None:
    """Add this package's commands to the top-level app."""
    transform_cli.register(app)
