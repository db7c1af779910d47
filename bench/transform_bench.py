"""Transform benchmark: full Silver/Gold build vs. the incremental run after 1 % of Bronze changed.

Goal (issue 6): at scale 0.1 the incremental transform takes < 10 % of the full transform's time.

Bronze is generated directly in SQL (no simulator, extractor or loader needed) with production
proportions (MISSION.md, Dec 2025) times ``--scale``: studies, sites, sponsors, staff, patients,
subjects with status history, patient visits, and visit elements in both element tables (jobs 24
and 166). Then:

1. full transform: every procedure once on an empty Silver (trigger ``bench``), quality checks timed
   separately;
2. 1 % of the rows of every Bronze table change (status moves, visits complete, elements complete),
   stamped ``updated_at = now()`` as the loader would;
3. incremental transform of the same procedures, then the quality checks again; steps 2-3 run three
   times on different 1 % slices and the median round is reported (the machine is shared and noisy).

Runs in a throw-away database on the configured server (DATABASE_URL or the embedded stack),
dropped afterwards unless ``--keep``. Prints one JSON document.

    .venv/bin/python bench/transform_bench.py --scale 0.1
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql

from common.config import get_settings, load_settings
from common.db import connect, migrate
from common.stack import database_dsn
from consumers.quality import run_quality_checks
from consumers.transform_runner import ProcedureRunner
from consumers.transform_settings import load_transform_settings

#: production row counts (MISSION.md), scaled by --scale
PRODUCTION = {"studies": 157_270, "patients": 152_836, "subjects": 88_773, "statuses": 119_749,
              "visits": 2_297_271, "elements": 2_090_584, "sites": 400, "sponsors": 2_740, "staff": 8_840}

GENERATE = [
    ("dim_sites_staging", """
     INSERT INTO bronze.dim_sites_staging (data, source_id)
     SELECT jsonb_build_object('id', i, 'uid', gen_random_uuid(), 'name', 'Site ' || i, 'active', i % 10 <> 0,
                               'city', 'City ' || (i % 50), 'state', 'TX', 'country', 'US', 'timeZone', 'UTC',
                               'createdOn', '2019-01-01T00:00:00.000Z', 'modifiedDate', '2024-01-01T00:00:00.000Z'),
            'cc1:' || i
       FROM generate_series(1, %(sites)s) i"""),
    ("dim_sponsors_staging", """
     INSERT INTO bronze.dim_sponsors_staging (data, source_id)
     SELECT jsonb_build_object('id', i, 'name', 'Sponsor ' || i, 'sponsorDivisions', jsonb_build_array(jsonb_build_object('id', i)),
                               'modifiedDate', '2024-01-01T00:00:00.000Z'), 'cc1:' || i
       FROM generate_series(1, %(sponsors)s) i"""),
    ("dim_staff_staging", """
     INSERT INTO bronze.dim_staff_staging (data, source_id)
     SELECT jsonb_build_object('id', i, 'displayName', 'Staff ' || i, 'isStatusActive', true, 'profession', 'RN',
                               'staffRoles', jsonb_build_array(jsonb_build_object('siteId', 1 + i % %(sites)s,
                                   'roleName', 'Coordinator', 'principalInvestigator', i % 20 = 0)),
                               'modifiedOn', '2024-01-01T00:00:00.000Z'), 'cc1:' || i
       FROM generate_series(1, %(staff)s) i"""),
    ("dim_studies_staging", """
     INSERT INTO bronze.dim_studies_staging (data, source_id)
     SELECT jsonb_build_object('id', i, 'uid', gen_random_uuid(), 'name', 'Study ' || i, 'title', 'Trial of compound ' || i,
                               'status', (ARRAY['Enrolling','Active','Closed','On Hold','Startup'])[1 + i % 5],
                               'phase', (ARRAY['I','II','III','IV'])[1 + i % 4], 'protocolNumber', 'P-' || i,
                               'sponsor', jsonb_build_object('id', 1 + i % %(sponsors)s),
                               'managingSite', jsonb_build_object('id', 1 + i % %(sites)s),
                               'createdOn', to_char(timestamp '2019-01-01' + (i % 1500) * interval '1 day', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                               'lastUpdatedOn', '2024-06-01T00:00:00.000Z'), 'cc1:' || i
       FROM generate_series(1, %(studies)s) i"""),
    ("dim_patients_staging", """
     INSERT INTO bronze.dim_patients_staging (data, source_id)
     SELECT jsonb_build_object('id', i, 'firstName', 'F' || i, 'lastName', 'L' || i, 'ssn', '000-00-0000',
                               'dateOfBirth', to_char(date '1940-01-01' + (i * 37) % 25000, 'YYYY-MM-DD"T00:00:00"'),
                               'genderCode', CASE WHEN i % 2 = 0 THEN 'F' ELSE 'M' END, 'status', 'Active',
                               'primarySite', jsonb_build_object('id', 1 + i % %(sites)s), 'state', 'TX',
                               'modifiedDate', '2024-01-01T00:00:00.000Z'), 'cc1:' || i
       FROM generate_series(1, %(patients)s) i"""),
    ("dim_subjects_staging", """
     INSERT INTO bronze.dim_subjects_staging (data, source_id, source_params)
     SELECT jsonb_build_object('id', i, 'uid', gen_random_uuid(), 'study', jsonb_build_object('id', s.study),
                               'site', jsonb_build_object('id', 1 + i % %(sites)s),
                               'patient', jsonb_build_object('id', 1 + i % %(patients)s, 'firstName', 'F'),
                               'status', (ARRAY['Screened','Randomized','ScreenFailed','Dropped','Completed','FollowUp'])[1 + i % 6],
                               'enrollmentDate', CASE WHEN i % 6 IN (1, 3, 4, 5)
                                   THEN to_char(date '2021-01-01' + i % 1400, 'YYYY-MM-DD"T00:00:00.000Z"') END,
                               'genderCode', 'F', 'modifiedDate', '2024-06-01T00:00:00.000Z'),
            'cc1:' || i, jsonb_build_object('studyId', s.study)
       FROM generate_series(1, %(subjects)s) i, LATERAL (SELECT 1 + (i * 7) % greatest(%(studies)s / 10, 1) AS study) s"""),
    ("dim_subject_statuses_staging", """
     INSERT INTO bronze.dim_subject_statuses_staging (data, source_id)
     SELECT jsonb_build_object('subject', jsonb_build_object('Id', subj), 'status', st, 'eventDate', ev), 'cc1:' || subj || '|' || ev || '|' || st
       FROM (SELECT 1 + (i - 1) % %(subjects)s AS subj,
                    CASE WHEN i <= %(subjects)s THEN 'Screened' ELSE 'Randomized' END AS st,
                    to_char(date '2021-01-01' + i % 1400 - CASE WHEN i <= %(subjects)s THEN 20 ELSE 0 END,
                            'YYYY-MM-DD"T00:00:00.000Z"') AS ev
               FROM generate_series(1, %(statuses)s) i) x"""),
    ("dim_patient_visits_staging", """
     INSERT INTO bronze.dim_patient_visits_staging (data, source_id, source_params)
     SELECT jsonb_build_object('id', i, 'visitId', 1 + i % 30, 'visitName', 'Visit ' || (1 + i % 30), 'sequence', 1 + i % 30,
                               'mandatory', true, 'status', CASE WHEN i % 10 < 6 THEN 'Completed' ELSE 'Pending' END,
                               'targetDueDate', to_char(d, 'YYYY-MM-DD"T00:00:00.000Z"'),
                               'minDueDate', to_char(d - 3, 'YYYY-MM-DD"T00:00:00.000Z"'),
                               'maxDueDate', to_char(d + 3, 'YYYY-MM-DD"T00:00:00.000Z"'),
                               'appointments', CASE WHEN i % 10 < 6 THEN jsonb_build_array(jsonb_build_object(
                                   'id', i, 'scheduledStart', to_char(d + (i % 9) - 4, 'YYYY-MM-DD"T09:00:00.000Z"'))) ELSE '[]'::jsonb END,
                               'study', jsonb_build_object('id', 1 + (subj * 7) % greatest(%(studies)s / 10, 1)),
                               'subject', jsonb_build_object('Id', subj), 'modifiedDate', '2024-06-01T00:00:00.000Z'),
            'cc1:' || i, jsonb_build_object('subjectId', subj)
       FROM generate_series(1, %(visits)s) i,
            LATERAL (SELECT 1 + i % %(subjects)s AS subj, date '2021-01-01' + i % 1600 AS d) x"""),
    ("dim_patient_visit_elements_staging", """
     INSERT INTO bronze.dim_patient_visit_elements_staging (data, source_id, source_params)
     SELECT jsonb_build_object('id', i, 'elementId', 1 + i % 200, 'name', 'Element ' || (1 + i % 200), 'durationMinutes', 5 + i % 60,
                               'required', i % 3 = 0, 'completedOn',
                               CASE WHEN i % 10 < 7 THEN to_char(timestamp '2021-01-01 10:00' + (i % 1600) * interval '1 day',
                                                               'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') END),
            'cc1:' || i, jsonb_build_object('patientVisitId', 1 + i % %(visits)s)
       FROM generate_series(1, %(elements)s) i"""),
    ("dim_visit_elements_staging", """
     INSERT INTO bronze.dim_visit_elements_staging (data, source_id, source_params)
     SELECT data, source_id, source_params FROM bronze.dim_patient_visit_elements_staging WHERE id % 10 = 0"""),
]

# 1 % of every table changes, stamped like the loader stamps an upsert
CHANGE = [
    ("dim_studies_staging", """UPDATE bronze.dim_studies_staging SET updated_at = now(),
        data = data || jsonb_build_object('status', 'Terminated ' || %(slice)s, 'lastUpdatedOn', to_char(now(), 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
      WHERE id %% 100 = %(slice)s"""),
    ("dim_subjects_staging", """UPDATE bronze.dim_subjects_staging SET updated_at = now(),
        data = data || jsonb_build_object('status', CASE WHEN data->>'status' = 'Completed' THEN 'Dropped' ELSE 'Completed' END,
                                          'modifiedDate', to_char(now(), 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
      WHERE id %% 100 = %(slice)s"""),
    ("dim_patients_staging", """UPDATE bronze.dim_patients_staging SET updated_at = now(),
        data = data || jsonb_build_object('status', 'Inactive ' || %(slice)s) WHERE id %% 100 = %(slice)s"""),
    ("dim_sites_staging", """UPDATE bronze.dim_sites_staging SET updated_at = now(),
        data = data || jsonb_build_object('active', %(slice)s %% 2 = 0) WHERE id %% 100 = %(slice)s"""),
    ("dim_subject_statuses_staging", """UPDATE bronze.dim_subject_statuses_staging SET updated_at = now(),
        data = data || jsonb_build_object('comment', 'corrected ' || %(slice)s) WHERE id %% 100 = %(slice)s"""),
    ("dim_patient_visits_staging", """UPDATE bronze.dim_patient_visits_staging SET updated_at = now(),
        data = data || jsonb_build_object('status', CASE WHEN data->>'status' = 'Completed' THEN 'Started' ELSE 'Completed' END,
                 'appointments', jsonb_build_array(jsonb_build_object('id', %(slice)s, 'scheduledStart', data->>'maxDueDate')))
      WHERE id %% 100 = %(slice)s"""),
    ("dim_patient_visit_elements_staging", """UPDATE bronze.dim_patient_visit_elements_staging SET updated_at = now(),
        data = data || jsonb_build_object('completedOn', '2025-06-' || lpad(%(slice)s::text, 2, '0') || 'T10:00:00.000Z') WHERE id %% 100 = %(slice)s"""),
    ("dim_visit_elements_staging", """UPDATE bronze.dim_visit_elements_staging SET updated_at = now(),
        data = data || jsonb_build_object('completedOn', '2025-07-' || lpad(%(slice)s::text, 2, '0') || 'T10:00:00.000Z') WHERE id %% 100 = %(slice)s"""),
]


def _timed_batch(runner: ProcedureRunner) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    batch = runner.run_batch(runner.plan.all(), trigger="bench", quality=False)
    total = time.perf_counter() - t0
    if batch.failed:
        raise SystemExit(f"transform failed: {[(r.procedure, r.error) for r in batch.failed]}")
    return total, {r.procedure: {"s": round(r.duration_s, 3), **r.counts} for r in batch.procedures}


def _timed_quality(conn: psycopg.Connection, force: bool = True) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    results = run_quality_checks(conn, force=force)
    return time.perf_counter() - t0, [r.check.name for r in results if r.status != "pass"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--keep", action="store_true", help="keep the bench database")
    args = ap.parse_args()

    base = database_dsn(get_settings(), login="admin")  # it creates a database
    name = f"trialsync_bench_{uuid.uuid4().hex[:8]}"
    admin = base.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    settings = load_settings(database_url=base.rsplit("/", 1)[0] + "/" + name, enable_metrics=False)
    out: dict[str, Any] = {"bench": "transform", "scale": args.scale, "database": name}
    try:
        migrate(settings)
        counts = {k: max(1, int(v * args.scale)) for k, v in PRODUCTION.items()}
        with connect(settings, autocommit=True) as conn:
            t0 = time.perf_counter()
            for table, q in GENERATE:
                conn.execute(q.replace(" % ", " %% "), counts)  # type: ignore[arg-type]  # constant SQL above
                conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier("bronze", table)))
            out["generate_s"] = round(time.perf_counter() - t0, 2)
            out["bronze_rows"] = {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier("bronze", t))).fetchone()[0] for t, _ in GENERATE}  # type: ignore[index]
            time.sleep(2.5)  # past the watermark margin: the full run's horizon covers all generated rows

            runner = ProcedureRunner(settings, load_transform_settings())
            try:
                out["full_s"], out["full_procedures"] = _timed_batch(runner)
                out["full_quality_s"], out["full_quality_failing"] = _timed_quality(conn)
                out["silver_rows"] = {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                    sql.Identifier("silver", t))).fetchone()[0] for t in (  # type: ignore[index]
                    "dim_studies", "dim_subjects", "dim_patients", "fact_enrollment", "fact_visit_timelines",
                    "fact_element_completions", "fact_study_performance")}
                # three rounds, each changing a different 1 % of every table; the median is reported
                rounds = []
                for k in (7, 8, 9):
                    changed = {table: conn.execute(q, {"slice": k}).rowcount for table, q in CHANGE}  # type: ignore[arg-type]
                    time.sleep(2.5)  # past the margin: the next round does not re-read this round's rows
                    inc_s, inc_procs = _timed_batch(runner)
                    # the consumer's policy: hourly checks (reconciliation) are not due again yet
                    q_s, q_failing = _timed_quality(conn, force=False)
                    rounds.append({"slice": k, "changed_rows": changed, "incremental_s": round(inc_s, 3),
                                   "quality_s": round(q_s, 3), "quality_failing": q_failing,
                                   "procedures": inc_procs})
                out["incremental_rounds"] = rounds
                mid = sorted(rounds, key=lambda r: r["incremental_s"])[1]
                out["changed_rows"] = mid["changed_rows"]
                out["incremental_s"], out["incremental_procedures"] = mid["incremental_s"], mid["procedures"]
                out["incremental_quality_s"] = mid["quality_s"]
                out["noop_s"], out["noop_procedures"] = _timed_batch(runner)
            finally:
                runner.close()
        out["incremental_over_full"] = round(out["incremental_s"] / out["full_s"], 4)
        out["goal_met"] = out["incremental_over_full"] < 0.10
        for k in ("full_s", "noop_s", "full_quality_s"):
            out[k] = round(out[k], 3)
    finally:
        if not args.keep:
            with psycopg.connect(admin, autocommit=True) as c:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
