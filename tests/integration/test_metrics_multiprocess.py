"""Forked workers (``trialsync load --workers N``) share one /metrics: with PROMETHEUS_MULTIPROC_DIR
set, the parent's MetricsServer aggregates every worker's samples (counters add up, live gauges sum
over live workers and drop dead ones). Runs in a fresh interpreter because prometheus-client picks
its storage when it is first imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, os, sys, urllib.request
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from prometheus_client import multiprocess
    from common.metrics import CONSUMER_LAG, DB_POOL, FLUSH_DURATION, RECORDS_LOADED, MetricsServer

    def scrape(port):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return [line for line in text.splitlines() if line.startswith("trialsync_")]

    children = []
    for i in range(3):
        r, w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            RECORDS_LOADED.labels(table="dim_mp_staging", outcome="inserted").inc(5)
            DB_POOL.labels(pool="loader", state="in_use").set(2)
            CONSUMER_LAG.labels(group="g", topic="t", partition=str(i)).set(10 * (i + 1))
            FLUSH_DURATION.labels(table="dim_mp_staging").observe(0.05)
            os.write(done_w, b"x")
            os.read(r, 1)          # stay alive until the parent has scraped
            os._exit(0)
        os.read(done_r, 1)
        children.append((pid, w))
    srv = MetricsServer(0, "loader", {}, host="127.0.0.1").start()
    alive = scrape(srv.port)
    for pid, w in children:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        multiprocess.mark_process_dead(pid)
    dead = scrape(srv.port)
    srv.stop()
    print(json.dumps({"alive": alive, "dead": dead}))
''')


def test_forked_workers_are_aggregated(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    alive, dead = out["alive"], out["dead"]
    assert 'trialsync_records_loaded_total{outcome="inserted",table="dim_mp_staging"} 15.0' in alive
    assert 'trialsync_db_pool_connections{pool="loader",state="in_use"} 6.0' in alive
    lags = sorted(line for line in alive if line.startswith("trialsync_consumer_lag_messages"))
    assert [line.rsplit(" ", 1)[1] for line in lags] == ["10.0", "20.0", "30.0"]
    assert 'trialsync_loader_flush_duration_seconds_count{table="dim_mp_staging"} 3.0' in alive
    # counters survive their workers; live gauges disappear with them
    assert 'trialsync_records_loaded_total{outcome="inserted",table="dim_mp_staging"} 15.0' in dead
    assert not [line for line in dead if line.startswith("trialsync_db_pool_connections{")
                and not line.endswith(" 0.0")]
    # a dead worker's lag must not linger: its partitions are reported by whoever took them over
    assert not [line for line in dead if line.startswith("trialsync_consumer_lag_messages{")]
