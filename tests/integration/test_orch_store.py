"""The runner's database side against real PostgreSQL: skipped/failed rows, advisory locks across
sessions and processes, reuse lookup; and the status/history/schedule commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from tests.integration.orch_support import insert_run, prepare_warehouse

pytestmark = pytest.mark.integration


@pytest.fixture
def warehouse(fresh_db: str) -> Iterator[psycopg.Connection]:
    prepare_warehouse()
    from common.db import connect

    conn = connect(autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def test_skipped_and_failed_rows(warehouse: psycopg.Connection) -> None:
    from orchestrator.store import DbRunStore

    store = DbRunStore()
    oid = str(uuid.uuid4())
    try:
        store.begin_orchestration(oid, "cli", {"jobs": [2, 10]}, "incremental", 2)
        rid = store.record_skipped(10, oid, "cli", "skipped: parent job 2 (Studies) failed (run 7: HTTP 500)")
        row = warehouse.execute("SELECT run_status, error_message, orchestration_id::text FROM etl.dw_etl_runs "
                                "WHERE id = %s", (rid,)).fetchone()
        assert row == ("skipped", "skipped: parent job 2 (Studies) failed (run 7: HTTP 500)", oid)
        assert warehouse.execute("SELECT last_run_status FROM etl.dw_etl_jobs WHERE id = 10").fetchone() == ("skipped",)
        # a run the child created and never finished (killed): failed with the reason
        running = warehouse.execute(
            """INSERT INTO etl.dw_etl_runs (job_id, run_status, orchestration_id, attempt) VALUES (2, 'running', %s, 1)
               RETURNING id""", (oid,)).fetchone()[0]
        got = store.mark_failed(2, oid, 1, "cli", "JobTimeout", "job 2 (Studies) exceeded its timeout of 5 s")
        assert got == running
        assert warehouse.execute("SELECT run_status, error_class, completed_at IS NOT NULL FROM etl.dw_etl_runs "
                                 "WHERE id = %s", (running,)).fetchone() == ("failed", "JobTimeout", True)
        # no row at all (killed before creating it): one is inserted
        got2 = store.mark_failed(2, oid, 2, "cli", "ProcessDied", "exited with code -9")
        assert got2 != running
        assert warehouse.execute("SELECT run_status, attempt FROM etl.dw_etl_runs WHERE id = %s",
                                 (got2,)).fetchone() == ("failed", 2)
        # a final row is left alone
        assert store.mark_failed(2, oid, 2, "cli", "X", "y") == got2
        store.finish_orchestration(oid, "partial", {"success": 1, "skipped": 1, "records_extracted": 5})
        row = warehouse.execute("SELECT status, jobs_succeeded, jobs_skipped, completed_at IS NOT NULL "
                                "FROM etl.dw_orchestrations WHERE id = %s", (oid,)).fetchone()
        assert row == ("partial", 1, 1, True)
    finally:
        store.close()


def test_advisory_lock_across_sessions_and_processes(warehouse: psycopg.Connection, fresh_db: str) -> None:
    from orchestrator.store import LOCK_CLASS, DbRunStore

    a, b = DbRunStore(), DbRunStore()
    try:
        assert a.try_lock(2) is True
        assert b.try_lock(2) is False
        assert b.try_lock(3) is True
        a.unlock(2)
        assert b.try_lock(2) is True
        b.unlock(2)
        b.unlock(3)
        # another OS process holds the lock: this one cannot take it until that process exits
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time, psycopg\n"
             "c = psycopg.connect(sys.argv[1], autocommit=True)\n"
             f"c.execute('SELECT pg_advisory_lock({LOCK_CLASS}, 2)')\n"
             "print('held', flush=True)\n"
             "time.sleep(60)\n", fresh_db], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            assert a.try_lock(2) is False
        finally:
            holder.kill()
            holder.wait()
        deadline = time.monotonic() + 10
        while not a.try_lock(2):
            assert time.monotonic() < deadline, "lock not released after its session died"
            time.sleep(0.1)
        a.unlock(2)
    finally:
        a.close()
        b.close()


def test_recent_run_finds_only_complete_foreign_runs(warehouse: psycopg.Connection) -> None:
    from orchestrator.store import DbRunStore

    store = DbRunStore()
    mine = str(uuid.uuid4())
    try:
        since = time.time() - 1
        insert_run(warehouse, 2, "success", minutes_ago=10)                 # before `since`
        assert store.recent_run(2, since, mine) is None
        insert_run(warehouse, 2, "success", mode="retry")                  # a retry is not a complete run
        assert store.recent_run(2, since, mine) is None
        warehouse.execute("INSERT INTO etl.dw_orchestrations (id) VALUES (%s)", (mine,))
        insert_run(warehouse, 2, "success", orchestration_id=mine)          # our own
        assert store.recent_run(2, since, mine) is None
        rid = insert_run(warehouse, 2, "partial", mode="incremental")
        assert store.recent_run(2, since, mine) == (rid, "partial")
    finally:
        store.close()


def cli(*args: str) -> tuple[int, str, str]:
    """Run the real `trialsync` command in a subprocess (its own settings, real exit code)."""
    p = subprocess.run([sys.executable, "-m", "common.cli", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_schedule_command(warehouse: psycopg.Connection) -> None:
    code, out, err = cli("schedule", "--job", "2", "--cron", "61 2 * * *")
    assert code == 2, err
    assert "'61 2 * * *'" in err
    code, out, err = cli("schedule", "--job", "Studies", "--cron", "0 2 * *")
    assert code == 2 and "'0 2 * *'" in err and "expected 5" in err
    code, out, err = cli("schedule", "--job", "10", "--cron", "30 3 * * 1")
    assert code == 0, err
    assert "schedule '30 3 * * 1'" in out
    row = warehouse.execute("SELECT schedule, schedule_updated_at IS NOT NULL FROM etl.dw_etl_jobs WHERE id = 10").fetchone()
    assert row == ("30 3 * * 1", True)
    code, out, _ = cli("status", "--job", "10", "--json")
    assert code == 0
    nxt = datetime.fromisoformat(json.loads(out)["next_fire_at"])
    assert nxt.astimezone(UTC).weekday() == 0 and (nxt.hour, nxt.minute) == (3, 30)  # crontab 1 = Monday
    code, out, _ = cli("schedule", "--job", "10", "--clear")
    assert code == 0
    assert warehouse.execute("SELECT schedule FROM etl.dw_etl_jobs WHERE id = 10").fetchone() == (None,)


def test_status_and_history(warehouse: psycopg.Connection) -> None:
    insert_run(warehouse, 2, "success", records=100, minutes_ago=60)
    insert_run(warehouse, 2, "failed", error="HTTP 500", error_class="ServerError", minutes_ago=30)
    last = insert_run(warehouse, 2, "success", records=7, minutes_ago=5)
    code, out, err = cli("status", "--json")
    assert code == 0, err
    rows = {r["job_id"]: r for r in json.loads(out)}
    assert len(rows) == 72
    s2 = rows[2]
    assert s2["last_run_id"] == last and s2["state"] == "success" and s2["records_extracted"] == 7
    assert 0 <= s2["lag_seconds"] < 600
    assert rows[3]["state"] == "never run" and rows[3]["lag_seconds"] is None
    assert rows[2]["next_fire_at"] is not None  # config/jobs.yaml schedules Studies
    code, out, err = cli("history", "--job", "2", "--limit", "2", "--json")
    assert code == 0, err
    hist = json.loads(out)
    assert [h["status"] for h in hist] == ["success", "failed"]
    assert hist[1]["error"] == "HTTP 500"
    code, out, err = cli("history", "--job", "2")
    assert code == 0 and "HTTP 500" in out and "job 2 (Studies)" in out
    code, out, err = cli("status")
    assert code == 0 and "Studies" in out
    code, _, err = cli("history", "--job", "9999")
    assert code != 0 and "unknown job id 9999" in err


def test_run_says_what_is_missing(fresh_db: str) -> None:
    code, _, err = cli("run", "--job", "1")
    assert code != 0 and "trialsync db migrate" in err
    from common.db import migrate

    migrate()
    code, _, err = cli("run", "--job", "1")
    assert code != 0 and "run `trialsync jobs sync`" in err
