"""`trialsync report`: the HTML page of a real orchestration, looked at in headless Chromium.

A real run (loader service, simulator, Studies failing with HTTP 500 so its children are skipped,
others succeeding), the transforms' quality checks, then the real CLI writes the page; Chromium
renders it, takes a screenshot, and the page must show the run's jobs, the failure and the skips
with their reasons, the quality checks -- and produce no console error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.chromium import chromium_binary, look_at
from tests.integration.orch_pipeline import (
    Pipeline,
    pipeline,  # noqa: F401 - fixture
    require_pipeline_modules,
)

pytestmark = pytest.mark.integration
require_pipeline_modules()


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    from simulator.testing import SimulatorProcess

    with SimulatorProcess(scale=0.002, seed=11, api_key="report-test-key") as s:
        yield s


def test_console_errors_are_seen(tmp_path: Path) -> None:
    """The check below can fail: a page that logs an error is caught."""
    chromium_binary()
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('boom-123');"
                   "undefinedFunction()</script></body></html>")
    look = look_at(bad.as_uri(), tmp_path / "bad.png", height=400)
    assert any("boom-123" in line for line in look.console), look.console


@pytest.mark.heavy  # a run, then headless Chromium: ~35 s, in `make test-heavy`
def test_report_of_a_real_run_renders_in_chromium(pipeline: Pipeline, tmp_path: Path) -> None:  # noqa: F811
    chromium_binary()
    pipeline.sim.set_faults("500@/api/v1/studies/odata")
    run = pipeline.cli("run", "--job", "10", "--job", "1", "--job", "8", "--with-deps", "--wait-load", "--json")
    assert run.returncode in (0, 1), run.stderr
    pipeline.sim.clear_faults()
    tr = pipeline.cli("transform", "--now")
    assert tr.returncode in (0, 1), tr.stderr
    out = tmp_path / "report.html"
    rep = pipeline.cli("report", "--last", "--out", str(out))
    assert rep.returncode == 0, rep.stderr
    assert str(out) in rep.stdout.replace("\n", "")
    page = out.read_text()
    assert re.search(r"<(script|link|img|iframe)\b|\b(src|href)\s*=|@import|url\(", page) is None, \
        "the page must be self-contained (no script, CDN or remote asset)"

    with pipeline.conn() as c:
        oid, = c.execute("SELECT id FROM etl.dw_orchestrations ORDER BY started_at DESC LIMIT 1").fetchone()
        jobs = c.execute("SELECT DISTINCT r.job_id, j.name, r.run_status FROM etl.dw_etl_runs r "
                         "JOIN etl.dw_etl_jobs j ON j.id = r.job_id WHERE r.orchestration_id = %s", (oid,)).fetchall()
        checks = [r[0] for r in c.execute("SELECT DISTINCT check_name FROM etl.dw_quality_results").fetchall()]
    assert {s for _, _, s in jobs} >= {"success", "failed", "skipped"}, jobs

    look = look_at(out.as_uri(), tmp_path / "report.png")
    assert look.console == [], look.console
    text = re.sub(r"<[^>]+>", " ", look.dom)
    assert str(oid) in text
    for job_id, name, _ in jobs:
        assert f"{job_id} · {name}"[:30] in text, f"job {job_id} ({name}) is not on the page"
    assert "parent job 2 (Studies) failed" in text, "skips must show their reason"
    assert "Job timeline by dependency level" in text and "level 1" in text
    assert checks and all(ch in text for ch in checks), "every quality check that ran must be listed"
    assert look.screenshot.exists() and look.screenshot.stat().st_size > 20_000, "the screenshot shows a page"
