"""`trialsync demo --scale 0.002` end to end, as a new user runs it: its own embedded stack,
simulator, loader and transformer; all 72 jobs; Bronze reconciled exactly against the simulator's
ground truth for every job; after `demo --stop` (the embedded broker loses its topics) a second
run is incremental and still exact; `--stop` ends it all."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests

from tests.integration.orch_pipeline import REPO, TRIALSYNC, reconcile, require_pipeline_modules

pytestmark = [pytest.mark.integration, pytest.mark.slow]
require_pipeline_modules()
SCALE = "0.002"


class AdminClient:
    """Ground truth from the demo's running simulator (its admin API, loopback only)."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url

    def expected(self, endpoint_template: str | None = None, *, job: int | None = None) -> list[dict[str, Any]]:
        params = {"job": job} if job is not None else {"endpoint": endpoint_template}
        r = requests.get(f"{self.admin_url}/expected", params=params, timeout=120)
        r.raise_for_status()
        return [json.loads(line) for line in r.iter_lines() if line]


@pytest.fixture(scope="module")
def demo_env() -> Iterator[dict[str, str]]:
    state = Path(tempfile.mkdtemp(prefix="trialsync-demo-test-"))
    state.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "DATABASE_HOST", "KAFKA_BOOTSTRAP_SERVERS", "CC_API_KEY", "CC_API_BASE_URL",
                        "KAFKA_TOPIC_PREFIX", "ENABLE_METRICS", "LOG_FORMAT")}
    env.update({"TRIALSYNC_STATE_DIR": str(state), "COLUMNS": "160",
                # the durable default costs ~2x the time here; it has its own tests (test_broker_durable.py)
                "TRIALSYNC_BROKER_STORAGE": os.environ.get("TRIALSYNC_TEST_BROKER_STORAGE", "memory")})
    try:
        yield env
    finally:
        subprocess.run([TRIALSYNC, "demo", "--stop"], env=env, cwd=REPO, capture_output=True, timeout=180)
        shutil.rmtree(state, ignore_errors=True)


def demo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRIALSYNC, "demo", "--scale", SCALE, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=1200)


def demo_to_one_file(env: dict[str, str], path: Path) -> subprocess.CompletedProcess[str]:
    """`trialsync demo > out.txt 2>&1`, as a user saving what they saw."""
    with open(path, "w") as out:
        proc = subprocess.run([TRIALSYNC, "demo", "--scale", SCALE], env=env, cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, text=True, timeout=1200)
    return subprocess.CompletedProcess(proc.args, proc.returncode, path.read_text(), "")


def dsn(env: dict[str, str]) -> str:
    """The superuser's DSN of the demo's embedded server (its password lives in the state dir)."""
    from common.config import load_settings
    from common.stack import database_dsn

    return database_dsn(load_settings(trialsync_state_dir=Path(env["TRIALSYNC_STATE_DIR"])), login="admin")


def services(env: dict[str, str]) -> dict[str, Any]:
    return json.loads((Path(env["TRIALSYNC_STATE_DIR"]) / "services.json").read_text())


def check_exact(env: dict[str, str]) -> tuple[psycopg.Connection, Any]:
    from schemas.jobs import JobCatalog

    catalog = JobCatalog.load(overrides_path=REPO / "config" / "jobs.yaml")
    conn = psycopg.connect(dsn(env), autocommit=True)
    conn.execute("SET search_path TO etl, bronze, silver, gold, public")
    sim = AdminClient(services(env)["simulator"]["urls"]["admin"])
    ids = [j.id for j in catalog.runnable]
    assert len(ids) == 72
    problems = reconcile(conn, sim, catalog, ids)
    assert problems == {}, problems
    return conn, catalog


def last_orchestration(conn: psycopg.Connection) -> tuple[Any, ...]:
    row = conn.execute("""SELECT id, status, jobs_total, jobs_succeeded, records_extracted, records_loaded
                            FROM etl.dw_orchestrations ORDER BY started_at DESC LIMIT 1""").fetchone()
    assert row is not None
    return tuple(row)


