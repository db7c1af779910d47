"""History API latency/throughput and /metrics scrape cost, printed as JSON.

    .venv/bin/python -m bench.observability_bench [--runs 100000] [--rejects 50000] [--seconds 5]
        [--clients 4] [--out FILE]

* ``api``: a temporary embedded PostgreSQL (own state dir) migrated and synced, ``--runs`` rows in
  ``etl.dw_etl_runs`` spread over the 72 active jobs and a year, ``--rejects`` rejects on a few
  runs; ``trialsync api`` served by uvicorn in a child process; ``--clients`` keep-alive clients
  per scenario for ``--seconds``: requests/s and p50/p95/p99 latency for the first page of runs,
  job+status filter, a one-week window, a deep page (offset 90 % of the table), run detail with
  rejects, a rejects page, and the job list.
* ``scrape``: /metrics of one process at production cardinality (90 jobs x statuses and duration
  buckets, 88 tables x outcomes, 200 endpoint templates with latency histograms, 88 x 3 lag
  partitions): body size and generation time.

Numbers on the shared 2-core machine are indicative; the lead re-measures on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def _seed(settings: Any, runs: int, rejects: int) -> dict[str, Any]:
    from common.catalog import load_catalog, sync
    from common.db import connect, migrate

    migrate(settings)
    catalog = load_catalog(settings)
    sync(catalog, settings)
    jobs = sorted(j.id for j in catalog.runnable)
    with connect(settings) as conn, conn.transaction():
        conn.execute(
            """INSERT INTO etl.dw_etl_runs (job_id, run_status, mode, records_extracted, records_published,
                   records_loaded, started_at, completed_at, duration_seconds, error_class, error_message)
               SELECT (%s::int[])[1 + i %% array_length(%s::int[], 1)],
                      CASE WHEN i %% 50 = 0 THEN 'failed' WHEN i %% 23 = 0 THEN 'partial' ELSE 'success' END,
                      'incremental', 1000 + i %% 777, 1000 + i %% 777, 1000 + i %% 700,
                      timestamptz '2025-01-01' + (i * interval '1 year' / %s),
                      timestamptz '2025-01-01' + (i * interval '1 year' / %s) + interval '42 seconds', 42,
                      CASE WHEN i %% 50 = 0 THEN 'ApiError' END, CASE WHEN i %% 50 = 0 THEN 'HTTP 500' END
                 FROM generate_series(1, %s) AS i""", (jobs, jobs, runs, runs, runs))
        conn.execute(
            """INSERT INTO etl.dw_etl_rejects (table_name, topic, kafka_partition, kafka_offset, record_key, job_id,
                   run_id, stage, error_class, error_message, payload)
               SELECT 'dim_subjects_staging', 'trialsync.bronze.dim_subjects_staging', i %% 3, i, 'cc1:' || i,
                      NULL, 1 + (i %% 20) * 50, 'load', 'InvalidJson', 'value is not JSON', '{"broken": ' || i
                 FROM generate_series(1, %s) AS i""", (rejects,))
        conn.execute("ANALYZE etl.dw_etl_runs")
        conn.execute("ANALYZE etl.dw_etl_rejects")
    return {"jobs": jobs}


def _load(url: str, seconds: float, clients: int) -> dict[str, float]:
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        s = requests.Session()
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            r = s.get(url, timeout=30)
            mine.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors[0] += 1
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {"requests_per_s": round(len(lat) / wall, 1), "p50_ms": round(_pct(lat, 0.5) * 1000, 2),
            "p95_ms": round(_pct(lat, 0.95) * 1000, 2), "p99_ms": round(_pct(lat, 0.99) * 1000, 2),
            "requests": len(lat), "errors": errors[0]}


def bench_api(runs: int, rejects: int, seconds: float, clients: int) -> dict[str, Any]:
    from common import stack
    from common.config import load_settings

    sd = Path(tempfile.mkdtemp(prefix="trialsync-bench-obs-"))
    sd.chmod(0o755)
    settings = load_settings(trialsync_state_dir=sd, database_url=None, database_host=None)
    proc = None
    try:
        stack.start_postgres(settings)
        st = stack.read_state(settings)
        st = stack.start_postgres(settings, st)
        stack.write_state(st, settings)
        t0 = time.monotonic()
        info = _seed(settings, runs, rejects)
        seed_s = time.monotonic() - t0
        port = stack.free_port()
        env = {**os.environ, "TRIALSYNC_STATE_DIR": str(sd), "ENABLE_METRICS": "false", "LOG_FORMAT": "json"}
        for k in ("DATABASE_URL", "DATABASE_HOST", "API_TOKEN"):
            env.pop(k, None)
        proc = subprocess.Popen([sys.executable, "-m", "common.cli", "api", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(base + "/jobs", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        job = info["jobs"][3]
        scenarios = {
            "runs_first_page": f"{base}/runs?limit=100",
            "runs_job_status": f"{base}/runs?job_id={job}&status=success&limit=100",
            "runs_one_week": f"{base}/runs?since=2025-06-01T00:00:00Z&until=2025-06-08T00:00:00Z&limit=100",
            "runs_deep_offset": f"{base}/runs?limit=100&offset={int(runs * 0.9)}",
            "run_detail_with_rejects": f"{base}/runs/51",
            "rejects_page": f"{base}/runs/51/rejects?limit=100&offset=1000",
            "jobs_list": f"{base}/jobs?limit=100",
        }
        out = {name: _load(url, seconds, clients) for name, url in scenarios.items()}
        return {"runs": runs, "rejects": rejects, "clients": clients, "seconds_each": seconds,
                "seed_seconds": round(seed_s, 2), "scenarios": out}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        stack.down(settings)
        shutil.rmtree(sd, ignore_errors=True)


def bench_scrape() -> dict[str, Any]:
    from prometheus_client import generate_latest

    from common import metrics as m

    for j in range(1, 91):
        m.JOB_RUNS_STARTED.labels(job_id=str(j)).inc()
        for st in ("success", "partial", "failed", "skipped"):
            m.JOB_RUNS.labels(job_id=str(j), status=st).inc()
        m.JOB_DURATION.labels(job_id=str(j)).observe(42)
        m.JOB_TIMEOUT.labels(job_id=str(j)).set(300)
        m.JOB_LAST_SUCCESS.labels(job_id=str(j)).set(time.time())
    for t in range(88):
        table = f"dim_table_{t}_staging"
        for metric in (m.RECORDS_EXTRACTED, m.RECORDS_PUBLISHED):
            metric.labels(table=table).inc(1000)
        for o in ("inserted", "updated", "unchanged", "deleted"):
            m.RECORDS_LOADED.labels(table=table, outcome=o).inc()
        m.BATCH_SIZE.labels(table=table).observe(5000)
        m.FLUSH_DURATION.labels(table=table).observe(0.1)
        m.LOAD_LAG.labels(table=table).observe(0.5)
        for p in range(3):
            m.CONSUMER_LAG.labels(group="trialsync-loader", topic=f"trialsync.bronze.{table}", partition=str(p)).set(0)
    for e in range(200):
        ep = f"/api/v1/endpoint_{e}/{{id}}/odata"
        m.API_REQUESTS.labels(endpoint=ep, status_class="2xx").inc()
        m.API_LATENCY.labels(endpoint=ep).observe(0.1)
    times = []
    size = 0
    for _ in range(50):
        t0 = time.perf_counter()
        body = generate_latest(m.registry_for_scrape())
        times.append(time.perf_counter() - t0)
        size = len(body)
    return {"series_lines": body.decode().count("\n"), "bytes": size,
            "generate_ms_p50": round(statistics.median(times) * 1000, 2),
            "generate_ms_max": round(max(times) * 1000, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--rejects", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--only", default="api,scrape")
    ap.add_argument("--out")
    a = ap.parse_args()
    result: dict[str, Any] = {"bench": "observability", "host_cpus": os.cpu_count()}
    only = set(a.only.split(","))
    if "scrape" in only:
        result["scrape"] = bench_scrape()
    if "api" in only:
        result["api"] = bench_api(a.runs, a.rejects, a.seconds, a.clients)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
