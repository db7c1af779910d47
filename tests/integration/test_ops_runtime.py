"""Never hang, never lie, never cut a number -- the one-shot commands against the real embedded
stack and a real simulator:

* a killed `trialsync extract` is shown ``failed`` by `trialsync status` at once (the same stale-run
  check an extractor makes when it starts), not ``running`` until the job's next extract;
* a Kafka bootstrap that accepts connections but never answers: one clear line within ~10 s, no
  raw librdkafka ``%3|…|FAIL|`` lines;
* `trialsync extract` beside a process holding METRICS_PORT serves /metrics on a free port;
  metrics servers listen on 127.0.0.1 unless METRICS_HOST says otherwise;
* `trialsync status` at 80 columns, piped, shows every number whole.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TRIALSYNC = str(Path(sys.executable).parent / "trialsync")
KEY = "ops-runtime-key"
SITES = 1


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[object]:
    """A simulator answering every request after 3 s: a run of job 1 lasts a few seconds."""
    from simulator.testing import SimulatorProcess

    with SimulatorProcess(scale=0.002, api_key=KEY, latency_ms=3000) as sim:
        yield sim


def _env(stack: dict[str, str], sim: object, **extra: str) -> dict[str, str]:
    env = {**os.environ, "CC_API_BASE_URL": sim.base_url, "CC_API_KEY": KEY,  # type: ignore[attr-defined]
           "LOG_FORMAT": "json", "ENABLE_METRICS": "false",
           "KAFKA_TOPIC_PREFIX": "ops" + str(os.getpid())}
    env.update(extra)
    return env


def _newest_run(stack: dict[str, str], job_id: int) -> tuple[int, str] | None:
    with psycopg.connect(stack["dsn"]) as conn:
        row = conn.execute("SELECT id, run_status FROM etl.dw_etl_runs WHERE job_id = %s ORDER BY id DESC LIMIT 1",
                           (job_id,)).fetchone()
    return (int(row[0]), str(row[1])) if row else None


# -- 3: a killed run -------------------------------------------------------------------------------

def test_status_shows_a_killed_run_failed(stack: dict[str, str], slow_sim: object) -> None:
    before = _newest_run(stack, SITES)
    proc = subprocess.Popen([TRIALSYNC, "extract", "--job", str(SITES), "--full"], env=_env(stack, slow_sim),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            run = _newest_run(stack, SITES)
            if run is not None and run != before and run[1] == "running":
                break
            assert proc.poll() is None and time.monotonic() < deadline, "the extract never started its run"
            time.sleep(0.2)
        time.sleep(0.5)  # mid-run: the first page is still on its way
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert _newest_run(stack, SITES) == (run[0], "running")  # what a kill -9 leaves behind
    out = subprocess.run([TRIALSYNC, "status", "--job", str(SITES), "--json"], env=_env(stack, slow_sim), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["last_run_id"] == run[0]
    assert row["state"] == "failed", row
    assert "is gone (killed or crashed while running)" in row["error"]
    assert _newest_run(stack, SITES) == (run[0], "failed")


# -- 4: a broker that does not answer --------------------------------------------------------------

@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A TCP port that accepts connections and never says a word (a hung broker, a wrong service)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        srv.close()


def test_a_silent_broker_is_one_clear_line_within_seconds(stack: dict[str, str], slow_sim: object,
                                                         silent_broker: str) -> None:
    t0 = time.monotonic()
    out = subprocess.run([TRIALSYNC, "extract", "--job", str(SITES)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=_env(stack, slow_sim, KAFKA_BOOTSTRAP_SERVERS=silent_broker))
    elapsed = time.monotonic() - t0
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert f"broker at {silent_broker} is not reachable: no answer within 8 s" in errors[0]
    assert "KAFKA_BOOTSTRAP_SERVERS" in errors[0]
    raw = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("%")]
    assert raw == [], raw[:3]
    assert elapsed < 25, elapsed  # was 75 s per attempt (8 s answer timeout + process start-up here)
    assert "failed" in out.stdout


# -- 13 / 18: metrics of one-shot commands, and where they listen -----------------------------------

def _listen_address(port: int) -> str | None:
    """Local address a LISTEN socket on ``port`` is bound to, from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        addr, p = f[1].split(":")
        if int(p, 16) == port and f[3] == "0A":
            return ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return None


def test_extract_beside_a_busy_metrics_port_takes_a_free_one(stack: dict[str, str], slow_sim: object) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    proc = subprocess.Popen([TRIALSYNC, "extract", "--job", str(SITES), "--full"], cwd=REPO, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=_env(stack, slow_sim, ENABLE_METRICS="true", METRICS_PORT=str(port)))
    try:
        served = None
        assert proc.stderr is not None
        for line in proc.stderr:
            ev = json.loads(line) if line.startswith("{") else {}
            if ev.get("event") == "metrics_port_in_use":
                assert ev["port"] == port
                served = int(ev["serving_port"])
                break
        assert served and served != port
        body = requests.get(f"http://127.0.0.1:{served}/metrics", timeout=10)
        assert body.status_code == 200 and "trialsync_job_runs_started_total" in body.text
        assert _listen_address(served) == "127.0.0.1"
        rest = proc.communicate(timeout=300)[1]
        assert proc.returncode == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
        busy.close()


@pytest.mark.parametrize(("host", "expect"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_service_metrics_listen_on_loopback_unless_configured(stack: dict[str, str], host: str | None,
                                                               expect: str) -> None:
    from common.stack import free_port

    port = free_port()
    env = {**os.environ, "ENABLE_METRICS": "true", "METRICS_PORT": str(port), "KAFKA_TOPIC_PREFIX": f"m{port}"}
    env.pop("METRICS_HOST", None)
    if host:
        env["METRICS_HOST"] = host
    proc = subprocess.Popen([TRIALSYNC, "transform"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while _listen_address(port) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the transformer never served metrics"
            time.sleep(0.2)
        assert _listen_address(port) == expect
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)


# -- 19: numbers are never cut ---------------------------------------------------------------------

BIG = {2: (11_456_789, 56_123_456), 9: (2_297_271_000, 2_297_271_000), 1: (7, 5)}


def test_status_at_80_columns_shows_every_number_whole(fresh_db: str) -> None:
    from common.catalog import load_catalog, sync
    from common.db import migrate

    migrate()
    sync(load_catalog())
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        for job, (extracted, loaded) in BIG.items():
            conn.execute("INSERT INTO etl.dw_etl_runs (job_id, run_status, mode, trigger, records_extracted, "
                         "records_published, records_loaded, completed_at, duration_seconds, load_completed_at) "
                         "VALUES (%s, 'success', 'full', 'test', %s, %s, %s, now(), 7384.5, now())",
                         (job, extracted, extracted, loaded))
    for columns in ("80", "60", "40"):
        out = subprocess.run([TRIALSYNC, "status"], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLUMNS": columns})
        assert out.returncode == 0, out.stderr
        text = out.stdout
        for extracted, loaded in BIG.values():
            assert f"{extracted:,}" in text and f"{loaded:,}" in text, (columns, text)
        assert "2h03m" in text and not re.search(r"[\d,]…", text), text  # names may shorten, numbers never
        if columns == "80":  # a table that fits, headers whole, names shortened where needed
            assert max(len(line) for line in text.splitlines()) <= 80, text
            for header in ("extracted", "loaded", "duration", "state"):
                assert header in text, text
        else:  # too narrow for a table: one line per job, nothing cut
            assert "job 9 (PatientVisits): success, run " in text and "2,297,271,000 extracted" in text, text
