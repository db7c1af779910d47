"""Facts and gold views reconcile with Bronze; late-arriving dimensions heal; the two element feeds
and the study-day performance fact stay exact under changes and deletes."""

from __future__ import annotations

import pytest

from tests.integration.transform_support import (
    call,
    delete,
    element,
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    load,
    rows,
    scalar,
    seed_small,
    site,
    sponsor,
    staff,
    study,
    subject,
    transform_all,
    ts,
    visit,
)

pytestmark = pytest.mark.integration

# Expected study x day activity computed straight from the facts (what the incremental procedure
# must always equal).
EXPECTED_PERFORMANCE = """
SELECT study_source_id, date_key,
       count(*) FILTER (WHERE m = 'screened') AS subjects_screened,
       count(*) FILTER (WHERE m = 'enrolled') AS subjects_enrolled,
       count(*) FILTER (WHERE m = 'randomized') AS subjects_randomized,
       count(*) FILTER (WHERE m = 'screen_failed') AS subjects_screen_failed,
       count(*) FILTER (WHERE m = 'dropped') AS subjects_dropped,
       count(*) FILTER (WHERE m = 'completed') AS subjects_completed,
       count(*) FILTER (WHERE m = 'due') AS visits_due,
       count(*) FILTER (WHERE m = 'done') AS visits_completed,
       count(*) FILTER (WHERE m = 'in_window') AS visits_completed_in_window,
       count(*) FILTER (WHERE m = 'element') AS elements_completed
  FROM (SELECT study_source_id, screening_date_key AS date_key, 'screened' AS m FROM silver.fact_enrollment
        UNION ALL SELECT study_source_id, enrollment_date_key, 'enrolled' FROM silver.fact_enrollment
        UNION ALL SELECT study_source_id, randomization_date_key, 'randomized' FROM silver.fact_enrollment
        UNION ALL SELECT study_source_id, screen_failure_date_key, 'screen_failed' FROM silver.fact_enrollment
        UNION ALL SELECT study_source_id, dropped_date_key, 'dropped' FROM silver.fact_enrollment
        UNION ALL SELECT study_source_id, completion_date_key, 'completed' FROM silver.fact_enrollment
        UNION ALL SELECT study_source_id, target_due_date_key, 'due' FROM silver.fact_visit_timelines
        UNION ALL SELECT study_source_id, coalesce(actual_date_key, target_due_date_key), 'done'
                    FROM silver.fact_visit_timelines WHERE is_completed
        UNION ALL SELECT study_source_id, actual_date_key, 'in_window' FROM silver.fact_visit_timelines
                  WHERE is_within_window
        UNION ALL SELECT study_source_id, completed_date_key, 'element' FROM silver.fact_element_completions) x
 WHERE study_source_id IS NOT NULL AND date_key IS NOT NULL
 GROUP BY 1, 2 ORDER BY 1, 2
"""
ACTUAL_PERFORMANCE = """
SELECT study_source_id, date_key, subjects_screened, subjects_enrolled, subjects_randomized,
       subjects_screen_failed, subjects_dropped, subjects_completed, visits_due, visits_completed,
       visits_completed_in_window, elements_completed
  FROM silver.fact_study_performance ORDER BY 1, 2
"""


def assert_performance_exact(conn) -> None:
    expected = rows(conn, EXPECTED_PERFORMANCE)
    assert expected, "no activity at all"
    assert rows(conn, ACTUAL_PERFORMANCE) == expected


