"""Shared fixtures and helpers of the transform tests (tests/integration/test_transform_*.py).

Test modules import the fixtures ``fixture_tx_dsn`` / ``fixture_tx`` / ``fixture_tx_settings``; pytest
registers them under their ``name`` (``tx_dsn``, ``tx``, ``tx_settings``).

Each test module gets its own database, cloned from a template migrated once per process, so the
Bronze rows a test writes never meet another module's (or another area's) rows. Bronze rows are
written the way the loader writes them (consumers/staging_writer.py): upsert on source_id,
``updated_at = now()`` only when the content changed, tombstones set ``is_deleted``.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from common import config
from common.config import Settings, load_settings

_TEMPLATE_LOCK = threading.Lock()
_TEMPLATE: dict[str, str] = {}


def _admin_dsn(base: str) -> str:
    return base.rsplit("/", 1)[0] + "/postgres"


def _template(base: str) -> str:
    """A migrated template database, created once per process."""
    with _TEMPLATE_LOCK:
        if base in _TEMPLATE:
            return _TEMPLATE[base]
        from common.db import migrate

        name = f"tx_tmpl_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(_admin_dsn(base), autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dsn = base.rsplit("/", 1)[0] + "/" + name
        settings = load_settings(database_url=dsn)
        migrate(settings)
        from common.catalog import load_catalog, sync

        sync(load_catalog(settings), settings)
        _TEMPLATE[base] = name
        return name


def clone_database(base: str) -> tuple[str, str]:
    tmpl = _template(base)
    name = f"tx_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_admin_dsn(base), autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(tmpl)))
    return name, base.rsplit("/", 1)[0] + "/" + name


def drop_database(base: str, name: str) -> None:
    with psycopg.connect(_admin_dsn(base), autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module", name="tx_dsn")
def fixture_tx_dsn(stack: dict[str, str]) -> Iterator[str]:
    """A migrated database of this module's own; DATABASE_URL points at it while the module runs."""
    name, dsn = clone_database(stack["dsn"])
    old = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = dsn
    config.reset_settings()
    try:
        yield dsn
    finally:
        if old is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = old
        config.reset_settings()
        drop_database(stack["dsn"], name)


@pytest.fixture(name="tx_settings")
def fixture_tx_settings(tx_dsn: str) -> Settings:
    return load_settings(database_url=tx_dsn, enable_metrics=False)


