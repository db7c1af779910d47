"""The transform consumer against the real broker and database: skips what it cannot use, waits for
the loader, coalesces tables finishing together into one batch, records a failing procedure, keeps
running and retries it with backoff, and commits control offsets only after the work."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY

from common import kafka as ck
from common.config import load_settings
from consumers.transform_settings import load_transform_settings
from consumers.transformer import Transformer
from schemas.messages import RunFinished, RunStarted
from tests.integration.transform_support import (
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    load,
    rows,
    scalar,
    seed_small,
    study,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def cfg(tx_dsn: str, stack: dict[str, str], unique: str):
    settings = load_settings(database_url=tx_dsn, kafka_topic_prefix=f"tx{unique}", enable_metrics=False)
    ck.ensure_system_topics(settings)
    return settings


def make_transformer(settings, **ts) -> Transformer:
    tsettings = load_transform_settings(coalesce_seconds=ts.pop("coalesce_seconds", 1.0), poll_interval_seconds=0.2,
                                        group_id=f"trialsync-transformer-{settings.kafka_topic_prefix}", **ts)
    t = Transformer(settings, tsettings)
    t.open()
    return t


def new_run(conn, job_id: int, loaded: bool = True, published: int = 10) -> int:
    return int(scalar(conn, "INSERT INTO etl.dw_etl_runs (job_id, run_status, records_published, load_completed_at) "
                            "VALUES (%s, 'success', %s, CASE WHEN %s THEN now() END) RETURNING id",
                      job_id, published, loaded))


def publish(settings, *messages: bytes | None) -> None:
    p = Producer(ck.producer_config(settings))
    for m in messages:
        p.produce(ck.control_topic(settings), m, key=b"k")
    assert p.flush(15) == 0


def finished(run_id: int, job_id: int, table: str, records: int = 10) -> bytes:
    return RunFinished(run_id=run_id, job_id=job_id, target_table=table, topic=f"t.bronze.{table}",
                       instance_id="cc1", status="success", records_published=records).to_bytes()


def step_until(t: Transformer, cond: Callable[[], bool], timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t.step()
        if cond():
            return
    raise AssertionError("condition not reached in time")


def committed(settings, group: str) -> int:
    """Sum of the group's committed offsets on the control topic (-1001 = none counts as 0)."""
    c = Consumer(ck.consumer_config(group, settings))
    try:
        md = c.list_topics(ck.control_topic(settings), timeout=10)
        parts = [TopicPartition(ck.control_topic(settings), p) for p in md.topics[ck.control_topic(settings)].partitions]
        return sum(max(tp.offset, 0) for tp in c.committed(parts, timeout=10))
    finally:
        c.close()