def test_facts_reconcile_with_bronze_counts(tx) -> None:
    seed_small(tx, studies=3, subjects_per_study=4)
    load(tx, "dim_patient_visits_staging", [visit(9999, 1, 1)], params={"studyId": 1, "subjectId": 1})
    delete(tx, "dim_patient_visits_staging", ["cc1:9999"])  # a deleted visit never becomes a fact
    transform_all(tx)

    live = "SELECT count(*) FROM bronze.{} WHERE NOT is_deleted"
    assert scalar(tx, "SELECT count(*) FROM silver.fact_enrollment") == scalar(tx, live.format("dim_subjects_staging")) == 12
    assert scalar(tx, "SELECT count(*) FROM silver.fact_visit_timelines") == \
        scalar(tx, live.format("dim_patient_visits_staging")) == 12
    assert scalar(tx, "SELECT count(*) FROM silver.fact_element_completions") == scalar(
        tx, "SELECT count(*) FROM bronze.dim_patient_visit_elements_staging WHERE NOT is_deleted "
            "AND data->>'completedOn' IS NOT NULL") == 3
    assert scalar(tx, "SELECT count(*) FROM silver.dim_studies WHERE is_current") == 3
    assert scalar(tx, "SELECT count(*) FROM silver.dim_subjects WHERE is_current") == 12
    # a consistent Bronze resolves every key
    for t in ("fact_enrollment", "fact_visit_timelines", "fact_element_completions"):
        assert scalar(tx, f"SELECT count(*) FROM silver.{t} WHERE subject_key IS NULL OR study_key IS NULL "
                          "OR site_key IS NULL OR patient_key IS NULL") == 0, t
    # each subject's fact carries the keys of its current dimension rows
    assert scalar(tx, """SELECT count(*) FROM silver.fact_enrollment f
                          JOIN silver.dim_subjects s ON s.subject_key = f.subject_key AND s.is_current
                          JOIN silver.dim_studies st ON st.study_key = f.study_key AND st.source_id = s.study_source_id
                          JOIN silver.dim_sites si ON si.site_key = f.site_key AND si.source_id = s.site_source_id
                          JOIN silver.dim_patients p ON p.patient_key = f.patient_key AND p.patient_ref = s.patient_ref
                         WHERE f.source_id = s.source_id""") == 12
    assert_performance_exact(tx)


