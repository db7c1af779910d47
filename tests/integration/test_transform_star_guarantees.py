"""The new tables keep the star's guarantees on hand-made Bronze: late-arriving dimensions heal
without a Bronze change, facts follow the current SCD2 version, soft deletes remove facts and close
Type-2 versions, and a second run changes nothing."""

from __future__ import annotations

import pytest

from tests.integration.transform_support import (
    appointment,
    arm,
    call,
    delete,
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    load,
    milestone,
    patient,
    payment,
    personnel,
    query,
    rows,
    scalar,
    site,
    staff,
    status_event,
    status_key,
    study,
    subject,
    transform_all,
    ts,
    visit,
)

pytestmark = pytest.mark.integration
FACTS = ("fact_appointments", "fact_monitor_queries", "fact_study_milestones", "fact_patient_payments")


def changed_by_second_run(tx) -> dict[str, tuple[int, ...]]:
    procs = [r["procedure_name"] for r in rows(tx, "SELECT procedure_name FROM etl.dw_transform_procedures "
                                                    "WHERE is_active ORDER BY run_order")]
    out = {}
    for p in procs:
        counts = call(tx, p)
        if not p.startswith("gold.refresh_mv_") and any(counts):
            out[p] = counts
    return out


def test_late_dimensions_heal_facts_follow_versions_and_deletes_remove(tx) -> None:
    # no safety margin on the watermark: a run re-reads nothing the previous one already read, so each
    # step below is carried by the dependency it tests, not by a re-read of recent rows
    tx.execute("SET trialsync.watermark_margin = '0 seconds'")
    # facts first: their study, subject, site, patient, monitor and staff are not loaded yet
    load(tx, "dim_subjects_staging", [subject(1, 10, site_id=3, patient_id=30, status="Screened")])
    load(tx, "dim_patient_visits_staging", [visit(100, 1, 10, status="Completed", appointment="2025-03-10")],
         params={"studyId": 10, "subjectId": 1})
    load(tx, "dim_appointments_staging", [appointment(100, 10, 3, 30, 100, "2025-03-10")])
    load(tx, "dim_queries_staging", [query(500, 10, opened="2025-03-01")], params={"studyId": 10})
    load(tx, "fact_study_milestones_staging", [milestone(600, projected="2025-02-01", done="2025-02-10")],
         params={"studyId": 10})
    load(tx, "dim_patient_visit_stipends_staging", [payment(700, 100, 1, "2025-03-11")], params={"patientVisitId": 100})
    transform_all(tx)
    a = rows(tx, "SELECT * FROM silver.fact_appointments")[0]
    assert a["patient_visit_source_id"] == "cc1:100" and a["subject_source_id"] == "cc1:1"
    assert (a["study_key"], a["site_key"], a["patient_key"], a["study_visit_key"]) == (None,) * 4
    assert a["subject_key"] is not None
    assert rows(tx, "SELECT study_key, monitor_key, staff_key FROM silver.fact_monitor_queries") == [
        {"study_key": None, "monitor_key": None, "staff_key": None}]
    assert scalar(tx, "SELECT count(*) FROM silver.fact_patient_payments WHERE study_key IS NULL AND site_key IS NULL") == 1
    assert scalar(tx, "SELECT count(*) FROM silver.fact_study_milestones WHERE study_key IS NULL") == 1

    # the dimensions arrive; no fact source changes, yet every key resolves
    load(tx, "dim_studies_staging", [study(10)])
    load(tx, "dim_sites_staging", [site(3)])
    load(tx, "dim_patients_staging", [patient(30)])
    load(tx, "dim_staff_staging", [staff(1)])
    load(tx, "dim_monitors_staging", [{"id": 1, "displayName": "Mo", "modifiedDate": ts("2024-01-01")}])
    load(tx, "dim_visits_staging", [{"id": 100, "study": {"id": 10}, "name": "Visit 0",
                                      "modifiedDate": ts("2024-01-01")}], params={"studyId": 10})
    transform_all(tx)
    from consumers.quality import run_quality_checks

    results = run_quality_checks(tx, names=[f"{f}_unresolved_keys" for f in FACTS])
    assert {r.check.name: r.status for r in results} == {f"{f}_unresolved_keys": "pass" for f in FACTS}
    assert scalar(tx, """SELECT count(*) FROM silver.fact_appointments
                          WHERE study_key IS NULL OR site_key IS NULL OR patient_key IS NULL OR subject_key IS NULL
                             OR study_visit_key IS NULL""") == 0
    assert scalar(tx, "SELECT count(*) FROM silver.fact_monitor_queries WHERE study_key IS NULL OR monitor_key IS NULL "
                      "OR staff_key IS NULL") == 0
    assert scalar(tx, "SELECT count(*) FROM silver.fact_patient_payments WHERE study_key IS NULL OR site_key IS NULL "
                      "OR patient_key IS NULL OR subject_key IS NULL") == 0
    assert scalar(tx, "SELECT count(*) FROM silver.fact_study_milestones WHERE study_key IS NULL OR staff_key IS NULL") == 0
    assert changed_by_second_run(tx) == {}

    # the subject enrolls and the study changes: facts point at the new current versions
    load(tx, "dim_subject_statuses_staging", [status_event(1, "Screened", "2025-01-15"),
                                              status_event(1, "Randomized", "2025-02-01")], key=status_key)
    load(tx, "dim_subjects_staging", [subject(1, 10, site_id=3, patient_id=30, status="Randomized",
                                              enrollment="2025-02-01T00:00:00Z", modified=ts("2025-02-01", "10:00:00"))])
    transform_all(tx)
    cur_subject = scalar(tx, "SELECT subject_key FROM silver.dim_subjects WHERE source_id = 'cc1:1' AND is_current")
    assert scalar(tx, "SELECT count(*) FROM silver.dim_subjects WHERE source_id = 'cc1:1'") == 2
    assert scalar(tx, "SELECT subject_key FROM silver.fact_appointments") == cur_subject
    assert scalar(tx, "SELECT subject_key FROM silver.fact_patient_payments") == cur_subject
    load(tx, "dim_studies_staging", [study(10, status="Closed", lastUpdatedOn=ts("2025-04-01"))])
    transform_all(tx)
    cur_study = scalar(tx, "SELECT study_key FROM silver.dim_studies WHERE source_id = 'cc1:10' AND is_current")
    assert rows(tx, "SELECT subject_key, study_key FROM silver.fact_appointments") == [
        {"subject_key": cur_subject, "study_key": cur_study}]
    assert rows(tx, "SELECT subject_key, study_key FROM silver.fact_patient_payments") == [
        {"subject_key": cur_subject, "study_key": cur_study}]
    assert scalar(tx, "SELECT study_key FROM silver.fact_monitor_queries") == cur_study
    assert scalar(tx, "SELECT study_key FROM silver.fact_study_milestones") == cur_study
    f = rows(tx, "SELECT is_enrolled, is_active, enrollment_date, current_status FROM silver.fact_enrollment")[0]
    assert (f["is_enrolled"], f["is_active"], str(f["enrollment_date"]), f["current_status"]) == (
        True, True, "2025-02-01", "Randomized")
    assert scalar(tx, "SELECT is_expected FROM silver.fact_visit_timelines") is True

    # Type-2 arms and role holders: a change opens one version, a deletion a deleted current version
    load(tx, "dim_study_arms_staging", [arm(7, name="Arm A")], key=lambda r: f"10|{r['Id']}", params={"studyId": 10})
    load(tx, "dim_study_personnel_staging", [personnel(1, staff_id=1)], key=lambda r: f"10|{r['Role']['Id']}",
         params={"studyId": 10})
    transform_all(tx)
    load(tx, "dim_study_personnel_staging", [personnel(1, staff_id=2, modified="2025-05-01")],
         key=lambda r: f"10|{r['Role']['Id']}", params={"studyId": 10})
    transform_all(tx)
    v = rows(tx, "SELECT staff_source_id, is_current, effective_start_date, effective_end_date "
                 "FROM silver.dim_study_staff_assignments ORDER BY assignment_key")
    assert [x["staff_source_id"] for x in v] == ["cc1:1", "cc1:2"] and [x["is_current"] for x in v] == [False, True]
    assert v[0]["effective_end_date"] == v[1]["effective_start_date"]
    delete(tx, "dim_study_arms_staging", ["cc1:10|7"])
    # deletes: the facts go, the arm keeps its history with a deleted current version
    for table, sid in (("dim_appointments_staging", "cc1:100"), ("dim_queries_staging", "cc1:500"),
                       ("fact_study_milestones_staging", "cc1:600"), ("dim_patient_visit_stipends_staging", "cc1:700")):
        assert delete(tx, table, [sid]) == 1
    transform_all(tx)
    for f in FACTS:
        assert scalar(tx, f"SELECT count(*) FROM silver.{f}") == 0, f  # noqa: S608
    assert rows(tx, "SELECT is_current, is_deleted FROM silver.dim_study_arms ORDER BY study_arm_key") == [
        {"is_current": False, "is_deleted": False}, {"is_current": True, "is_deleted": True}]
    # the visit lost its completed appointment record: it is still completed, now undated
    assert rows(tx, "SELECT is_completed, actual_date FROM silver.fact_visit_timelines") == [
        {"is_completed": True, "actual_date": None}]
    assert changed_by_second_run(tx) == {}
