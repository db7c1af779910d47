"""The extractor's metric families move when a real run against the real simulator happens: runs
started/finished, duration, timeout, last success, records extracted/published, API requests,
latency, 429s and retries -- scraped over HTTP before and after."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.metrics_helpers import delta, pipeline_env, scrape, total

pytestmark = pytest.mark.integration

KEY = "metrics-extract-key"
SITES_JOB = 1  # /api/v1/sites -> dim_sites_staging: small, not parameterized


@pytest.fixture
def pipeline(fresh_db: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    with pipeline_env(unique, monkeypatch, KEY) as p:
        yield p


def test_extractor_families_move(pipeline: dict[str, Any]) -> None:
    from producers.extractor import run_job

    s, catalog, sim, url = pipeline["settings"], pipeline["catalog"], pipeline["sim"], pipeline["url"]
    job = catalog.get(SITES_JOB)
    table, jid = job.target_table, str(job.id)
    m0 = scrape(url)
    r = run_job(job, mode="full", settings=s, trigger="test")
    assert r.status == "success" and r.records_published > 0
    m1 = scrape(url)
    assert delta(m0, m1, "trialsync_job_runs_started_total", job_id=jid) == 1
    assert delta(m0, m1, "trialsync_job_runs_total", job_id=jid, status="success") == 1
    assert delta(m0, m1, "trialsync_job_run_duration_seconds_count", job_id=jid) == 1
    assert total(m1, "trialsync_job_last_success_timestamp_seconds", job_id=jid) > 1.7e9
    assert total(m1, "trialsync_job_timeout_seconds", job_id=jid) == (job.timeout_seconds or s.etl_timeout_seconds)
    assert total(m1, "trialsync_job_runs_in_progress") == 0
    assert delta(m0, m1, "trialsync_records_extracted_total", table=table) == r.records_extracted
    assert delta(m0, m1, "trialsync_records_published_total", table=table) == r.records_published
    assert delta(m0, m1, "trialsync_api_requests_total", endpoint=job.endpoint, status_class="2xx") >= 1
    assert delta(m0, m1, "trialsync_api_request_duration_seconds_count", endpoint=job.endpoint) >= 1
    for (name, labels), _ in m1.items():
        assert KEY not in str(labels), name

    # a 429 is counted, retried and the run still succeeds
    sim.set_faults(f"429@{job.endpoint},count=1")
    r2 = run_job(job, mode="full", settings=s, trigger="test")
    assert r2.status == "success"
    m2 = scrape(url)
    assert delta(m1, m2, "trialsync_api_rate_limited_total", endpoint=job.endpoint) == 1
    assert delta(m1, m2, "trialsync_api_retries_total", endpoint=job.endpoint) >= 1
    assert delta(m1, m2, "trialsync_api_requests_total", endpoint=job.endpoint, status_class="4xx") == 1

    # a failing run is counted as failed, and its last success does not move
    last_ok = total(m2, "trialsync_job_last_success_timestamp_seconds", job_id=jid)
    sim.set_faults(f"500@{job.endpoint}")
    r3 = run_job(job, mode="full", settings=s, trigger="test")
    sim.set_faults("")
    assert r3.status == "failed"
    m3 = scrape(url)
    assert delta(m2, m3, "trialsync_job_runs_total", job_id=jid, status="failed") == 1
    assert delta(m2, m3, "trialsync_api_requests_total", endpoint=job.endpoint, status_class="5xx") >= 1
    assert total(m3, "trialsync_job_last_success_timestamp_seconds", job_id=jid) == last_ok
