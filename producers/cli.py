"""Commands of the producers package, registered on the `trialsync` app by common/cli.py."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the top-level app."""
