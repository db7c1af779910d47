"""`trialsync jobs sync`: 90 jobs, 72 active and valid, fixes applied, idempotent, all-or-nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from common.catalog import load_catalog, sync
from common.db import migrate
from schemas.jobs import Job, JobCatalog

pytestmark = pytest.mark.integration


def test_sync_counts_and_fixes(fresh_db: str) -> None:
    migrate()
    r = sync(load_catalog())
    assert r.inserted == 90
    with psycopg.connect(fresh_db) as conn:
        total, active = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE is_active AND is_valid) FROM etl.dw_etl_jobs").fetchone()
        assert (total, active) == (90, 72)
        ep = conn.execute("SELECT source_endpoint FROM etl.dw_etl_jobs WHERE id = 23").fetchone()[0]
        assert ep.endswith("/monitor-queries/odata")
        params, deps = conn.execute("SELECT parameters, depends_on FROM etl.dw_etl_jobs WHERE id = 175").fetchone()
        assert params == {"studyId": "study.id", "visitId": "id"} and deps == [11]
        invalid = conn.execute("SELECT count(*) FROM etl.dw_etl_jobs WHERE NOT is_valid").fetchone()[0]
        assert invalid == 16


def test_sync_is_idempotent(fresh_db: str) -> None:
    migrate()
    sync(load_catalog())
    r = sync(load_catalog())
    assert (r.inserted, r.updated, r.unchanged) == (0, 0, 90)


def test_sync_is_all_or_nothing(fresh_db: str) -> None:
    migrate()
    jobs = list(load_catalog())
    # the database refuses the 60th job (timestamp_field longer than the column allows)
    jobs[60] = jobs[60].model_copy(update={"timestamp_field": "x" * 100})
    with pytest.raises(psycopg.errors.StringDataRightTruncation):
        sync(JobCatalog(jobs))
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM etl.dw_etl_jobs").fetchone()[0] == 0


def test_cli_unknown_job_is_one_line(stack) -> None:
    proc = subprocess.run([sys.executable, "-m", "common.cli", "jobs", "show", "999"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=60)
    assert proc.returncode == 1
    assert "unknown job id 999" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_bad_setting_exits_2(stack) -> None:
    env = dict(os.environ, ETL_PARALLEL_JOBS="lots")
    proc = subprocess.run([sys.executable, "-m", "common.cli", "jobs", "list"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2
    assert "ETL_PARALLEL_JOBS='lots'" in proc.stderr and "Traceback" not in proc.stderr


def test_job_model_rejects_unparameterized_placeholder() -> None:
    with pytest.raises(ValueError, match="not parameterized"):
        Job(id=1, name="x", endpoint="/api/v1/studies/{studyId}", target_table="x_staging")
