"""The demo's night: a day of realistic activity in the simulator between two `trialsync demo` runs,
and the story of what it did to the warehouse.

Why: an incremental run against unchanged data shows nothing. Run again, the demo lets a day pass at
the simulated sites first (the simulator's realistic change model, simulator/activity.py: visits come
due, statuses change, a few subjects arrive), runs incrementally, and reports what changed in Bronze,
which SCD2 versions opened and how the Gold numbers moved.

The simulator keeps its data in memory and is restarted by every demo run; its changes are a pure
function of the seed and the sequence of admin calls, so the nights applied so far are recorded in the
state directory (``demo.json``) and replayed, in order, before the new one: the restarted simulator
serves exactly what Bronze was loaded from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import requests
from psycopg import sql

#: the Type-2 dimensions whose new versions the summary lists, and how to name a version
SCD2_TABLES = {
    "silver.dim_studies": ("study_status", "study"),
    "silver.dim_subjects": ("subject_status", "subject"),
    "silver.dim_study_arms": ("arm_name", "arm"),
    "silver.dim_study_staff_assignments": ("staff_source_id", "study role"),
}
#: Gold numbers the summary follows: (label, SQL returning one number)
GOLD_METRICS: tuple[tuple[str, str], ...] = (
    ("subjects", "SELECT coalesce(sum(subjects), 0) FROM gold.v_enrollment_funnel"),
    ("screened", "SELECT coalesce(sum(screened), 0) FROM gold.v_enrollment_funnel"),
    ("enrolled", "SELECT coalesce(sum(enrolled), 0) FROM gold.v_enrollment_funnel"),
    ("active (on study)", "SELECT coalesce(sum(active), 0) FROM gold.v_enrollment_funnel"),
    ("visits completed", "SELECT coalesce(sum(visits_completed), 0) FROM gold.mv_visit_compliance"),
    ("visits missed", "SELECT coalesce(sum(visits_missed), 0) FROM gold.mv_visit_compliance"),
    ("visit compliance rate", "SELECT round(sum(visits_on_time)::numeric / nullif(sum(visits_completed) "
                              "+ sum(visits_missed), 0), 4) FROM gold.mv_visit_compliance"),
    ("appointments booked", "SELECT coalesce(sum(appointments), 0) FROM gold.v_site_capacity"),
    ("open monitor queries", "SELECT coalesce(sum(open_queries), 0) FROM gold.v_query_aging"),
    ("overdue milestones", "SELECT coalesce(sum(overdue), 0) FROM gold.v_milestone_slippage"),
    ("payments (amount)", "SELECT coalesce(sum(total_amount), 0) FROM gold.v_payments_monthly"),
)


@dataclass
class Snapshot:
    at: datetime
    gold: dict[str, Any]
    versions: dict[str, int]


@dataclass
class NightSummary:
    simulated: dict[str, Any]  # the simulator's answer (counts per entity, days, clock)
    bronze: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> inserted/updated/deleted
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)  # SCD2 table -> new keys, changes, examples
    gold: list[tuple[str, Any, Any]] = field(default_factory=list)  # (metric, before, after)


# -- the simulator side ---------------------------------------------------------------------------------
def recorded_nights(state_file: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(state_file.read_text()) if state_file.exists() else {}
    except ValueError:
        data = {}
    return list(data.get("nights") or [])


def record_night(state_file: Path, night: dict[str, Any]) -> None:
    data = json.loads(state_file.read_text()) if state_file.exists() else {}
    data.setdefault("nights", []).append(night)
    state_file.write_text(json.dumps(data))


def _realistic(admin_url: str, days: int) -> dict[str, Any]:
    r = requests.post(f"{admin_url.rstrip('/')}/mutate", json={"model": "realistic", "days": days}, timeout=600)
    r.raise_for_status()
    return r.json()


def replay_nights(admin_url: str, nights: list[dict[str, Any]]) -> None:
    """Apply the recorded nights again, in order, to a freshly started simulator (same seed)."""
    for n in nights:
        got = _realistic(admin_url, int(n.get("days", 1)))
        if n.get("clock") and got.get("clock") != n["clock"]:
            raise RuntimeError(f"replaying night {n.get('seq')} gave clock {got.get('clock')}, recorded {n['clock']}: "
                               "the simulator's data no longer matches the warehouse (`trialsync stack down --purge` "
                               "for a clean start)")


def apply_night(admin_url: str, days: int = 1) -> dict[str, Any]:
    return _realistic(admin_url, days)


# -- the warehouse side ---------------------------------------------------------------------------------
def _exists(conn: psycopg.Connection, rel: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (rel,)).fetchone()
    return bool(row and row[0])


def snapshot(conn: psycopg.Connection) -> Snapshot:
    """The database clock, the Gold numbers and the SCD2 version counts before the run."""
    from common.db import scalar

    at = scalar(conn, "SELECT clock_timestamp()")
    return Snapshot(at, gold_numbers(conn), {t: _count(conn, t) for t in SCD2_TABLES if _exists(conn, t)})


def _count(conn: psycopg.Connection, rel: str) -> int:
    schema, name = rel.split(".")
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name))).fetchone()
    return int(row[0]) if row else 0


def gold_numbers(conn: psycopg.Connection) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, q in GOLD_METRICS:
        try:
            row = conn.execute(q).fetchone()  # fixed queries above
            out[label] = row[0] if row else None
        except psycopg.Error:
            out[label] = None
    return out


def bronze_changes(conn: psycopg.Connection, since: datetime) -> dict[str, dict[str, int]]:
    """Per staging table: rows inserted, updated and soft-deleted since ``since`` (nonzero tables only)."""
    tables = [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'bronze' AND c.relkind = 'r' ORDER BY c.relname").fetchall()]
    out = {}
    for t in tables:
        row = conn.execute(sql.SQL(
            "SELECT count(*) FILTER (WHERE created_at >= %(t)s AND NOT is_deleted), "
            "count(*) FILTER (WHERE created_at < %(t)s AND updated_at >= %(t)s AND NOT is_deleted), "
            "count(*) FILTER (WHERE is_deleted AND coalesce(deleted_at, updated_at) >= %(t)s) "
            "FROM {} WHERE updated_at >= %(t)s").format(sql.Identifier("bronze", t)), {"t": since}).fetchone()
        if row and any(row):
            out[t] = {"inserted": int(row[0]), "updated": int(row[1]), "deleted": int(row[2])}
    return out


def opened_versions(conn: psycopg.Connection, since: datetime, examples: int = 3) -> dict[str, dict[str, Any]]:
    """Per Type-2 dimension: versions opened since ``since`` -- first versions of new keys, and new
    versions of existing keys with what changed (a few examples: previous -> new value)."""
    out: dict[str, dict[str, Any]] = {}
    for rel, (attr, noun) in SCD2_TABLES.items():
        if not _exists(conn, rel):
            continue
        schema, name = rel.split(".")
        q = sql.SQL("""
            SELECT n.source_id, p.prev::text, n.{a}::text, n.is_deleted, coalesce(p.found, false)
              FROM {t} n
              LEFT JOIN LATERAL (SELECT o.{a} AS prev, true AS found FROM {t} o
                                  WHERE o.source_id = n.source_id AND o.effective_start_date < n.effective_start_date
                                  ORDER BY o.effective_start_date DESC LIMIT 1) p ON true
             WHERE n.etl_inserted_at >= %s
             ORDER BY n.source_id""").format(t=sql.Identifier(schema, name), a=sql.Identifier(attr))
        rows = conn.execute(q, (since,)).fetchall()
        if not rows:
            continue
        changed = [r for r in rows if r[4]]
        out[rel] = {"noun": noun, "attribute": attr, "new_keys": len(rows) - len(changed), "new_versions": len(changed),
                    "examples": [f"{r[0]}: {r[1]} -> {r[2]}" + (" (deleted)" if r[3] else "") for r in changed[:examples]]}
    return out


def summarise(conn: psycopg.Connection, simulated: dict[str, Any], before: Snapshot) -> NightSummary:
    after = gold_numbers(conn)
    return NightSummary(simulated=simulated, bronze=bronze_changes(conn, before.at),
                        versions=opened_versions(conn, before.at),
                        gold=[(k, before.gold.get(k), after.get(k)) for k, _ in GOLD_METRICS])
