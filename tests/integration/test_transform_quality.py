"""Data-quality checks: a clean warehouse passes, planted problems are caught with sample keys, an
error-severity failure fails the transform run that built the table and stays queryable."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from consumers.quality import run_quality_checks
from consumers.transform_runner import ProcedureRunner
from consumers.transform_settings import load_transform_settings
from tests.integration.transform_support import (
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    fixture_tx_settings,  # noqa: F401 - pytest fixture
    load,
    rows,
    scalar,
    seed_small,
    transform_all,
    visit,
)

pytestmark = pytest.mark.integration


def gauge(name: str, check: str, severity: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"check": check, "severity": severity})


def test_clean_warehouse_passes_every_check(tx) -> None:
    seed_small(tx, studies=2, subjects_per_study=5)
    transform_all(tx)
    results = run_quality_checks(tx)
    assert len(results) >= 35
    assert {r.check.name: r.status for r in results if r.status != "pass"} == {}
    assert scalar(tx, "SELECT count(*) FROM etl.v_quality_latest WHERE status = 'pass'") == len(results)
    assert gauge("trialsync_quality_check_passing", "fact_enrollment_orphan_keys", "error") == 1


def test_planted_problems_are_detected(tx) -> None:
    seed_small(tx, studies=2, subjects_per_study=5)
    tx.execute("SET trialsync.watermark_margin = '0 seconds'")  # reconciliation covers rows below the watermark
    transform_all(tx)
    with tx.transaction(force_rollback=True):
        tx.execute("SET CONSTRAINTS ALL DEFERRED")  # lets us plant a second current version
        tx.execute("""INSERT INTO silver.dim_studies (source_id, instance_id, study_id, study_name, study_status,
                          row_hash, effective_start_date)
                      SELECT source_id, instance_id, study_id, study_name, study_status, row_hash,
                             effective_start_date + interval '1 day'
                        FROM silver.dim_studies WHERE source_id = 'cc1:1'""")
        tx.execute("UPDATE silver.fact_enrollment SET study_key = 999999 WHERE source_id = 'cc1:3'")
        tx.execute("UPDATE silver.fact_visit_timelines SET actual_date_key = 18500101 WHERE source_id = 'cc1:1001'")
        tx.execute("UPDATE silver.fact_visit_timelines SET min_due_date = max_due_date + 1 WHERE source_id = 'cc1:1002'")
        tx.execute("UPDATE silver.fact_study_performance SET visits_due = -1 "
                   "WHERE (study_source_id, date_key) = (SELECT study_source_id, min(date_key) FROM "
                   "silver.fact_study_performance WHERE study_source_id = 'cc1:2' GROUP BY 1)")
        tx.execute("UPDATE silver.dim_subjects SET study_source_id = NULL WHERE source_id = 'cc1:4'")
        tx.execute("UPDATE silver.dim_subjects SET subject_status = 'Abducted' WHERE source_id = 'cc1:5'")
        tx.execute("DELETE FROM silver.fact_visit_timelines WHERE source_id = 'cc1:1006'")
        tx.execute("UPDATE silver.dim_patients SET birth_year = 2999 WHERE patient_ref = etl.pseudonymize('cc1:2')")

        results = {r.check.name: r for r in run_quality_checks(tx)}
        failing = {n: r for n, r in results.items() if r.status != "pass"}
        expected = {
            "dim_studies_current_unique": ["cc1:1"],
            "dim_studies_version_ranges": None,  # the planted version overlaps the first
            "fact_enrollment_orphan_keys": ["cc1:3"],
            "fact_visit_timelines_date_keys": ["cc1:1001"],
            "fact_visit_timelines_window": ["cc1:1002"],
            "fact_study_performance_measures": None,
            "dim_subjects_required_fields": ["cc1:4"],
            "dim_subjects_status_vocabulary": ["cc1:5"],
            "fact_visit_timelines_reconcile_bronze": ["cc1:1006"],
            "dim_patients_birth_year": None,
            "dim_subjects_reconcile_bronze": None,  # unaffected
        }
        for name, keys in expected.items():
            if name == "dim_subjects_reconcile_bronze":
                assert name not in failing
                continue
            assert name in failing, f"{name} did not detect the planted problem"
            assert failing[name].failed_rows >= 1 and failing[name].sample_keys
            if keys is not None:
                assert failing[name].sample_keys == keys, name
        assert failing["fact_study_performance_measures"].sample_keys[0].startswith("cc1:2@")
        assert {r.check.severity for n, r in failing.items() if n == "dim_subjects_status_vocabulary"} == {"warning"}
        assert gauge("trialsync_quality_check_passing", "fact_enrollment_orphan_keys", "error") == 0
        assert gauge("trialsync_quality_check_failed_rows", "fact_enrollment_orphan_keys", "error") == 1
        latest = {r["check_name"]: r for r in rows(tx, "SELECT * FROM etl.v_quality_latest")}
        assert latest["fact_enrollment_orphan_keys"]["status"] == "fail"
        assert latest["fact_enrollment_orphan_keys"]["sample_keys"] == ["cc1:3"]


def test_a_broken_check_is_recorded_and_does_not_stop_the_others(tx) -> None:
    with tx.transaction(force_rollback=True):
        tx.execute("INSERT INTO etl.dw_quality_checks (check_name, target_table, severity, category, description, "
                   "check_sql) VALUES ('two_columns', 'silver.dim_sites', 'error', 'required', 'bad', 'SELECT 1, 2'), "
                   "('no_table', 'silver.dim_sites', 'error', 'required', 'bad', 'SELECT x FROM silver.nope')")
        results = {r.check.name: r for r in run_quality_checks(tx, ["silver.dim_sites"])}
        assert results["two_columns"].status == "error" and "one column" in results["two_columns"].error
        assert results["no_table"].status == "error" and "UndefinedTable" in results["no_table"].error
        assert results["no_table"].is_blocking
        assert results["dim_sites_required_fields"].status == "pass"


def test_error_check_fails_the_transform_run_and_stays_visible(tx, tx_settings) -> None:
    seed_small(tx, studies=1, subjects_per_study=2)
    # a source record with a date outside the calendar: its date key cannot join dim_date
    load(tx, "dim_patient_visits_staging", [visit(1002, 2, 1, target="1850-01-01", min_due=None, max_due=None)],
         params={"studyId": 1, "subjectId": 2})
    runner = ProcedureRunner(tx_settings, load_transform_settings())
    try:
        batch = runner.run_batch(runner.plan.all(), trigger="manual")
        failed = {r.procedure: r for r in batch.failed}
        assert set(failed) == {"silver.load_fact_visit_timelines", "silver.load_fact_study_performance"}
        r = failed["silver.load_fact_visit_timelines"]
        assert r.error_class == "QualityCheckFailed" and "fact_visit_timelines_date_keys" in r.error
        assert "cc1:1002" in r.error
        st = {s["procedure_name"]: s for s in rows(tx, "SELECT * FROM etl.v_transform_status")}
        assert st["silver.load_fact_visit_timelines"]["is_failing"]
        assert st["silver.load_fact_visit_timelines"]["next_retry_at"] is None  # data problems are not retried
        assert not st["silver.load_dim_studies"]["is_failing"]
        q = rows(tx, "SELECT * FROM etl.v_quality_latest WHERE check_name = 'fact_visit_timelines_date_keys'")[0]
        assert q["status"] == "fail" and q["sample_keys"] == ["cc1:1002"]
        assert q["batch_id"] == batch.batch_id and q["transform_run_id"] == r.run_id

        # the source is corrected; the next transform passes and clears the failure
        load(tx, "dim_patient_visits_staging", [visit(1002, 2, 1)], params={"studyId": 1, "subjectId": 2})
        batch = runner.run_batch(runner.plan.for_tables(["dim_patient_visits_staging"]), trigger="manual")
        assert batch.ok and not batch.failed
        st = {s["procedure_name"]: s for s in rows(tx, "SELECT * FROM etl.v_transform_status")}
        assert not st["silver.load_fact_visit_timelines"]["is_failing"]
        assert rows(tx, "SELECT status FROM etl.v_quality_latest "
                        "WHERE check_name = 'fact_visit_timelines_date_keys'")[0]["status"] == "pass"
    finally:
        runner.close()


def test_history_pruning_keeps_the_latest_result_per_check(tx) -> None:
    from consumers.quality import run_quality_checks as run

    run(tx, ["silver.dim_sites"])
    run(tx, ["silver.dim_sites"])
    tx.execute("UPDATE etl.dw_quality_results SET checked_at = checked_at - interval '200 days'")
    n_checks = scalar(tx, "SELECT count(DISTINCT check_name) FROM etl.dw_quality_results")
    assert scalar(tx, "SELECT etl.prune_transform_history(interval '90 days')") == n_checks  # one old copy each
    assert scalar(tx, "SELECT count(*) FROM etl.dw_quality_results") == n_checks
    assert scalar(tx, "SELECT count(*) FROM etl.v_quality_latest WHERE target_table = 'silver.dim_sites' "
                      "AND status = 'pass'") == n_checks
