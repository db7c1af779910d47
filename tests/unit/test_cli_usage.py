"""Usage errors of the `trialsync` command: one line on stderr naming the problem and where the help
is, exit code 2, never a traceback -- through the installed entry point (typer 0.29 raises its
vendored ``typer._click.exceptions``, which a handler matching ``click.exceptions`` misses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRIALSYNC = str(Path(sys.executable).parent / "trialsync")


@pytest.mark.parametrize(("args", "expect"), [
    (["--bogus"], "No such option: --bogus"),
    (["nosuch"], "No such command 'nosuch'"),
    (["history", "--job", "9", "--limit", "-5"], "Invalid value for '--limit'"),
    (["run", "--all", "--parallel", "0"], "Invalid value for '--parallel'"),
    (["extract", "--job", "9", "--limit", "0"], "Invalid value for '--limit'"),
    (["extract", "--job", "9", "--workers", "999"], "Invalid value for '--workers'"),
    (["demo", "--scale", "abc"], "Invalid value for '--scale'"),
    (["jobs", "show"], "Missing argument"),
    (["run", "--job"], "requires an argument"),
    (["stack", "up", "--nope"], "No such option: --nope"),
])
def test_usage_error_is_one_line_and_exit_2(args: list[str], expect: str, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from common.cli import main

    monkeypatch.setenv("TRIALSYNC_STATE_DIR", str(tmp_path))  # nothing may touch a real stack
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: trialsync") and expect in lines[0] and "--help" in lines[0], lines[0]
    assert "Traceback" not in err


def test_bare_command_and_group_name_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from common.cli import main

    assert main(["stack"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing command: one of up, down, status" in err[0]


def test_through_the_installed_script(tmp_path: Path) -> None:
    """The console script itself (not only ``main``): bare ``trialsync`` and a bad value."""
    env = {"PATH": "/usr/bin:/bin", "TRIALSYNC_STATE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    bare = subprocess.run([TRIALSYNC], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert bare.stderr.strip().count("\n") == 0 and "missing command" in bare.stderr
    assert "Usage: trialsync" in bare.stdout  # the help stays available on stdout
    bad = subprocess.run([TRIALSYNC, "history", "--job", "9", "--limit", "-5"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: trialsync history: Invalid value for '--limit': Input should be greater than or equal to 1 "
        "(see `trialsync history --help`)"]
