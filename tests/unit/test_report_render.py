"""The run report's HTML: self-contained, every database text escaped, the skip reason shown once."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from orchestrator.report import JobRow, ReportData, _levels, render

T0 = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)


def _attempt(job_id: int, status: str, start: float, end: float | None, loaded: float | None = None,
             err: str | None = None, **kw: object) -> dict[str, object]:
    return {"id": job_id * 10, "job_id": job_id, "name": f"job{job_id}", "run_status": status, "mode": "full",
            "attempt": kw.get("attempt", 1), "records_extracted": kw.get("n", 0), "records_published": kw.get("n", 0),
            "records_loaded": kw.get("n", 0), "records_rejected": 0, "api_calls": kw.get("calls", 0),
            "parents_total": None, "parents_failed": None, "error_class": "ServerError" if err else None,
            "error_message": err, "started_at": T0 + timedelta(seconds=start),
            "completed_at": T0 + timedelta(seconds=end) if end is not None else None,
            "load_completed_at": T0 + timedelta(seconds=loaded) if loaded is not None else None,
            "duration_seconds": (end - start) if end is not None else None}


def _data() -> ReportData:
    orch = {"id": "7a1f0c1e-0000-4000-8000-000000000001", "trigger": "cli", "mode": "full", "status": "partial",
            "jobs_succeeded": 1, "jobs_partial": 0, "jobs_failed": 1, "jobs_skipped": 1, "records_extracted": 120,
            "records_loaded": 120, "started_at": T0, "completed_at": T0 + timedelta(seconds=40),
            "duration_seconds": 40.0, "error_message": None}
    jobs = [
        JobRow(2, "Studies <b>", 0, [_attempt(2, "failed", 0, 5, err="HTTP 500 <script>alert(1)</script>"),
                                     _attempt(2, "success", 6, 20, loaded=25, n=120, calls=3, attempt=2)]),
        JobRow(10, "Subjects", 1, [_attempt(10, "skipped", 0, 0, err="skipped: parent job 2 (Studies) failed")]),
    ]
    quality = [{"check_name": "dim_studies_current_unique", "target_table": "silver.dim_studies", "severity": "error",
                "status": "fail", "failed_rows": 3, "checked_at": T0, "error_message": None}]
    return ReportData(orchestration=orch, jobs=jobs, quality=quality, generated_at=T0 + timedelta(seconds=50))


def test_page_is_self_contained_and_escapes_database_text() -> None:
    page = render(_data())
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Studies <b>" not in page and "Studies &lt;b&gt;" in page
    assert re.search(r"<(script|link|img|iframe)\b|\b(src|href)\s*=|@import|url\(", page) is None


def test_page_shows_jobs_levels_lag_failures_and_checks() -> None:
    page = render(_data())
    assert "level 0" in page and "level 1" in page
    assert page.count("skipped: parent job 2 (Studies) failed") == 2  # the Gantt row and the table
    assert "skipped: skipped:" not in page
    assert "5.0 s" in page  # extract-to-load lag of the successful attempt (20 s -> 25 s)
    assert "dim_studies_current_unique" in page and ">fail<" in page
    assert page.count("<svg") == 3  # timeline, records, API calls


def test_levels_come_from_the_catalog() -> None:
    """The timeline groups jobs by dependency level: Subjects (10, one call per study) sits below
    Studies (2). A report that cannot load the catalog shows no levels rather than failing, which
    once hid that the levels were never computed at all."""
    assert _levels([2, 10, 1]) == {2: 0, 1: 0, 10: 1}