def test_gold_views_equal_handwritten_sql_over_bronze(tx) -> None:
    seed_small(tx, studies=3, subjects_per_study=5)
    load(tx, "dim_sponsors_staging", [sponsor(1, name="Acme Pharma")])
    # a completed visit without a completed appointment still counts (on its due day)
    load(tx, "dim_patient_visits_staging", [visit(7777, 2, 1, status="Completed")], params={"studyId": 1, "subjectId": 2})
    transform_all(tx)

    # hand-written over Bronze: subjects per study and funnel stage, from the status history and the
    # current status (the CC model: a stage is reached once, ranks Prescreened 1 .. Completed 5)
    expected = {r["study"]: r for r in rows(tx, """
        WITH rk(status, r) AS (VALUES ('Prescreened', 1), ('NonQualified', 1), ('Screened', 2), ('ScreenFailed', 2),
                                      ('RunIn', 3), ('RunInFailed', 3), ('Dropped', 3), ('Randomized', 4),
                                      ('FollowUp', 4), ('Completed', 5)),
             ev AS (SELECT e.data->'subject'->>'Id' AS subj, e.data->>'status' AS status, rk.r,
                           (e.data->>'eventDate')::timestamptz::date AS d
                      FROM bronze.dim_subject_statuses_staging e JOIN rk ON rk.status = e.data->>'status'
                     WHERE NOT e.is_deleted),
             s AS (SELECT s.data->'study'->>'id' AS study, s.data->>'status' AS status,
                          greatest(coalesce((SELECT max(ev.r) FROM ev WHERE ev.subj = s.data->>'id'), 0),
                                   coalesce((SELECT rk.r FROM rk WHERE rk.status = s.data->>'status'), 0)) AS stage,
                          coalesce((SELECT min(ev.d) FROM ev WHERE ev.subj = s.data->>'id' AND ev.r >= 3),
                                   (s.data->>'enrollmentDate')::timestamptz::date) AS enrolled_on,
                          EXISTS (SELECT 1 FROM ev WHERE ev.subj = s.data->>'id' AND ev.status = 'Dropped') AS dropped_ever,
                          EXISTS (SELECT 1 FROM ev WHERE ev.subj = s.data->>'id' AND ev.status = 'ScreenFailed') AS failed_ever
                     FROM bronze.dim_subjects_staging s WHERE NOT s.is_deleted)
        SELECT 'cc1:' || study AS study, count(*) AS total,
               count(*) FILTER (WHERE stage >= 4) AS randomized,
               count(*) FILTER (WHERE failed_ever OR status = 'ScreenFailed') AS screen_failed,
               count(*) FILTER (WHERE dropped_ever OR status = 'Dropped') AS dropped,
               count(*) FILTER (WHERE stage = 5) AS completed,
               count(*) FILTER (WHERE stage >= 3) AS enrolled,
               count(*) FILTER (WHERE status IN ('RunIn', 'Randomized', 'FollowUp')) AS active,
               min(enrolled_on) FILTER (WHERE stage >= 3) AS first_enrollment
          FROM s GROUP BY 1""")}
    got = {r["study_source_id"]: r for r in rows(tx, "SELECT * FROM gold.v_study_enrollment_summary")}
    assert set(got) == set(expected) == {"cc1:1", "cc1:2", "cc1:3"}
    for sid, e in expected.items():
        g = got[sid]
        assert (g["total_subjects"], g["randomized"], g["screen_failed"], g["dropped"], g["completed"],
                g["enrolled"], g["active_subjects"], g["first_enrollment_date"]) == (
            e["total"], e["randomized"], e["screen_failed"], e["dropped"], e["completed"], e["enrolled"],
            e["active"], e["first_enrollment"]), sid
        assert g["sponsor_name"] == "Acme Pharma" and g["managing_site_name"] == "Site 1"

    expected_status = {(r["study"], r["status"]): r["n"] for r in rows(tx, """
        SELECT 'cc1:' || (data->'study'->>'id') AS study, data->>'status' AS status, count(*) AS n
          FROM bronze.dim_subjects_staging WHERE NOT is_deleted GROUP BY 1, 2""")}
    got_status = {(r["study_source_id"], r["subject_status"]): r["subject_count"]
                  for r in rows(tx, "SELECT * FROM gold.v_subject_status_summary")}
    assert got_status == expected_status

    expected_mv = {r["study"]: r for r in rows(tx, """
        WITH v AS (SELECT data->'study'->>'id' AS study, data->>'id' AS id, data->>'status' AS status
                     FROM bronze.dim_patient_visits_staging WHERE NOT is_deleted),
             e AS (SELECT source_params->>'patientVisitId' AS visit FROM bronze.dim_patient_visit_elements_staging
                    WHERE NOT is_deleted AND data->>'completedOn' IS NOT NULL)
        SELECT 'cc1:' || v.study AS study, count(*) AS due,
               count(*) FILTER (WHERE v.status = 'Completed') AS done,
               sum((SELECT count(*) FROM e WHERE e.visit = v.id)) AS elements
          FROM v GROUP BY v.study""")}
    got_mv = {r["study_source_id"]: r for r in rows(tx, "SELECT * FROM gold.mv_study_performance_metrics")}
    for sid, e in expected_mv.items():
        assert (got_mv[sid]["visits_due"], got_mv[sid]["visits_completed"], got_mv[sid]["elements_completed"]) == (
            e["due"], e["done"], e["elements"]), sid


def test_late_arriving_dimensions_heal_without_bronze_change(tx) -> None:
    # subjects and visits arrive before their study, site and patient
    load(tx, "dim_subjects_staging", [subject(1, 10, site_id=3, patient_id=30, status="Randomized")])
    load(tx, "dim_patient_visits_staging", [visit(100, 1, 10, status="Completed", appointment="2025-03-10")])
    transform_all(tx)
    f = rows(tx, "SELECT * FROM silver.fact_enrollment")[0]
    assert f["subject_key"] is not None and f["study_key"] is None and f["site_key"] is None
    assert rows(tx, "SELECT study_key FROM silver.fact_visit_timelines")[0]["study_key"] is None
    assert scalar(tx, "SELECT study_key FROM silver.fact_study_performance LIMIT 1") is None

    from tests.integration.transform_support import patient

    load(tx, "dim_studies_staging", [study(10)])
    load(tx, "dim_sites_staging", [site(3)])
    load(tx, "dim_patients_staging", [patient(30)])
    transform_all(tx)
    f = rows(tx, "SELECT * FROM silver.fact_enrollment")[0]
    assert None not in (f["study_key"], f["site_key"], f["patient_key"])
    v = rows(tx, "SELECT * FROM silver.fact_visit_timelines")[0]
    assert None not in (v["study_key"], v["site_key"], v["patient_key"])
    assert scalar(tx, "SELECT count(*) FROM silver.fact_study_performance WHERE study_key IS NULL") == 0
    # nothing left to heal: the next run touches nothing
    assert call(tx, "silver.load_all_new_facts") == (0, 0, 0, 0)


