"""The whole star on simulator data: every new Silver table and Gold view equals an independent
recompute from Bronze (tests/integration/star_expected.py) after a full load, after a few days of
realistic activity in the simulator (plus role reassignments and arm renames) extracted
incrementally, and after replaying topics into Bronze -- with exactly one new SCD2 version per
changed key and nothing changed by the replay.

Real parts throughout: the simulator over HTTP, the extractor, the embedded broker, the loader, the
transform procedures in PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from common import config
from common.catalog import load_catalog
from common.config import Settings
from consumers.transform_runner import ProcedureRunner
from consumers.transform_settings import load_transform_settings
from simulator.testing import SimulatorProcess
from tests.integration.star_expected import Star, live, ref
from tests.integration.transform_support import (
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    rows,
    scalar,
)

run_job = pytest.importorskip("producers.extractor").run_job
_loader = pytest.importorskip("consumers.loader")

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "star-transform-key-9Xq1"
#: parents before the jobs that fan out over them
STAGES = ([1, 35, 26, 2, 3, 127, 9, 8, 25, 33, 139, 176], [10, 11, 23, 28, 141, 174, 144], [24, 161])


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(scale=0.002, seed=11, api_key=KEY) as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, tx_dsn: str, unique: str) -> Iterator[Settings]:
    values = {"CC_API_BASE_URL": sim.base_url, "CC_API_KEY": sim.api_key, "CC_API_KEY_HEADER": sim.key_header,
              "KAFKA_TOPIC_PREFIX": f"star{unique}", "ETL_RETRY_DELAY_SECONDS": "0.01"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    config.reset_settings()
    try:
        yield config.get_settings()
    finally:
        from producers.publisher import reset_publishers

        reset_publishers()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        config.reset_settings()


def extract_and_load(s: Settings, group: str, mode: str) -> None:
    catalog = load_catalog(s)
    for stage in STAGES:
        for j in stage:
            r = run_job(catalog.get(j), mode=mode, settings=s)  # type: ignore[arg-type]
            assert r.status == "success", (j, r.to_dict())
        _loader.run_loader(_loader.LoaderOptions(group=group, once=True, install_signal_handlers=False,
                                                 idle_exit_s=5), s)


def transform(s: Settings) -> dict[str, dict[str, int]]:
    runner = ProcedureRunner(s, load_transform_settings())
    try:
        batch = runner.run_batch(runner.plan.all(), trigger="manual")
    finally:
        runner.close()
    assert not batch.failed, [(r.procedure, r.error) for r in batch.failed]
    bad = [(q.check.name, q.failed_rows, q.sample_keys[:3], q.error) for q in batch.quality
           if q.check.severity == "error" and q.status in ("fail", "error")]
    assert bad == []
    return {r.procedure: r.counts for r in batch.procedures}


def by(rows_: list[dict[str, Any]], *key: str) -> dict[Any, dict[str, Any]]:
    return {(r[key[0]] if len(key) == 1 else tuple(r[k] for k in key)): r for r in rows_}


def assert_star_equals_recompute(tx) -> Star:
    """Every new table and view against the recompute; returns it for further checks."""
    exp = Star(tx)
    assert exp.visits and exp.appointments and exp.queries and exp.milestones and exp.payments

    # -- dimensions: every live Bronze key has its row (Type 2: its live current version)
    for table, bronze in (("dim_study_visits", ("dim_visits_staging",)), ("dim_elements", ("dim_elements_staging",)),
                          ("dim_rooms", ("dim_rooms_staging",)), ("dim_monitors", ("dim_monitors_staging",))):
        want = set(live(tx, *bronze))
        assert want and {r["source_id"] for r in rows(tx, f"SELECT source_id FROM silver.{table} "  # noqa: S608
                                                          "WHERE NOT is_deleted")} == want, table
    rooms = by(rows(tx, "SELECT source_id, room_source_id FROM silver.dim_elements"), "source_id")
    for sid, (d, _) in live(tx, "dim_elements_staging").items():
        assert rooms[sid]["room_source_id"] == ref((d.get("roomAssignment") or {}).get("id")), sid
    arms = by(rows(tx, "SELECT source_id, arm_name, study_source_id FROM silver.dim_study_arms "
                       "WHERE is_current AND NOT is_deleted"), "source_id")
    want_arms = live(tx, "dim_study_arms_staging", "dim_study_visit_arms_staging")
    assert arms.keys() == want_arms.keys() and want_arms
    for sid, (d, p) in want_arms.items():
        assert (arms[sid]["arm_name"], arms[sid]["study_source_id"]) == (d["Name"], ref(p["studyId"])), sid
    holders = by(rows(tx, "SELECT source_id, staff_source_id, role_name FROM silver.dim_study_staff_assignments "
                          "WHERE is_current AND NOT is_deleted"), "source_id")
    want_roles = live(tx, "dim_study_personnel_staging")
    assert holders.keys() == want_roles.keys() and want_roles
    for sid, (d, _) in want_roles.items():
        first = min(d["Staff"], key=lambda x: (x["Priority"], x["Id"]))
        assert (holders[sid]["staff_source_id"], holders[sid]["role_name"]) == (ref(first["Id"]), d["Role"]["RoleName"])

    # -- facts
    got = by(rows(tx, "SELECT * FROM silver.fact_enrollment"), "source_id")
    assert got.keys() == exp.enrollment.keys()
    for sid, e in exp.enrollment.items():
        g = got[sid]
        assert {k: g[k if k not in ("study", "site") else f"{k}_source_id"] for k in e} == e, sid
    got = by(rows(tx, "SELECT * FROM silver.fact_visit_timelines"), "source_id")
    assert got.keys() == exp.visits.keys()
    for sid, v in exp.visits.items():
        g = got[sid]
        assert (g["is_completed"], g["actual_date"], g["completion_timing"], g["is_expected"],
                g["completed_appointment_source_id"], g["site_source_id"], g["subject_source_id"]) == (
            v["is_completed"], v["actual_date"], v["completion_timing"], v["is_expected"],
            v["completed_appointment"], v["site"], v["subject"]), sid
    got = by(rows(tx, "SELECT * FROM silver.fact_appointments"), "source_id")
    assert got.keys() == exp.appointments.keys()
    for sid, a in exp.appointments.items():
        g = got[sid]
        assert (g["appointment_status"], g["study_source_id"], g["site_source_id"], g["subject_source_id"],
                g["patient_visit_source_id"], g["study_visit_source_id"], g["planned_date"], g["duration_minutes"]) == (
            a["status"], a["study"], a["site"], a["subject"], a["patient_visit"], a["study_visit"], a["planned_date"],
            a["minutes"]), sid
    got = by(rows(tx, "SELECT * FROM silver.fact_monitor_queries"), "source_id")
    assert got.keys() == exp.queries.keys()
    for sid, q in exp.queries.items():
        g = got[sid]
        assert (g["study_source_id"], g["monitor_source_id"], g["is_open"], g["created_date"], g["days_to_close"]) == (
            q["study"], q["monitor"], q["is_open"], q["created"], q["days_to_close"]), sid
    got = by(rows(tx, "SELECT * FROM silver.fact_study_milestones"), "source_id")
    assert got.keys() == exp.milestones.keys()
    for sid, m in exp.milestones.items():
        g = got[sid]
        assert (g["study_source_id"], g["projected_date"], g["completed_date"], g["is_completed"], g["slip_days"]) == (
            m["study"], m["projected"], m["completed"], m["is_completed"], m["slip"]), sid
    got = by(rows(tx, "SELECT * FROM silver.fact_patient_payments"), "source_id")
    assert got.keys() == exp.payments.keys()
    for sid, p in exp.payments.items():
        g = got[sid]
        assert (g["payment_source"], g["subject_source_id"], g["study_source_id"], g["amount"], g["paid_date"],
                g["patient_visit_source_id"]) == (p["source"], p["subject"], p["study"], p["amount"], p["paid_date"],
                                                  p["visit"]), sid

    # -- Gold
    funnel = by(rows(tx, "SELECT * FROM gold.v_enrollment_funnel"), "study_source_id", "site_source_id")
    want = exp.funnel()
    assert funnel.keys() == want.keys()
    for k, w in want.items():
        assert {c: funnel[k][c] for c in w} == w, k
    comp = by(rows(tx, "SELECT * FROM gold.mv_visit_compliance"), "study_source_id", "site_source_id", "due_month")
    want = exp.compliance()
    assert comp.keys() == want.keys()
    for k, w in want.items():
        assert {c: comp[k][c] for c in w} == w, k
        assert comp[k]["compliance_rate"] == (round(Decimal(w.get("visits_on_time", 0)) / Decimal(
            w.get("visits_completed", 0) + w.get("visits_missed", 0)), 4)
            if w.get("visits_completed", 0) + w.get("visits_missed", 0) else None)
    cap = by(rows(tx, "SELECT * FROM gold.v_site_capacity"), "site_source_id", "planned_date")
    want = exp.capacity()
    assert cap.keys() == want.keys()
    for k, w in want.items():
        assert (cap[k]["appointments"], cap[k]["booked_minutes"], cap[k]["rooms"]) == (
            w["appointments"], w["booked_minutes"], w["rooms"]), k
    aging = by(rows(tx, "SELECT * FROM gold.v_query_aging"), "study_source_id", "monitor_source_id")
    want = exp.query_aging()
    assert aging.keys() == want.keys()
    for k, w in want.items():
        assert {c: aging[k][c] for c in w} == w, k
    slip = by(rows(tx, "SELECT * FROM gold.v_milestone_slippage"), "study_source_id")
    want = exp.slippage()
    assert slip.keys() == want.keys()
    for k, w in want.items():
        assert {c: slip[k][c] for c in w} == w, k
    pay = by(rows(tx, "SELECT * FROM gold.v_payments_monthly"), "study_source_id", "paid_month")
    want = exp.payments_monthly()
    assert pay.keys() == want.keys()
    for k, w in want.items():
        assert {c: pay[k][c] for c in w} == w, k
    # the existing summary agrees with the funnel (active = on study now)
    summary = by(rows(tx, "SELECT * FROM gold.v_study_enrollment_summary"), "study_source_id")
    for sid, srow in summary.items():
        parts = [e for e in exp.enrollment.values() if e["study"] == sid]
        assert (srow["total_subjects"], srow["enrolled"], srow["active_subjects"]) == (
            len(parts), sum(e["is_enrolled"] for e in parts), sum(e["is_active"] for e in parts)), sid
    return exp


def versions(tx, table: str) -> dict[str, int]:
    return {r["source_id"]: r["n"] for r in rows(tx, f"SELECT source_id, count(*) AS n FROM silver.{table} "  # noqa: S608
                                                     "GROUP BY source_id")}


def test_star_equals_recompute_after_load_change_and_replay(tx, env, sim, unique) -> None:
    group = f"loader-star{unique}"
    extract_and_load(env, group, "full")
    transform(env)
    first = assert_star_equals_recompute(tx)
    # the simulator's data means what the CC model says: the Gold numbers are not degenerate
    assert 0 < sum(f["enrolled"] for f in first.funnel().values()) < sum(f["screened"] for f in first.funnel().values())
    assert any(c.get("visits_on_time") for c in first.compliance().values())
    assert any(c.get("visits_late") or c.get("visits_missed") for c in first.compliance().values())
    assert scalar(tx, "SELECT count(*) FROM gold.mv_study_performance_metrics WHERE visit_on_time_rate > 0") > 0
    before = {t: versions(tx, t) for t in ("dim_subjects", "dim_study_arms", "dim_study_staff_assignments")}
    subjects_before = {sid: {k: v for k, v in d.items() if k != "modifiedDate"} for sid, (d, _) in
                       live(tx, "dim_subjects_staging").items()}

    # a few days at the sites, a role handed over, an arm renamed -- then the nightly incremental run
    night = sim.realistic(days=4)
    assert night["counts"]["patient_visits"]["modified"] + night["counts"]["patient_visits"]["inserted"] > 0
    roles = sim.mutate("study_personnel", modify_count=2)["modified"]
    arms = sim.mutate("study_arms", modify_count=2)["modified"]
    assert len(roles) == 2 and len(arms) == 2
    extract_and_load(env, group, "incremental")
    transform(env)
    assert_star_equals_recompute(tx)
    after = {t: versions(tx, t) for t in before}
    # exactly one new version per subject whose record changed (a status change of the night, or the
    # renamed arm it embeds), none for the others; new subjects open their first version
    now = {sid: {k: v for k, v in d.items() if k != "modifiedDate"} for sid, (d, _) in
           live(tx, "dim_subjects_staging").items()}
    changed_records = {sid for sid in subjects_before if sid in now and now[sid] != subjects_before[sid]}
    opened = {sid for sid, n in after["dim_subjects"].items() if n > before["dim_subjects"].get(sid, 0)}
    new_keys = {sid for sid in after["dim_subjects"] if sid not in before["dim_subjects"]}
    assert {ref(i) for i in night["entities"]["subjects"]["modified"]} <= changed_records
    assert changed_records and opened - new_keys == changed_records
    assert all(after["dim_subjects"][s] == before["dim_subjects"][s] + 1 for s in changed_records)
    assert {ref(i) for i in night["entities"]["subjects"]["inserted"]} == new_keys
    assert sum(after["dim_study_arms"].values()) - sum(before["dim_study_arms"].values()) == 2
    assert sum(after["dim_study_staff_assignments"].values()) - sum(before["dim_study_staff_assignments"].values()) == 2

    # replaying topics into Bronze (one table rebuilt from its whole topic) changes nothing in Silver/Gold
    from consumers.replay import ReplayOptions, replay

    replay(ReplayOptions(table="dim_appointments_staging", truncate=True), env)
    replay(ReplayOptions(table="dim_subject_statuses_staging"), env)
    replay(ReplayOptions(table="dim_study_personnel_staging"), env)
    counts = transform(env)
    changed = {p: c for p, c in counts.items() if not p.startswith("gold.refresh_mv_") and any(c.values())}
    assert changed == {}
    assert_star_equals_recompute(tx)
