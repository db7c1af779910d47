"""Type-2 history of dim_studies / dim_subjects and Type-1 overwrite of the other dimensions,
against the real PostgreSQL with Bronze rows written the way the loader writes them."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from tests.integration.transform_support import (
    call,
    delete,
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    load,
    patient,
    rows,
    scalar,
    site,
    staff,
    study,
    subject,
    transform_all,
    ts,
)

pytestmark = pytest.mark.integration

END_OF_TIME = datetime(9999, 12, 31, tzinfo=UTC)


def versions(conn, table: str, source_id: str) -> list[dict]:
    key = "study_key" if table == "dim_studies" else "subject_key"
    return rows(conn, f"SELECT * FROM silver.{table} WHERE source_id = %s ORDER BY {key}", source_id)


def test_changed_study_status_opens_exactly_one_version(tx) -> None:
    load(tx, "dim_studies_staging", [study(1), study(2)])
    assert call(tx, "silver.load_dim_studies") == (2, 0, 0, 0)

    load(tx, "dim_studies_staging", [study(1, status="Closed", lastUpdatedOn=ts("2025-03-01", "12:30:00"))])
    assert call(tx, "silver.load_dim_studies") == (1, 0, 1, 0)

    v = versions(tx, "dim_studies", "cc1:1")
    assert [x["study_status"] for x in v] == ["Enrolling", "Closed"]
    old, new = v
    changed_at = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)
    assert old["effective_start_date"] == datetime(2024, 1, 1, tzinfo=UTC)  # createdOn
    assert old["effective_end_date"] == changed_at and not old["is_current"]
    assert new["effective_start_date"] == changed_at and new["is_current"]
    assert new["effective_end_date"] == END_OF_TIME
    # the untouched study keeps its single version
    assert len(versions(tx, "dim_studies", "cc1:2")) == 1
    assert scalar(tx, "SELECT count(*) FROM (SELECT source_id FROM silver.dim_studies WHERE is_current "
                      "GROUP BY source_id HAVING count(*) > 1) d") == 0

    # re-running changes nothing, also after the watermark overlap re-reads the same Bronze rows
    before = rows(tx, "SELECT * FROM silver.dim_studies ORDER BY study_key")
    assert call(tx, "silver.load_dim_studies") == (0, 0, 0, 0)
    tx.execute("SELECT etl.reset_transform_watermarks('silver.load_dim_studies')")
    assert call(tx, "silver.load_dim_studies") == (0, 0, 0, 0)
    assert rows(tx, "SELECT * FROM silver.dim_studies ORDER BY study_key") == before


def test_unchanged_record_or_timestamp_only_change_opens_no_version(tx) -> None:
    load(tx, "dim_studies_staging", [study(1)])
    call(tx, "silver.load_dim_studies")
    # the same record extracted again by the other job (164) or a replay: identical data
    load(tx, "dim_studies_staging", [study(1)])
    tx.execute("UPDATE bronze.dim_studies_staging SET updated_at = now()")  # forced re-read
    assert call(tx, "silver.load_dim_studies") == (0, 0, 0, 0)
    # only lastUpdatedOn moved: no tracked attribute changed -> the version stays, its timestamp follows
    load(tx, "dim_studies_staging", [study(1, lastUpdatedOn=ts("2025-05-05"))])
    assert call(tx, "silver.load_dim_studies") == (0, 1, 0, 0)
    v = versions(tx, "dim_studies", "cc1:1")
    assert len(v) == 1 and v[0]["source_modified_at"] == datetime(2025, 5, 5, tzinfo=UTC)


def test_several_changes_keep_history_contiguous(tx) -> None:
    load(tx, "dim_studies_staging", [study(1)])
    call(tx, "silver.load_dim_studies")
    for day, status in (("2025-01-10", "Active"), ("2025-02-10", "On Hold"), ("2025-03-10", "Closed")):
        load(tx, "dim_studies_staging", [study(1, status=status, lastUpdatedOn=ts(day))])
        call(tx, "silver.load_dim_studies")
    v = versions(tx, "dim_studies", "cc1:1")
    assert [x["study_status"] for x in v] == ["Enrolling", "Active", "On Hold", "Closed"]
    for a, b in zip(v, v[1:], strict=False):
        assert a["effective_end_date"] == b["effective_start_date"]
    assert [x["is_current"] for x in v] == [False, False, False, True]


def test_source_timestamp_not_advancing_falls_back_to_load_time(tx) -> None:
    load(tx, "dim_studies_staging", [study(1)])
    call(tx, "silver.load_dim_studies")
    # the source changed the status but not lastUpdatedOn: the version starts when Bronze got it
    load(tx, "dim_studies_staging", [study(1, status="Closed")])
    loaded_at = scalar(tx, "SELECT updated_at FROM bronze.dim_studies_staging WHERE source_id = 'cc1:1'")
    call(tx, "silver.load_dim_studies")
    old, new = versions(tx, "dim_studies", "cc1:1")
    assert old["effective_end_date"] == new["effective_start_date"] == loaded_at


def test_soft_delete_and_reappearance(tx) -> None:
    load(tx, "dim_studies_staging", [study(1), study(2)])
    call(tx, "silver.load_dim_studies")
    delete(tx, "dim_studies_staging", ["cc1:1"])
    deleted_at = scalar(tx, "SELECT deleted_at FROM bronze.dim_studies_staging WHERE source_id = 'cc1:1'")
    assert call(tx, "silver.load_dim_studies") == (1, 0, 1, 0)
    live, gone = versions(tx, "dim_studies", "cc1:1")
    assert live["effective_end_date"] == deleted_at and not live["is_current"] and not live["is_deleted"]
    assert gone["is_current"] and gone["is_deleted"] and gone["effective_start_date"] == deleted_at
    # current-state gold views drop it; history keeps it
    assert scalar(tx, "SELECT count(*) FROM gold.v_study_enrollment_summary") == 1
    assert call(tx, "silver.load_dim_studies") == (0, 0, 0, 0)
    # the record comes back
    load(tx, "dim_studies_staging", [study(1, lastUpdatedOn=ts("2030-01-01"))])
    assert call(tx, "silver.load_dim_studies") == (1, 0, 1, 0)
    v = versions(tx, "dim_studies", "cc1:1")
    assert [(x["is_deleted"], x["is_current"]) for x in v] == [(False, False), (True, False), (False, True)]
    assert v[1]["effective_end_date"] == v[2]["effective_start_date"]


def test_subject_status_change_is_one_new_version(tx) -> None:
    load(tx, "dim_subjects_staging", [subject(1, 10, status="Screened", modified=ts("2025-01-01")),
                                      subject(2, 10, status="Screened", modified=ts("2025-01-01"))])
    assert call(tx, "silver.load_dim_subjects") == (2, 0, 0, 0)
    load(tx, "dim_subjects_staging", [subject(1, 10, status="Randomized", modified=ts("2025-02-03", "08:00:00"),
                                              enrollment=ts("2025-02-03"))])
    assert call(tx, "silver.load_dim_subjects") == (1, 0, 1, 0)
    old, new = versions(tx, "dim_subjects", "cc1:1")
    assert (old["subject_status"], new["subject_status"]) == ("Screened", "Randomized")
    assert old["effective_end_date"] == new["effective_start_date"] == datetime(2025, 2, 3, 8, tzinfo=UTC)
    assert new["enrollment_date"].isoformat() == "2025-02-03"
    assert call(tx, "silver.load_dim_subjects") == (0, 0, 0, 0)
    assert scalar(tx, "SELECT count(*) FROM silver.dim_subjects WHERE is_current") == 2


def test_type1_dimensions_overwrite_and_flag_deletes(tx) -> None:
    load(tx, "dim_sites_staging", [site(1), site(2)])
    load(tx, "dim_staff_staging", [staff(1)])
    assert call(tx, "silver.load_dim_sites") == (2, 0, 0, 0)
    assert call(tx, "silver.load_dim_staff") == (1, 0, 0, 0)
    load(tx, "dim_sites_staging", [site(1, name="Site One", modifiedDate=ts("2025-01-01"))])
    delete(tx, "dim_sites_staging", ["cc1:2"])
    assert call(tx, "silver.load_dim_sites") == (0, 1, 1, 0)
    got = {r["source_id"]: r for r in rows(tx, "SELECT * FROM silver.dim_sites")}
    assert got["cc1:1"]["site_name"] == "Site One" and got["cc1:1"]["site_key"] == 1
    assert got["cc1:2"]["is_deleted"] and got["cc1:2"]["deleted_at"] is not None
    assert call(tx, "silver.load_dim_sites") == (0, 0, 0, 0)
    st = rows(tx, "SELECT * FROM silver.dim_staff")[0]
    assert st["role_names"] == ["Investigator"] and st["is_investigator"] and st["site_count"] == 1


def test_patients_are_pseudonymous(tx) -> None:
    load(tx, "dim_patients_staging", [patient(7), patient(8, dateOfBirth="1920-01-01T00:00:00")])
    load(tx, "dim_subjects_staging", [subject(70, 1, patient_id=7)])
    call(tx, "silver.load_dim_patients")
    call(tx, "silver.load_dim_subjects")
    dump = " ".join(str(r) for r in rows(tx, "SELECT * FROM silver.dim_patients"))
    dump += " ".join(str(r) for r in rows(tx, "SELECT * FROM silver.dim_subjects"))
    for phi in ("Doe7", "Jane", "123-45-0007", "MRN7", "1 Main St", "73301", "jane7@", "1980-05-05", "free text"):
        assert phi not in dump
    p7 = rows(tx, "SELECT * FROM silver.dim_patients WHERE patient_ref = etl.pseudonymize('cc1:7')")[0]
    assert p7["birth_year"] == 1980 and p7["gender_code"] == "F" and p7["primary_site_source_id"] == "cc1:1"
    # a keyed hash: not the id, not the plain (enumerable) hash of the id
    assert len(p7["patient_ref"]) == 64 and p7["patient_ref"] != hashlib.sha256(b"cc1:7").hexdigest()
    p8 = rows(tx, "SELECT * FROM silver.dim_patients WHERE patient_ref = etl.pseudonymize('cc1:8')")[0]
    assert p8["birth_year"] is None and p8["is_age_top_coded"]
    # the subject links to the same pseudonym
    assert scalar(tx, "SELECT patient_ref FROM silver.dim_subjects WHERE source_id = 'cc1:70'") == p7["patient_ref"]
    # the analytics role cannot read the key that would reverse the pseudonyms
    tx.execute("BEGIN")
    try:
        tx.execute("SET LOCAL ROLE trialsync_analytics")
        with pytest.raises(Exception, match="permission denied"):
            tx.execute("SELECT secret FROM etl.dw_pseudonym_secret")
    finally:
        tx.execute("ROLLBACK")


def test_full_transform_twice_changes_nothing(tx) -> None:
    from tests.integration.transform_support import seed_small

    seed_small(tx)
    transform_all(tx)
    snapshot = {t: rows(tx, f"SELECT * FROM silver.{t} ORDER BY 1")
                for t in ("dim_studies", "dim_subjects", "dim_sites", "dim_patients", "fact_enrollment",
                          "fact_visit_timelines", "fact_element_completions", "fact_study_performance")}
    tx.execute("SELECT etl.reset_transform_watermarks()")
    assert call(tx, "silver.load_all_new_dimensions") == (0, 0, 0, 0)
    assert call(tx, "silver.load_all_new_facts") == (0, 0, 0, 0)
    for t, before in snapshot.items():
        assert rows(tx, f"SELECT * FROM silver.{t} ORDER BY 1") == before, t