def test_two_element_feeds_latest_wins(tx) -> None:
    seed_small(tx, studies=1, subjects_per_study=1)  # visit cc1:1001, element cc1:5001 via job 24
    transform_all(tx)
    assert rows(tx, "SELECT completed_date_key FROM silver.fact_element_completions") == [{"completed_date_key": 20250312}]

    # job 166 delivers the same element, later and with a corrected completion time
    load(tx, "dim_visit_elements_staging", [element(5001, completed=ts("2025-03-13", "08:00:00"))],
         params={"patientVisitId": 1001})
    transform_all(tx)
    got = rows(tx, "SELECT * FROM silver.fact_element_completions")
    assert len(got) == 1 and got[0]["completed_date_key"] == 20250313 and got[0]["days_from_visit_target"] == 3
    # an element that is not completed is no completion
    load(tx, "dim_visit_elements_staging", [element(5002, completed=None)], params={"patientVisitId": 1001})
    # the completion is withdrawn in the newest feed: the fact goes
    load(tx, "dim_patient_visit_elements_staging", [element(5001, completed=None)], params={"patientVisitId": 1001})
    transform_all(tx)
    assert scalar(tx, "SELECT count(*) FROM silver.fact_element_completions") == 0
    assert_performance_exact(tx)


def test_visit_change_reaches_its_elements_and_performance(tx) -> None:
    seed_small(tx, studies=1, subjects_per_study=2)
    transform_all(tx)
    assert scalar(tx, "SELECT days_from_visit_target FROM silver.fact_element_completions") == 2
    # the visit's target date moves: the element's offset follows without an element change
    load(tx, "dim_patient_visits_staging",
         [visit(1001, 1, 1, status="Completed", appointment="2025-03-12", target="2025-03-11",
                min_due="2025-03-09", max_due="2025-03-14")], params={"studyId": 1, "subjectId": 1})
    transform_all(tx)
    assert scalar(tx, "SELECT days_from_visit_target FROM silver.fact_element_completions") == 1
    assert_performance_exact(tx)
    # deleting the other visit removes its fact and its due day
    delete(tx, "dim_patient_visits_staging", ["cc1:1002"])
    before = scalar(tx, "SELECT visits_due FROM gold.mv_study_performance_metrics WHERE study_source_id = 'cc1:1'")
    transform_all(tx)
    assert scalar(tx, "SELECT count(*) FROM silver.fact_visit_timelines") == 1
    assert scalar(tx, "SELECT visits_due FROM gold.mv_study_performance_metrics WHERE study_source_id = 'cc1:1'") \
        == before - 1
    assert_performance_exact(tx)


def test_incremental_performance_equals_recompute_after_many_changes(tx) -> None:
    seed_small(tx, studies=3, subjects_per_study=4)
    transform_all(tx)
    assert_performance_exact(tx)
    # status changes move milestones between days; visits complete; a subject disappears
    load(tx, "dim_subjects_staging", [subject(2, 1, status="Completed", enrollment="2025-02-05T00:00:00Z")])
    from tests.integration.transform_support import status_event, status_key

    load(tx, "dim_subject_statuses_staging", [status_event(2, "Completed", "2025-04-01")], key=status_key)
    load(tx, "dim_patient_visits_staging", [visit(1002, 2, 1, status="Completed", appointment="2025-03-20")],
         params={"studyId": 1, "subjectId": 2})
    delete(tx, "dim_subjects_staging", ["cc1:5"])
    transform_all(tx)
    assert scalar(tx, "SELECT count(*) FROM silver.fact_enrollment WHERE source_id = 'cc1:5'") == 0
    assert_performance_exact(tx)
    assert scalar(tx, "SELECT count(*) FROM etl.dw_transform_dirty_study_days") == 0


