"""Each metric family of the extractor, loader and transform moves when its event happens.

A real simulator, the real extractor (``run_job``), the real loader (``Loader --once``) and the real
transform runner work on a database of their own; a MetricsServer in this process is scraped over
HTTP before and after each step, and each family's samples are compared."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.metrics_helpers import delta, pipeline_env, scrape, total

pytestmark = pytest.mark.integration

# the extractor, loader and transform packages land on main separately; until all three are there
extractor = pytest.importorskip("producers.extractor", reason="the extractor has not landed on this branch")
loader_mod = pytest.importorskip("consumers.loader", reason="the loader has not landed on this branch")
transform_runner = pytest.importorskip("consumers.transform_runner",
                                       reason="the transform consumer has not landed on this branch")

KEY = "metrics-test-key"
SITES_JOB = 1  # /api/v1/sites -> dim_sites_staging: small, not parameterized


@pytest.fixture
def pipeline(fresh_db: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    with pipeline_env(unique, monkeypatch, KEY) as p:
        yield p


_delta = delta


def test_extract_load_transform_families_move(pipeline: dict[str, Any]) -> None:
    from confluent_kafka import Producer

    from common.kafka import bronze_topic, producer_config

    run_job, Loader, LoaderOptions = extractor.run_job, loader_mod.Loader, loader_mod.LoaderOptions
    ProcedureRunner = transform_runner.ProcedureRunner  # noqa: N806

    s, catalog, sim, url = pipeline["settings"], pipeline["catalog"], pipeline["sim"], pipeline["url"]
    job = catalog.get(SITES_JOB)
    table, jid = job.target_table, str(job.id)

    # -- extractor ---------------------------------------------------------------------------------
    m0 = scrape(url)
    r = run_job(job, mode="full", settings=s, trigger="test")
    assert r.status == "success" and r.records_published > 0
    m1 = scrape(url)
    assert _delta(m0, m1, "trialsync_job_runs_started_total", job_id=jid) == 1
    assert _delta(m0, m1, "trialsync_job_runs_total", job_id=jid, status="success") == 1
    assert _delta(m0, m1, "trialsync_job_run_duration_seconds_count", job_id=jid) == 1
    assert total(m1, "trialsync_job_last_success_timestamp_seconds", job_id=jid) > 1.7e9
    assert total(m1, "trialsync_job_timeout_seconds", job_id=jid) > 0, (
        "the extractor must set JOB_TIMEOUT.labels(job_id).set(job.timeout_seconds or ETL_TIMEOUT_SECONDS) "
        "when a run starts (the dashboard's duration-vs-timeout panel and TrialSyncJobNearTimeout need it)")
    assert _delta(m0, m1, "trialsync_records_extracted_total", table=table) == r.records_extracted
    assert _delta(m0, m1, "trialsync_records_published_total", table=table) == r.records_published
    assert _delta(m0, m1, "trialsync_api_requests_total", endpoint=job.endpoint, status_class="2xx") >= 1
    assert _delta(m0, m1, "trialsync_api_request_duration_seconds_count", endpoint=job.endpoint) >= 1
    assert total(m1, "trialsync_job_runs_in_progress") == 0
    # endpoint labels are templates, never ids or the key
    for (name, labels), _ in m1.items():
        assert KEY not in str(labels), name

    # -- 429 and retry -----------------------------------------------------------------------------
    sim.set_faults(f"429@{job.endpoint},count=1")
    r2 = run_job(job, mode="full", settings=s, trigger="test")
    assert r2.status == "success"
    m2 = scrape(url)
    assert _delta(m1, m2, "trialsync_api_rate_limited_total", endpoint=job.endpoint) == 1
    assert _delta(m1, m2, "trialsync_api_retries_total", endpoint=job.endpoint) >= 1
    assert _delta(m1, m2, "trialsync_api_requests_total", endpoint=job.endpoint, status_class="4xx") == 1

    # -- loader (with one poison message) ----------------------------------------------------------
    p = Producer(producer_config(s))
    p.produce(bronze_topic(table, s), key=b"cc1:poison", value=b"{not json")
    p.flush(10)
    stats = Loader(LoaderOptions(group=f"g{pipeline['unique']}", tables=[table], once=True, idle_exit_s=5,
                                 install_signal_handlers=False), s).run()
    assert stats.inserted == r.records_published and stats.rejected == 1
    m3 = scrape(url)
    assert _delta(m2, m3, "trialsync_records_loaded_total", table=table, outcome="inserted") == stats.inserted
    assert _delta(m2, m3, "trialsync_records_loaded_total", table=table) == stats.records - stats.rejected
    assert _delta(m2, m3, "trialsync_records_rejected_total", table=table) == 1
    assert _delta(m2, m3, "trialsync_loader_batch_size_count", table=table) >= 1
    assert _delta(m2, m3, "trialsync_loader_batch_size_sum", table=table) >= stats.inserted
    assert _delta(m2, m3, "trialsync_loader_flush_duration_seconds_count", table=table) >= 1
    assert _delta(m2, m3, "trialsync_loader_end_to_end_seconds_count", table=table) >= 1
    lag = [(lbl, v) for (n, lbl), v in m3.items()
           if n == "trialsync_consumer_lag_messages" and ("topic", bronze_topic(table, s)) in lbl]
    # drained: every partition at the high watermark (the loader reports its final lag before --once exits)
    assert lag and all(v == 0 for _, v in lag), f"consumer lag not reported after draining: {lag}"
    assert any(n == "trialsync_db_pool_connections" and ("pool", "loader") in lbl for (n, lbl) in m3)

    # -- transform and quality ---------------------------------------------------------------------
    runner = ProcedureRunner(s)
    try:
        batch = runner.run_batch(runner.plan.all(), trigger="manual")
    finally:
        runner.close()
    m4 = scrape(url)
    assert batch.procedures
    for pr in batch.procedures:
        assert _delta(m3, m4, "trialsync_transform_runs_total", procedure=pr.procedure, status=pr.status) >= 1
        assert _delta(m3, m4, "trialsync_transform_duration_seconds_count", procedure=pr.procedure) >= 1
    assert _delta(m3, m4, "trialsync_transform_rows_total") > 0
    assert batch.quality
    for q in batch.quality:
        passing = total(m4, "trialsync_quality_check_passing", check=q.check.name)
        assert passing == (1.0 if q.status == "pass" else 0.0), q.check.name
        assert total(m4, "trialsync_quality_check_failed_rows", check=q.check.name) == q.failed_rows


def test_backoff_counts_pauses_for_an_unavailable_database(pipeline: dict[str, Any]) -> None:
    import threading
    import time

    from confluent_kafka import Producer
    from pydantic import SecretStr

    from common.kafka import bronze_topic, ensure_topics, producer_config
    from common.stack import free_port

    Loader, LoaderOptions = loader_mod.Loader, loader_mod.LoaderOptions  # noqa: N806

    s, url = pipeline["settings"], pipeline["url"]
    table = "dim_sites_staging"
    ensure_topics([bronze_topic(table, s)], s)
    p = Producer(producer_config(s))
    p.produce(bronze_topic(table, s), key=b"cc1:1", value=b'{"id": 1}')
    p.flush(10)
    dead = s.model_copy(update={"database_url": SecretStr(f"postgresql://x@127.0.0.1:{free_port()}/none")})
    before = scrape(url)
    loader = Loader(LoaderOptions(group=f"b{pipeline['unique']}", tables=[table], install_signal_handlers=False),
                    dead)
    t = threading.Thread(target=loader.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while _delta(before, scrape(url), "trialsync_backoff_total", service="loader", dependency="database") < 1:
            assert time.monotonic() < deadline, "the loader never reported a database back-off"
            time.sleep(0.5)
    finally:
        loader.stop()
        t.join(60)
    assert not t.is_alive()
