"""The reconciler (`simulator/reconcile.py`, `trialsync simulator reconcile`) finds every kind of
difference between Bronze and the simulator's ground truth: missing, duplicated, stale, extra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.integration
TRIALSYNC = str(Path(sys.executable).parent / "trialsync")
JOB = 2  # /api/v1/studies/odata -> dim_studies_staging, key id


@pytest.fixture
def warehouse(fresh_db: str, cc_simulator: Any) -> Any:
    from common.catalog import load_catalog, sync
    from common.config import get_settings
    from common.db import connect, migrate

    migrate()
    sync(load_catalog())
    conn = connect(get_settings(), autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def _load_truth(conn: Any, sim: Any) -> list[dict[str, Any]]:
    truth = sim.expected(job=JOB)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO bronze.dim_studies_staging (data, source_id, etl_job_id) VALUES (%s::jsonb, %s, %s)",
                        [(orjson.dumps(t["record"]).decode(), f"cc1:{t['record']['id']}", JOB) for t in truth])
    return truth


def _reconcile(conn: Any, sim: Any) -> Any:
    from common.catalog import load_catalog
    from simulator.reconcile import reconcile

    return reconcile(conn, sim.admin_url, load_catalog(), [JOB])


def test_exact_copy_reconciles_and_each_defect_is_counted(warehouse: Any, cc_simulator: Any) -> None:
    conn, sim = warehouse, cc_simulator
    truth = _load_truth(conn, sim)
    assert len(truth) >= 5
    rec = _reconcile(conn, sim)
    assert rec.exact and rec.totals["expected"] == rec.totals["loaded"] == len(truth)

    a, b, c = (t["record"] for t in truth[:3])
    conn.execute("DELETE FROM bronze.dim_studies_staging WHERE source_id = %s", (f"cc1:{a['id']}",))  # missing
    conn.execute("UPDATE bronze.dim_studies_staging SET is_deleted = true WHERE source_id = %s",  # missing too
                 (f"cc1:{b['id']}",))
    conn.execute("UPDATE bronze.dim_studies_staging SET data = data || '{\"status\": \"Tampered\"}' "  # stale
                 "WHERE source_id = %s", (f"cc1:{c['id']}",))
    conn.execute("INSERT INTO bronze.dim_studies_staging (data, source_id, etl_job_id) VALUES (%s::jsonb, %s, %s)",
                 ('{"id": 99999999, "name": "gone upstream"}', "cc1:99999999", JOB))  # extra
    d = truth[3]["record"]  # the same record once more under another id: duplicated (and extra)
    conn.execute("INSERT INTO bronze.dim_studies_staging (data, source_id, etl_job_id) VALUES (%s::jsonb, %s, %s)",
                 (orjson.dumps(d).decode(), f"cc1:{d['id']}.0", JOB))
    e = truth[4]["record"]  # stale with an older timestamp: a missed change (not only a reference)
    conn.execute("UPDATE bronze.dim_studies_staging SET data = data || '{\"lastUpdatedOn\": \"2001-01-01T00:00:00Z\"}' "
                 "WHERE source_id = %s", (f"cc1:{e['id']}",))
    rec = _reconcile(conn, sim)
    t = rec.tables["dim_studies_staging"]
    assert (t.missing, t.stale, t.duplicated, t.extra) == (2, 2, 1, 2), rec.problems()
    assert sorted(t.samples["stale"]) == sorted([f"cc1:{c['id']}", f"cc1:{e['id']}"])
    # the tampered status kept its timestamp (lastUpdatedOn for job 2): what a timestamp filter cannot see
    assert t.stale_refs == 1 and t.samples["stale_refs"] == [f"cc1:{c['id']}"]
    assert not rec.exact


def test_cli_exit_code_and_json(warehouse: Any, cc_simulator: Any, fresh_db: str) -> None:
    import os

    conn, sim = warehouse, cc_simulator
    _load_truth(conn, sim)
    env = {**os.environ, "DATABASE_URL": fresh_db}
    ok = subprocess.run([TRIALSYNC, "simulator", "reconcile", "--url", sim.admin_url, "--job", str(JOB), "--json"],
                        env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["exact"] is True
    conn.execute("DELETE FROM bronze.dim_studies_staging WHERE ctid IN (SELECT ctid FROM bronze.dim_studies_staging "
                 "LIMIT 1)")
    bad = subprocess.run([TRIALSYNC, "simulator", "reconcile", "--url", sim.admin_url, "--job", str(JOB),
                          "--problems-only"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "dim_studies_staging" in bad.stdout and "TOTAL" in bad.stdout