def test_messages_without_transform_work_are_logged_skipped_and_committed(tx, cfg, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trialsync")
    run_id = new_run(tx, 34)
    publish(cfg,
            finished(run_id, 34, "dim_schedules_staging"),                # no procedure reads schedules
            RunStarted(run_id=run_id, job_id=34, target_table="dim_schedules_staging", topic="x",
                       instance_id="cc1").to_bytes(),
            b'{"type": "something_else"}',                               # not a control message
            finished(run_id, 2, "dim_studies_staging", records=0))        # nothing published
    t = make_transformer(cfg)
    try:
        step_until(t, lambda: t.skipped >= 4)
        t._commit()
    finally:
        t.close()
    assert scalar(tx, "SELECT count(*) FROM etl.dw_transform_runs") == 0
    reasons = [getattr(r, "fields", {}).get("reason") for r in caplog.records if r.getMessage() == "control_message_skipped"]
    assert "unknown table: no transform reads it" in reasons and "not a control message" in reasons
    assert "the run published no records" in reasons
    assert committed(cfg, t.ts.group_id) == 4


def test_tables_finishing_together_run_each_procedure_once_after_load(tx, cfg) -> None:
    seed_small(tx, studies=2, subjects_per_study=2)
    runs = {"dim_studies_staging": (2, new_run(tx, 2)), "dim_subjects_staging": (10, new_run(tx, 10, loaded=False)),
            "dim_patient_visits_staging": (9, new_run(tx, 9))}
    publish(cfg, *(finished(r, j, table) for table, (j, r) in runs.items()))
    t = make_transformer(cfg, coalesce_seconds=2.0)
    try:
        # the subjects run is not loaded yet: nothing may run while it is the only one... the other two
        # are loaded; mark the third loaded inside the coalescing window so all three share one batch
        step_until(t, lambda: len(t.pending.runs) == 3)
        tx.execute("UPDATE etl.dw_etl_runs SET load_completed_at = now() WHERE id = %s",
                   (runs["dim_subjects_staging"][1],))
        step_until(t, lambda: bool(t.batches))
        assert committed(cfg, t.ts.group_id) == 3
    finally:
        t.close()
    assert len(t.batches) == 1
    got = rows(tx, "SELECT procedure_name, status, trigger, trigger_run_ids, trigger_tables FROM etl.dw_transform_runs "
                   "ORDER BY id")
    names = [g["procedure_name"] for g in got]
    assert len(names) == len(set(names)), "a procedure ran twice"
    assert names == [
        "silver.load_dim_studies", "silver.load_dim_subjects", "silver.load_fact_enrollment",
        "silver.load_fact_visit_timelines", "silver.load_fact_element_completions", "silver.load_fact_appointments",
        "silver.load_fact_monitor_queries", "silver.load_fact_study_milestones", "silver.load_fact_patient_payments",
        "silver.load_fact_study_performance", "gold.advance_data_clock", "gold.refresh_mv_study_performance_metrics",
        "gold.refresh_mv_visit_compliance"]
    assert {g["status"] for g in got} == {"success"} and {g["trigger"] for g in got} == {"control"}
    assert all(sorted(g["trigger_run_ids"]) == sorted(r for _, r in runs.values()) for g in got)
    assert scalar(tx, "SELECT count(*) FROM silver.fact_visit_timelines") == 4
    assert scalar(tx, "SELECT count(*) FROM gold.mv_study_performance_metrics") == 2


def test_unloaded_run_holds_its_offset_but_not_other_work(tx, cfg) -> None:
    seed_small(tx, studies=1, subjects_per_study=1)
    waiting = new_run(tx, 2, loaded=False)
    publish(cfg, finished(waiting, 2, "dim_studies_staging"))
    t = make_transformer(cfg, coalesce_seconds=0.2)
    try:
        step_until(t, lambda: len(t.pending.runs) == 1)
        for _ in range(10):
            t.step()
        assert not t.batches and committed(cfg, t.ts.group_id) == 0
        tx.execute("UPDATE etl.dw_etl_runs SET load_completed_at = now() WHERE id = %s", (waiting,))
        step_until(t, lambda: bool(t.batches))
        assert committed(cfg, t.ts.group_id) == 1
    finally:
        t.close()


def test_failed_procedure_is_recorded_others_run_consumer_keeps_going_and_retries(tx, cfg) -> None:
    seed_small(tx, studies=1, subjects_per_study=1)
    load(tx, "dim_studies_staging", [study(66, name="BOOM")])
    tx.execute("ALTER TABLE silver.dim_studies ADD CONSTRAINT tx_sabotage CHECK (study_name <> 'BOOM')")
    try:
        r1, r2 = new_run(tx, 2), new_run(tx, 1)
        publish(cfg, finished(r1, 2, "dim_studies_staging"), finished(r2, 1, "dim_sites_staging"))
        t = make_transformer(cfg, coalesce_seconds=0.5, retry_base_seconds=1.0)
        try:
            step_until(t, lambda: bool(t.batches))
            batch = t.batches[-1]
            by = {r.procedure: r for r in batch.procedures}
            assert by["silver.load_dim_studies"].status == "failed"
            assert by["silver.load_dim_studies"].error_class == "CheckViolation"
            assert "tx_sabotage" in by["silver.load_dim_studies"].error
            assert by["silver.load_dim_sites"].status == "success"  # the other table's transform ran
            assert by["silver.load_fact_enrollment"].status == "skipped"  # depends on dim_studies
            assert by["gold.refresh_mv_study_performance_metrics"].status == "skipped"
            assert REGISTRY.get_sample_value("trialsync_transform_runs_total",
                                             {"procedure": "silver.load_dim_studies", "status": "failed"}) >= 1
            assert REGISTRY.get_sample_value("trialsync_transform_rows_total",
                                             {"procedure": "silver.load_dim_sites", "action": "inserted"}) >= 1
            row = rows(tx, "SELECT * FROM etl.v_transform_status WHERE procedure_name = 'silver.load_dim_studies'")[0]
            assert row["is_failing"] and row["error_class"] == "CheckViolation" and row["next_retry_at"] is not None
            assert committed(cfg, t.ts.group_id) == 2  # recorded, so the messages are done

            # the consumer keeps working: a later message for another table is transformed
            r3 = new_run(tx, 1)
            publish(cfg, finished(r3, 1, "dim_sites_staging"))
            step_until(t, lambda: committed(cfg, t.ts.group_id) == 3)
            assert scalar(tx, "SELECT count(*) FROM etl.dw_transform_runs WHERE procedure_name = "
                              "'silver.load_dim_sites' AND status = 'success' AND %s = ANY(trigger_run_ids)", r3) == 1

            # the cause is fixed; the retry (backoff 1 s) runs the failed procedure and its dependents
            tx.execute("ALTER TABLE silver.dim_studies DROP CONSTRAINT tx_sabotage")
            step_until(t, lambda: any(b.procedures and b.procedures[0].procedure == "silver.load_dim_studies"
                                      and b.ok for b in t.batches))
            retry = rows(tx, "SELECT trigger, attempt, status, trigger_run_ids FROM etl.dw_transform_runs "
                             "WHERE procedure_name = 'silver.load_dim_studies' ORDER BY id")
            assert retry[0]["status"] == "failed" and retry[0]["attempt"] == 1
            assert retry[-1]["trigger"] == "retry" and retry[-1]["status"] == "success"
            assert retry[-1]["attempt"] == len(retry) >= 2 and retry[-1]["trigger_run_ids"] == sorted([r1, r2])
            assert not rows(tx, "SELECT is_failing FROM etl.v_transform_status "
                                "WHERE procedure_name = 'silver.load_dim_studies'")[0]["is_failing"]
            assert scalar(tx, "SELECT count(*) FROM silver.dim_studies WHERE study_name = 'BOOM'") == 1
        finally:
            t.close()
    finally:
        tx.execute("ALTER TABLE silver.dim_studies DROP CONSTRAINT IF EXISTS tx_sabotage")
