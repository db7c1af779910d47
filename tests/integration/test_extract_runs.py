"""Run bookkeeping in etl.dw_etl_runs: heartbeats while running, and stale-run detection."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import connect, migrate
from producers import runs
from producers.extractor import run_job
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import ExtractEnv, run_row, seed_parents_from_sim, truncate

pytestmark = pytest.mark.integration


@pytest.fixture
def db_only(fresh_db: str) -> Iterator[Settings]:
    from common import config

    migrate()
    sync(load_catalog())
    yield config.get_settings()


def insert_running(settings: Settings, *, host: str, pid: int | None, age_s: float, proc_start: int | None = None,
                   job_id: int = 9) -> int:
    with connect(settings, autocommit=True) as conn:
        ctx = f'{{"proc_start": {proc_start}}}' if proc_start is not None else "{}"
        return conn.execute(
            """INSERT INTO etl.dw_etl_runs (job_id, run_status, host, pid, run_context, started_at, heartbeat_at)
               VALUES (%s, 'running', %s, %s, %s::jsonb, now() - make_interval(secs => %s),
                       now() - make_interval(secs => %s)) RETURNING id""",
            (job_id, host, pid, ctx, age_s, age_s)).fetchone()[0]


def test_stale_detection_rules(db_only: Settings) -> None:
    me = os.getpid()
    dead = insert_running(db_only, host="elsewhere", pid=4242, age_s=runs.STALE_AFTER_SECONDS + 60)
    alive_elsewhere = insert_running(db_only, host="elsewhere", pid=4242, age_s=10)
    gone_here = insert_running(db_only, host=runs.HOST, pid=2 ** 22 + 17, age_s=1)
    reused_pid = insert_running(db_only, host=runs.HOST, pid=me, age_s=1,
                                proc_start=(runs.process_start_time(me) or 0) + 1)
    mine = insert_running(db_only, host=runs.HOST, pid=me, age_s=1, proc_start=runs.process_start_time(me))
    with connect(db_only, autocommit=True) as conn:
        found = {s.run_id: s.reason for s in runs.detect_stale_runs(conn)}
    assert set(found) == {dead, gone_here, reused_pid}
    assert "no heartbeat for" in found[dead]
    assert "is gone" in found[gone_here] and "is gone" in found[reused_pid]
    for rid in (dead, gone_here, reused_pid):
        row = run_row(db_only, rid)
        assert row["run_status"] == "failed" and row["error_class"] == "StaleRun"
        assert row["error_message"].startswith("stale run: ") and row["completed_at"] is not None
    for rid in (alive_elsewhere, mine):
        assert run_row(db_only, rid)["run_status"] == "running"


def test_heartbeat_refreshes_counters_while_running(fresh_db: str, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    migrate()
    sync(load_catalog())
    monkeypatch.setattr(runs, "HEARTBEAT_SECONDS", 0.2)
    with SimulatorProcess(scale=0.002, seed=42, api_key="it-hb-Kk1", latency_ms=20) as sim, \
            ExtractEnv(sim, f"t{unique}") as s:
        truncate(s, "dim_studies_staging")
        seed_parents_from_sim(s, sim, 2, "dim_studies_staging")
        seen: list[tuple] = []
        done = threading.Event()

        def watch() -> None:
            with connect(s, autocommit=True) as conn:
                while not done.is_set():
                    row = conn.execute("SELECT run_status, api_calls, parents_done, heartbeat_at FROM etl.dw_etl_runs "
                                       "WHERE job_id = 10").fetchone()
                    if row:
                        seen.append(row)
                    time.sleep(0.1)

        t = threading.Thread(target=watch)
        t.start()
        try:
            r = run_job(load_catalog(s).get(10), mode="full", settings=s, workers=2)
        finally:
            done.set()
            t.join()
        assert r.status == "success"
        live = [row for row in seen if row[0] == "running" and row[1] > 0]
        assert len({row[3] for row in live}) >= 2  # the heartbeat moved while the run was running
        assert any(0 < row[2] < 315 for row in live)  # parents_done visible mid-run