def test_demo_end_to_end_then_incremental_then_stop(demo_env: dict[str, str]) -> None:
    t0 = time.monotonic()
    first = demo_to_one_file(demo_env, Path(demo_env["TRIALSYNC_STATE_DIR"]) / "out.txt")
    first_s = time.monotonic() - t0
    assert first.returncode == 0, first.stdout[-4000:]
    out = first.stdout
    assert "TrialSync demo (full run): success -- 72 jobs" in out
    assert "72 succeeded, 0 partial, 0 failed, 0 skipped" in out
    for hint in ("trialsync status", "psql postgresql://trialsync_reader@127.0.0.1:", "PGPASSFILE=", "/metrics",
                 "trialsync demo --stop", "silver.dim_studies", "gold.v_study_enrollment_summary"):
        assert hint in out, hint
    # stdout and stderr in one file read cleanly: the machine log went to the log file
    json_lines = [ln for ln in out.splitlines() if ln.lstrip().startswith("{")]
    assert json_lines == [], json_lines[:3]
    demo_log = (Path(demo_env["TRIALSYNC_STATE_DIR"]) / "logs" / "demo.log").read_text().splitlines()
    assert demo_log and all(ln.startswith("{") for ln in demo_log)
    # the printed read-only login works, and is read-only
    line = next(ln for ln in out.splitlines() if "PGPASSFILE=" in ln)
    pgpass, reader = re.search(r"PGPASSFILE=(\S+) psql (\S+)", line).groups()  # type: ignore[union-attr]
    host, port, db, user, password = Path(pgpass).read_text().strip().split(":")
    assert user == "trialsync_reader" and password not in out
    with psycopg.connect(reader, password=password) as rc:
        assert rc.execute("SELECT count(*) FROM silver.dim_studies").fetchone()[0] > 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            rc.execute("DELETE FROM silver.dim_studies")
    report = re.search(r"run report\s+│?\s*(\S+\.html)", out)
    assert report and Path(report.group(1)).is_file(), "the closing panel points to the written run report"
    conn, catalog = check_exact(demo_env)
    try:
        oid, status, total, ok, extracted, loaded = last_orchestration(conn)
        assert (status, total, ok) == ("success", 72, 72)
        assert extracted == loaded > 0
        runs = conn.execute("SELECT count(*), count(*) FILTER (WHERE run_status = 'success' AND load_completed_at "
                            "IS NOT NULL) FROM etl.dw_etl_runs WHERE orchestration_id = %s", (oid,)).fetchone()
        assert runs == (72, 72)
        silver = conn.execute("SELECT count(*) FROM silver.dim_studies WHERE is_current").fetchone()
        bronze = conn.execute("SELECT count(*) FROM bronze.dim_studies_staging").fetchone()
        assert silver and bronze and silver[0] == bronze[0] > 0
        # the throwaway API key reached the children, never the screen, the logs or the state files
        sim_pid = services(demo_env)["simulator"]["pid"]
        key = dict(kv.split("=", 1) for kv in Path(f"/proc/{sim_pid}/environ").read_text().split("\0") if "=" in kv)[
            "SIM_API_KEY"]
        assert len(key) >= 24
        assert key not in first.stdout + first.stderr
        for f in Path(demo_env["TRIALSYNC_STATE_DIR"]).rglob("*"):
            if f.is_file() and f.suffix in (".log", ".json"):
                assert key.encode() not in f.read_bytes(), f

        # the user stops everything (the embedded broker loses its topics) and runs the demo again
        conn.close()
        stopped = subprocess.run([TRIALSYNC, "demo", "--stop"], env=demo_env, cwd=REPO, capture_output=True,
                                 text=True, timeout=180)
        assert stopped.returncode == 0, stopped.stderr
        t1 = time.monotonic()
        second = demo(demo_env)
        second_s = time.monotonic() - t1
        assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
        assert "TrialSync demo (incremental run): success -- 72 jobs" in second.stdout
        # the night: a day of realistic activity passed in the simulator first, and the summary tells it
        assert "a night passes at the simulated sites" in second.stdout
        for title in ("the night in Bronze", "SCD2 versions opened", "how Gold moved"):
            assert title in second.stdout, title
        conn, _ = check_exact(demo_env)  # the restarted simulator (same seed + the night) and Bronze agree
        night = json.loads((Path(demo_env["TRIALSYNC_STATE_DIR"]) / "demo.json").read_text())["nights"]
        assert len(night) == 1 and night[0]["clock"] == "2025-12-02T00:00:00.000Z"
        # what the summary says changed in Bronze is what changed: rows touched by the second orchestration
        started = conn.execute("SELECT started_at FROM etl.dw_orchestrations ORDER BY started_at DESC LIMIT 1").fetchone()[0]
        changed = conn.execute("SELECT count(*) FROM bronze.dim_patient_visits_staging WHERE updated_at >= %s",
                               (started,)).fetchone()[0]
        line = next(ln for ln in second.stdout.splitlines() if "dim_patient_visits_staging" in ln and "│" in ln)
        cells = [c.strip() for c in line.split("│") if c.strip()]
        assert changed > 0 and int(cells[1].replace(",", "")) + int(cells[2].replace(",", "")) == changed
        oid2, status2, _, ok2, extracted2, _ = last_orchestration(conn)
        assert oid2 != oid and (status2, ok2) == ("success", 72)
        assert extracted2 < extracted  # incremental: filtered by the watermarks
        modes = dict(conn.execute("SELECT mode, count(*) FROM etl.dw_etl_runs WHERE orchestration_id = %s "
                                  "GROUP BY mode", (oid2,)).fetchall())
        assert modes.get("incremental", 0) > 0
        status_json = subprocess.run([TRIALSYNC, "status", "--json"], env=demo_env, cwd=REPO, capture_output=True,
                                     text=True, timeout=120)
        assert status_json.returncode == 0
        rows = json.loads(status_json.stdout)
        assert len(rows) == 72 and {r["state"] for r in rows} == {"success"}
    finally:
        conn.close()
    pids = [int(v["pid"]) for v in services(demo_env).values()]
    stop = subprocess.run([TRIALSYNC, "demo", "--stop"], env=demo_env, cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert stop.returncode == 0, stop.stderr
    assert re.search(r"stopped: .*simulator", stop.stdout)
    from common.stack import pid_alive

    assert not any(pid_alive(p) for p in pids)
    print(f"\ndemo --scale {SCALE}: first run {first_s:.1f} s, incremental re-run {second_s:.1f} s")