@pytest.fixture(name="tx")
def fixture_tx(tx_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the module database, with Bronze/Silver emptied first."""
    from common.db import connect

    conn = connect(load_settings(database_url=tx_dsn), autocommit=True)
    reset_warehouse(conn)
    try:
        yield conn
    finally:
        conn.close()


SILVER_TABLES = ("dim_sites", "dim_sponsors", "dim_staff", "dim_patients", "dim_studies", "dim_subjects",
                 "dim_study_visits", "dim_elements", "dim_rooms", "dim_monitors", "dim_study_arms",
                 "dim_study_staff_assignments", "fact_enrollment", "fact_visit_timelines", "fact_element_completions",
                 "fact_study_performance", "fact_appointments", "fact_monitor_queries", "fact_study_milestones",
                 "fact_patient_payments", "bridge_visit_appointments")
BRONZE_TABLES = ("dim_sites_staging", "dim_sponsors_staging", "dim_staff_staging", "dim_patients_staging",
                 "dim_studies_staging", "dim_subjects_staging", "dim_subject_statuses_staging",
                 "dim_patient_visits_staging", "dim_patient_visit_elements_staging", "dim_visit_elements_staging",
                 "dim_system_study_statuses_staging", "dim_visits_staging", "dim_elements_staging", "dim_rooms_staging",
                 "dim_monitors_staging", "dim_study_arms_staging", "dim_study_visit_arms_staging",
                 "dim_study_personnel_staging", "dim_appointments_staging", "dim_queries_staging",
                 "fact_study_milestones_staging", "dim_patient_visit_stipends_staging", "dim_patient_payments_staging")
GOLD_MVS = ("mv_study_performance_metrics", "mv_visit_compliance")


def reset_warehouse(conn: psycopg.Connection) -> None:
    """Empty Bronze, Silver and the transform bookkeeping (dim_date stays)."""
    conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(sql.SQL(", ").join(
        [sql.Identifier("silver", t) for t in SILVER_TABLES] + [sql.Identifier("bronze", t) for t in BRONZE_TABLES]
        + [sql.Identifier("etl", t) for t in ("dw_transform_watermarks", "dw_transform_runs", "dw_quality_results",
                                              "dw_transform_dirty_study_days", "dw_transform_changes",
                                              "dw_data_clock")])))
    for mv in GOLD_MVS:
        conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(sql.Identifier("gold", mv)))


# -- Bronze writes, loader style ---------------------------------------------------------------------

def load(conn: psycopg.Connection, table: str, records: Iterable[dict[str, Any]], *,
         key: str | Callable[[dict[str, Any]], str] = "id", instance: str = "cc1",
         params: dict[str, Any] | None = None) -> int:
    """Upsert records into bronze.<table> like the loader; returns rows changed. ``params`` (the parent
    parameters of a parameterized job) go to source_params, the loader's lineage column."""
    keyfn = key if callable(key) else (lambda r: str(r[key]))  # type: ignore[index]
    cols = ["data", "source_id", "source_instance_id"] + (["source_params"] if params is not None else [])
    q = sql.SQL(
        "INSERT INTO {t} AS s ({cols}) VALUES (%s::jsonb, %s, %s{p}) "
        "ON CONFLICT (source_id) DO UPDATE SET data = excluded.data{pset}, "
        "is_deleted = false, deleted_at = NULL, loaded_at = now(), updated_at = now() "
        "WHERE s.data IS DISTINCT FROM excluded.data OR s.is_deleted").format(
            t=sql.Identifier("bronze", table), cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
            p=sql.SQL(", %s::jsonb" if params is not None else ""),
            pset=sql.SQL(", source_params = excluded.source_params" if params is not None else ""))
    n = 0
    with conn.cursor() as cur:
        for r in records:
            row: tuple[Any, ...] = (orjson.dumps(r).decode(), f"{instance}:{keyfn(r)}", instance)
            if params is not None:
                row += (orjson.dumps(params).decode(),)
            cur.execute(q, row)
            n += cur.rowcount
    return n


def delete(conn: psycopg.Connection, table: str, source_ids: Iterable[str]) -> int:
    """Tombstones, loader style."""
    cur = conn.execute(sql.SQL("UPDATE {} SET is_deleted = true, deleted_at = now(), updated_at = now() "
                               "WHERE source_id = ANY(%s) AND NOT is_deleted").format(sql.Identifier("bronze", table)),
                       (list(source_ids),))
    return cur.rowcount


def call(conn: psycopg.Connection, procedure: str) -> tuple[int, int, int, int]:
    schema, name = procedure.split(".")
    row = conn.execute(sql.SQL("CALL {}.{}()").format(sql.Identifier(schema), sql.Identifier(name))).fetchone()
    return tuple(int(x) for x in row)  # type: ignore[return-value, union-attr]


def transform_all(conn: psycopg.Connection) -> None:
    call(conn, "silver.load_all_new_dimensions")
    call(conn, "silver.load_all_new_facts")


def rows(conn: psycopg.Connection, query: str, *params: Any) -> list[dict[str, Any]]:
    cur = conn.execute(query, params or None)  # type: ignore[arg-type]
    cols = [d.name for d in cur.description]  # type: ignore[union-attr]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def scalar(conn: psycopg.Connection, query: str, *params: Any) -> Any:
    return conn.execute(query, params or None).fetchone()[0]  # type: ignore[arg-type, index]


# -- record builders (shapes of the CC spec definitions, as the simulator serves them) ----------------

def ts(day: str, time: str = "00:00:00") -> str:
    return f"{day}T{time}.000Z"


def site(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": i, "uid": f"site-{i}", "name": f"Site {i}", "active": True, "city": "Austin", "state": "TX",
            "country": "US", "primaryPhone": "555-0100", "primaryEmail": f"site{i}@example.org",
            "createdOn": ts("2020-01-01"), "modifiedDate": ts("2024-01-01"), **kw}


def sponsor(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": i, "name": f"Sponsor {i}", "sponsorDivisions": [{"id": i * 10, "name": "Oncology"}],
            "primaryEmail": f"s{i}@pharma.example", "modifiedDate": ts("2024-01-01"), **kw}


def staff(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": i, "uid": f"staff-{i}", "displayName": f"Dr {i}", "firstName": "Ann", "lastName": f"Lee{i}",
            "email": f"staff{i}@example.org", "login": f"staff{i}", "isStatusActive": True, "profession": "MD",
            "isStaffExternal": False,
            "staffRoles": [{"siteId": 1, "roleName": "Investigator", "principalInvestigator": True}],
            "modifiedOn": ts("2024-01-01"), **kw}


def patient(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": i, "firstName": "Jane", "lastName": f"Doe{i}", "ssn": f"123-45-{i:04d}", "mrn": f"MRN{i}",
            "primaryEmail": {"address": f"jane{i}@example.org"}, "address1": "1 Main St", "zip": "73301",
            "dateOfBirth": "1980-05-05T00:00:00", "genderCode": "F", "race": "White", "ethnicity": "NotHispanic",
            "status": "Active", "state": "TX", "country": "US", "primarySite": {"id": 1, "name": "Site 1"},
            "modifiedDate": ts("2024-01-01"), **kw}


def study(i: int, **kw: Any) -> dict[str, Any]:
    return {"id": i, "uid": f"study-{i}", "name": f"Study {i}", "title": f"A trial {i}", "status": "Enrolling",
            "phase": "II", "protocolNumber": f"P-{i}", "sponsor": {"id": 1, "name": "Sponsor 1"},
            "managingSite": {"id": 1, "name": "Site 1"}, "createdOn": ts("2024-01-01"),
            "lastUpdatedOn": ts("2024-06-01"), **kw}


def subject(i: int, study_id: int, *, site_id: int = 1, patient_id: int | None = None, status: str = "Screened",
            enrollment: str | None = None, modified: str | None = None, **kw: Any) -> dict[str, Any]:
    pid = patient_id if patient_id is not None else i
    return {"id": i, "uid": f"subject-{i}", "study": {"id": study_id, "name": f"Study {study_id}"},
            "site": {"id": site_id, "name": f"Site {site_id}"},
            "patient": {"id": pid, "firstName": "Jane", "lastName": f"Doe{pid}", "dateOfBirth": "1980-05-05T00:00:00"},
            "status": status, "genderCode": "F", "enrollmentDate": enrollment,
            "narrative": "free text about the patient", "modifiedDate": modified or ts("2025-01-01"), **kw}


def status_event(subject_id: int, status: str, day: str) -> dict[str, Any]:
    return {"subject": {"Id": subject_id}, "status": status, "eventDate": ts(day), "isCurrentStatus": False,
            "study": {"id": 0}}


def status_key(r: dict[str, Any]) -> str:
    return f"{r['subject']['Id']}|{r['eventDate']}|{r['status']}"


def visit(i: int, subject_id: int, study_id: int, *, status: str = "Pending", target: str = "2025-03-10",
          min_due: str | None = "2025-03-07", max_due: str | None = "2025-03-13", appointment: str | None = None,
          **kw: Any) -> dict[str, Any]:
    return {"id": i, "uid": f"pv-{i}", "sequence": 1, "visitId": 100 + i % 5, "visitName": f"Visit {i % 5}",
            "mandatory": True, "status": status, "targetDueDate": ts(target),
            "minDueDate": ts(min_due) if min_due else None, "maxDueDate": ts(max_due) if max_due else None,
            "appointments": [{"id": i, "status": "Completed" if status == "Completed" else "Pending",
                              "scheduledStart": ts(appointment, "09:00:00")}]
            if appointment else [],
            "study": {"id": study_id, "name": f"Study {study_id}"}, "subject": {"Id": subject_id},
            "modifiedDate": ts("2025-03-01"), **kw}


def element(i: int, *, completed: str | None, element_id: int = 7, duration: int = 15, **kw: Any) -> dict[str, Any]:
    return {"id": i, "uid": f"pve-{i}", "sequence": 1, "elementId": element_id, "name": f"Element {element_id}",
            "durationMinutes": duration, "required": True, "completedOn": completed, "repeatable": False,
            "isRepeatedElement": False, **kw}


def seed_small(conn: psycopg.Connection, *, studies: int = 2, subjects_per_study: int = 3) -> None:
    """A small consistent warehouse: sites, sponsor, staff, studies, patients, subjects with status
    history, one visit per subject (completed for the first, with its completed appointment and a
    stipend), one completed element per visit; and per study its protocol visits, an arm, a role
    holder, an open and a closed query, a completed and a pending milestone; rooms, a monitor, an
    element definition and one patient payment."""
    load(conn, "dim_sites_staging", [site(1), site(2)])
    load(conn, "dim_sponsors_staging", [sponsor(1)])
    load(conn, "dim_staff_staging", [staff(1)])
    load(conn, "dim_studies_staging", [study(s) for s in range(1, studies + 1)])
    load(conn, "dim_rooms_staging", [room(1, 1), room(2, 1), room(3, 2, conference=True)])
    load(conn, "dim_monitors_staging", [{"id": 1, "firstName": "Mo", "lastName": "Nitor", "displayName": "Mo Nitor",
                                          "modifiedDate": ts("2024-01-01")}])
    load(conn, "dim_elements_staging", [{"id": 7, "uid": "el-7", "study": {"id": 1}, "name": "Element 7",
                                          "standardTimeMinutes": 15, "roomAssignment": {"type": "Room", "id": 1},
                                          "modifiedDate": ts("2024-01-01")}])
    load(conn, "dim_visits_staging", [{"id": 100 + k, "uid": f"v-{k}", "study": {"id": 1}, "name": f"Visit {k}",
                                        "isActive": True, "arms": [], "modifiedDate": ts("2024-01-01")}
                                       for k in range(5)], params={"studyId": 1})
    for s in range(1, studies + 1):
        load(conn, "dim_study_arms_staging", [arm(s * 10, name="Arm A")], key=lambda r, s=s: f"{s}|{r['Id']}",
             params={"studyId": s})
        load(conn, "dim_study_personnel_staging", [personnel(1, staff_id=1)],
             key=lambda r, s=s: f"{s}|{r['Role']['Id']}", params={"studyId": s})
        load(conn, "dim_queries_staging", [query(9000 + 2 * s, s, opened="2025-02-01"),
                                            query(9001 + 2 * s, s, opened="2025-01-01", closed="2025-01-20")],
             params={"studyId": s})
        load(conn, "fact_study_milestones_staging", [milestone(8000 + 2 * s, projected="2025-01-10", done="2025-01-15"),
                                                      milestone(8001 + 2 * s, projected="2025-06-01")],
             params={"studyId": s})
    subj_id = 0
    for s in range(1, studies + 1):
        for j in range(subjects_per_study):
            subj_id += 1
            statuses = ["Screened", "Randomized", "ScreenFailed", "Dropped", "Completed"]
            st = statuses[(subj_id - 1) % len(statuses)]
            load(conn, "dim_patients_staging", [patient(subj_id)])
            enrolled = "2025-02-01T00:00:00Z" if st in ("Randomized", "Completed", "Dropped") else None
            load(conn, "dim_subjects_staging", [subject(subj_id, s, site_id=1 + subj_id % 2, status=st,
                                                        enrollment=enrolled)])
            events = [status_event(subj_id, "Screened", "2025-01-15")]
            if st != "Screened":
                events.append(status_event(subj_id, st, "2025-02-01"))
            load(conn, "dim_subject_statuses_staging", events, key=status_key)
            vid = 1000 + subj_id
            load(conn, "dim_patient_visits_staging",
                 [visit(vid, subj_id, s, status="Completed" if j == 0 else "Pending",
                        appointment="2025-03-12" if j == 0 else None)],
                 params={"studyId": s, "subjectId": subj_id})
            if j == 0:
                load(conn, "dim_patient_visit_elements_staging", [element(5000 + subj_id, completed=ts("2025-03-12", "10:00:00"))],
                     params={"patientVisitId": vid})
                load(conn, "dim_appointments_staging", [appointment(vid, s, 1 + subj_id % 2, subj_id, 100 + vid % 5,
                                                                    "2025-03-12")])
                load(conn, "dim_patient_visit_stipends_staging", [payment(7000 + subj_id, vid, subj_id, "2025-03-13")],
                     params={"patientVisitId": vid})
    load(conn, "dim_patient_payments_staging", [payment(7900, 1001, 1, "2025-03-20", kind="Travel")])


def room(i: int, site_id: int, *, conference: bool = False, **kw: Any) -> dict[str, Any]:
    return {"id": i, "name": f"Room {i}", "site": {"id": site_id, "name": f"Site {site_id}"}, "active": True,
            "isConferenceRoom": conference, "isTreatmentRoom": not conference, "status": "Open",
            "modifiedDate": ts("2024-01-01"), **kw}


def arm(i: int, **kw: Any) -> dict[str, Any]:
    return {"Id": i, "Uid": f"arm-{i}", "Name": f"Arm {i}", "createdDate": ts("2024-01-01"),
            "modifiedDate": ts("2024-02-01"), **kw}


def personnel(role_id: int, *, staff_id: int, modified: str = "2024-02-01") -> dict[str, Any]:
    return {"Role": {"Id": role_id, "RoleName": "Principal Investigator", "Coordinator": True},
            "Staff": [{"Id": staff_id, "FullName": f"Dr {staff_id}", "Priority": 1}],
            "createdDate": ts("2024-01-01"), "modifiedDate": ts(modified)}


def appointment(i: int, study_id: int, site_id: int, patient_id: int, visit_id: int, day: str, *,
                status: str = "Completed", **kw: Any) -> dict[str, Any]:
    return {"id": i, "status": status, "plannedStart": ts(day, "09:00:00"), "plannedEnd": ts(day, "10:00:00"),
            "study": {"id": study_id}, "site": {"id": site_id}, "patient": {"id": patient_id},
            "visit": {"id": visit_id}, "modifiedDate": ts(day, "12:00:00"), **kw}


def query(i: int, study_id: int, *, opened: str, closed: str | None = None, **kw: Any) -> dict[str, Any]:
    st = {"queryStatus": "Resolved" if closed else "New", "isConsideredOpen": closed is None}
    return {"id": i, "study": {"id": study_id}, "status": st, "createdOn": ts(opened),
            "closedOn": ts(closed) if closed else None, "assignedToMonitor": {"id": 1},
            "requestedByStaff": {"id": 1}, "query": "free text", "modifiedDate": ts(closed or opened), **kw}


def milestone(i: int, *, projected: str, done: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"id": i, "name": f"Milestone {i}", "projectedDate": ts(projected), "completedOn": ts(done) if done else None,
            "status": "Completed" if done else "In Progress", "assignedTo": {"id": 1},
            "modifiedDate": ts(done or "2025-01-01"), **kw}


def payment(i: int, visit_id: int, subject_id: int, day: str, *, kind: str = "Visit", **kw: Any) -> dict[str, Any]:
    return {"id": i, "patientVisitId": visit_id, "patientStudyId": subject_id, "amount": 50.0, "stipendType": kind,
            "paymentMethod": "Check", "paymentOn": ts(day), "modifiedDate": ts(day), **kw}
