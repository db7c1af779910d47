"""Killing the extractor midway (kill -9 of a real `trialsync extract` process): the next start marks
the abandoned run failed, and the rerun completes the data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import kafka as K
from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import connect, migrate
from producers.extractor import run_job
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import (
    ExtractEnv,
    expected_by_key,
    read_topic,
    run_row,
    seed_parents_from_sim,
    truncate,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sim() -> Iterator[SimulatorProcess]:
    # 30 ms per request and two workers: the 315-study fan-out takes ~5 s, long enough to kill it
    with SimulatorProcess(scale=0.002, seed=42, api_key="it-kill-key-Ww2", latency_ms=30) as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str) -> Iterator[Settings]:
    migrate()
    sync(load_catalog())
    with ExtractEnv(sim, f"t{unique}") as s:
        yield s


def running_rows(settings: Settings) -> list[tuple[int, str]]:
    with connect(settings, autocommit=True) as conn:
        return conn.execute("SELECT id, run_status FROM etl.dw_etl_runs WHERE job_id = 10 ORDER BY id").fetchall()


def test_kill_9_midway_is_detected_on_next_start_and_the_rerun_completes(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(10)
    truncate(env, "dim_studies_staging")
    n = seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    sim.reset_stats()
    proc = subprocess.Popen([sys.executable, "-m", "common.cli", "extract", "--job", "10", "--full", "--workers", "2"],
                            cwd=REPO, env={**os.environ, "LOG_FORMAT": "json"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while sim.requests_to(job.endpoint) < 60:
            assert proc.poll() is None, "the extractor finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    calls_at_kill = sim.requests_to(job.endpoint)
    assert calls_at_kill < n
    (killed_id, status), = running_rows(env)
    assert status == "running"  # nobody finished it: the process died

    rerun = run_job(job, mode="full", settings=env)  # the next start
    killed = run_row(env, killed_id)
    assert killed["run_status"] == "failed" and killed["error_class"] == "StaleRun"
    assert f"process {killed['pid']}" in killed["error_message"] and "is gone" in killed["error_message"]
    assert killed["completed_at"] is not None

    assert rerun.status == "success" and rerun.parents_done == n
    expected = set(expected_by_key(sim, job))
    msgs = read_topic(env, K.bronze_topic(job.target_table, env))
    rerun_keys = [m.key for m in msgs if m.headers.get(K.H_RUN_ID) == str(rerun.run_id)]
    assert sorted(rerun_keys) == sorted(expected)
    killed_keys = {m.key for m in msgs if m.headers.get(K.H_RUN_ID) == str(killed_id)}
    assert killed_keys < expected  # what the killed run published is a subset: harmless repeats
    with connect(env, autocommit=True) as conn:
        assert conn.execute("SELECT last_run_id, last_run_status FROM etl.dw_etl_jobs WHERE id = 10").fetchone() == \
            (rerun.run_id, "success")
        # the killed run committed no watermark
        assert conn.execute("SELECT count(*) FROM etl.dw_etl_watermarks WHERE run_id = %s",
                            (killed_id,)).fetchone()[0] == 0


def test_sigterm_records_the_run_as_failed_at_once(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(10)
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    sim.reset_stats()
    proc = subprocess.Popen([sys.executable, "-m", "common.cli", "extract", "--job", "10", "--full", "--workers", "2"],
                            cwd=REPO, env={**os.environ, "LOG_FORMAT": "json"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while sim.requests_to(job.endpoint) < 40:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_id, status), = running_rows(env)
    row = run_row(env, run_id)
    assert status == "failed" and row["error_class"] == "Interrupted"
    assert row["run_context"]["end_offsets"]  # what it did publish is accounted for