def test_parsing_helpers_turn_bad_values_into_null_not_errors(tx) -> None:
    tx.execute("SET TimeZone = 'America/New_York'")  # the session zone must not shift UTC dates
    got = rows(tx, """SELECT etl.to_date('2025-12-01T23:30:52.000Z') AS z, etl.to_date('2025-12-01T23:30:00-05:00') AS off,
                             etl.to_date('2025-12-01') AS d, etl.to_date('2025-02-30T00:00:00Z') AS bad,
                             etl.to_ts('not a date') AS junk, etl.to_int('12') AS i, etl.to_int('1.5') AS f,
                             etl.to_bool('TRUE') AS b, etl.date_key('2025-03-04') AS k""")[0]
    import datetime as dt

    assert got == {"z": dt.date(2025, 12, 1), "off": dt.date(2025, 12, 2), "d": dt.date(2025, 12, 1), "bad": None,
                   "junk": None, "i": 12, "f": None, "b": True, "k": 20250304}
    # a record with malformed values still loads; the values become NULL
    load(tx, "dim_studies_staging", [study(1, createdOn="yesterday-ish", launchYear="MMXX")])
    assert call(tx, "silver.load_dim_studies") == (1, 0, 0, 0)
    s = rows(tx, "SELECT created_on, launch_year FROM silver.dim_studies")[0]
    assert s == {"created_on": None, "launch_year": None}


def test_a_new_study_version_repoints_its_facts_and_a_full_rerun_changes_nothing(tx) -> None:
    seed_small(tx, studies=2, subjects_per_study=2)
    transform_all(tx)
    load(tx, "dim_studies_staging", [study(1, status="Closed", lastUpdatedOn=ts("2025-05-01"))])
    transform_all(tx)
    new_key = scalar(tx, "SELECT study_key FROM silver.dim_studies WHERE source_id = 'cc1:1' AND is_current")
    for t in ("fact_enrollment", "fact_visit_timelines", "fact_element_completions", "fact_study_performance"):
        keys = {r["study_key"] for r in rows(tx, f"SELECT DISTINCT study_key FROM silver.{t} WHERE study_source_id = 'cc1:1'")}
        assert keys == {new_key}, t
    # Silver depends on Bronze and the dimension history only: re-reading everything changes nothing
    snapshot = {t: rows(tx, f"SELECT * FROM silver.{t} ORDER BY 1") for t in
                ("dim_studies", "fact_enrollment", "fact_visit_timelines", "fact_element_completions",
                 "fact_study_performance")}
    tx.execute("SELECT etl.reset_transform_watermarks()")
    assert call(tx, "silver.load_all_new_dimensions") == (0, 0, 0, 0)
    assert call(tx, "silver.load_all_new_facts") == (0, 0, 0, 0)
    for t, before in snapshot.items():
        assert rows(tx, f"SELECT * FROM silver.{t} ORDER BY 1") == before, t


def test_gold_refresh_is_skipped_when_nothing_it_reads_changed(tx) -> None:
    tx.execute("SET trialsync.watermark_margin = '0 seconds'")
    seed_small(tx, studies=2, subjects_per_study=1)
    transform_all(tx)
    assert call(tx, "gold.refresh_mv_study_performance_metrics") == (0, 0, 0, 0)  # nothing changed: skipped
    load(tx, "dim_staff_staging", [staff(9)])
    transform_all(tx)  # a staff change reaches no fact and not the view
    assert call(tx, "gold.refresh_mv_study_performance_metrics") == (0, 0, 0, 0)
    load(tx, "dim_studies_staging", [study(2, name="Renamed", lastUpdatedOn=ts("2025-05-05"))])
    call(tx, "silver.load_dim_studies")
    assert call(tx, "gold.refresh_mv_study_performance_metrics") == (0, 2, 0, 0)  # refreshed: 2 rows
    assert rows(tx, "SELECT study_name FROM gold.mv_study_performance_metrics WHERE study_source_id = 'cc1:2'") == [
        {"study_name": "Renamed"}]
