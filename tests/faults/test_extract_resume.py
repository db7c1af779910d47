"""A paged run killed midway (kill -9 of a real `trialsync extract`) is continued by `trialsync retry`
from its resume point -- the last record every earlier page was acknowledged up to -- not from page
1, and staging is exact afterwards: every record once, in its latest content, also for records the
source changed between the two attempts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import connect, migrate
from simulator.reconcile import reconcile
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import ExtractEnv, run_row
from tests.loader_support import load_once

pytestmark = [pytest.mark.integration, pytest.mark.faults]
JOB = 9  # patient visits: /api/v1/patient-visits/odata, 1000-record pages ordered by id


@pytest.fixture
def sim() -> Iterator[SimulatorProcess]:
    # 23 k patient visits in 23 pages; 400 ms a request and one worker: ~10 s to read, time to kill it
    with SimulatorProcess(scale=0.01, seed=5, api_key="it-resume-key-Rr7", latency_ms=400) as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str) -> Iterator[Settings]:
    migrate()
    sync(load_catalog())
    with ExtractEnv(sim, f"rs{unique}", CC_INCREMENTAL_OVERLAP_SECONDS="0") as s:
        yield s


def _resume_point(env: Settings, run_id: int) -> dict | None:
    return run_row(env, run_id)["run_context"].get("resume")


def test_killed_paged_run_resumes_at_its_last_acknowledged_page(env: Settings, sim: SimulatorProcess) -> None:
    cli = [sys.executable, "-m", "common.cli"]
    proc = subprocess.Popen([*cli, "extract", "--job", str(JOB), "--full", "--workers", "1"], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        run_id = point = None
        while time.monotonic() < deadline:  # wait until the heartbeat recorded a resume point
            with connect(env, autocommit=True) as conn:
                row = conn.execute("SELECT id FROM etl.dw_etl_runs WHERE job_id = %s ORDER BY id DESC LIMIT 1",
                                   (JOB,)).fetchone()
            if row:
                run_id = row[0]
                point = _resume_point(env, run_id)
                if point and point["records"] >= 3000:
                    break
            time.sleep(0.5)
        assert run_id and point, "no resume point was recorded"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    killed_at = _resume_point(env, run_id)
    assert killed_at["key"] == "id" and 3000 <= killed_at["records"] < 23000
    # between the two attempts the source changes: visits the killed run already read, and later ones
    ids = sorted(e["record"]["id"] for e in sim.expected(job=JOB))
    early = [i for i in ids if i <= killed_at["after"]][:5]
    late = [i for i in ids if i > killed_at["after"]][-5:]
    sim.mutate("patient_visits", modify_ids=early + late)
    sim.reset_stats()
    retry = subprocess.run([*cli, "retry", "--run-id", str(run_id), "--json"], env=dict(os.environ),
                           capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stderr[-2000:]
    with connect(env, autocommit=True) as conn:
        killed_status = conn.execute("SELECT run_status FROM etl.dw_etl_runs WHERE id = %s", (run_id,)).fetchone()[0]
        new_id = conn.execute("SELECT max(id) FROM etl.dw_etl_runs WHERE job_id = %s", (JOB,)).fetchone()[0]
    assert killed_status == "failed" and new_id != run_id
    new = run_row(env, new_id)
    assert new["run_status"] == "success" and new["run_context"]["resumed_from"] == run_id
    # it did not start at page 1: it asked only for what the killed run had not delivered
    assert new["records_published"] <= len(ids) - killed_at["records"] + 1000
    assert sim.requests_to("/api/v1/patient-visits/odata") == new["api_calls"] < 23
    table = load_catalog(env).get(JOB).target_table
    load_once(env, "rs-loader", [table], batch_size=5000)
    with connect(env, autocommit=True) as conn:
        after_retry = reconcile(conn, sim.admin_url, load_catalog(env), [JOB]).tables[table]
    # nothing missing or doubled; the early visits changed after the killed run read them are old
    # here (the retry did not read their pages again) -- and the next incremental run brings them,
    # because the resumed run's watermark stayed below what the killed attempt saw
    assert (after_retry.missing, after_retry.duplicated, after_retry.extra) == (0, 0, 0)
    assert after_retry.stale == len(early)
    nxt = subprocess.run([*cli, "extract", "--job", str(JOB)], env=dict(os.environ), capture_output=True, text=True,
                         timeout=300)
    assert nxt.returncode == 0, nxt.stderr[-2000:]
    load_once(env, "rs-loader", [table], batch_size=5000)
    with connect(env, autocommit=True) as conn:
        rec = reconcile(conn, sim.admin_url, load_catalog(env), [JOB])
    assert rec.exact, rec.problems()
