"""Wall time of ``trialsync demo`` (the main job for a new user); prints one JSON document.

    .venv/bin/python -m bench.orch_demo                     # scale 0.01 (the default demo), then a re-run
    .venv/bin/python -m bench.orch_demo --scale 0.002 --parallel 5 --fanout-workers 8

Runs the real command in a fresh state directory (its own embedded PostgreSQL, broker, simulator,
loader, transformer), twice: the first run is a full load, the second an incremental one. Reports
per run: total wall time, the orchestration's own duration, API calls and records, the rate, the
ten slowest jobs, and where the time went (set-up, services, run, transform wait). Stops
everything and deletes the state directory at the end. The machine is shared: numbers are
indicative; the lead re-measures on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _run(env: dict[str, str], args: list[str]) -> tuple[int, float, str]:
    exe = str(Path(sys.executable).parent / "trialsync")
    t = time.perf_counter()
    p = subprocess.run([exe, *args], env=env, cwd=REPO, capture_output=True, text=True)
    return p.returncode, time.perf_counter() - t, p.stdout + p.stderr[-2000:]


def _stats(env: dict[str, str]) -> dict[str, Any]:
    code = r"""
import json, psycopg
from common.stack import database_dsn
c = psycopg.connect(database_dsn())
o = c.execute("SELECT id, status, duration_seconds, records_extracted, records_loaded FROM etl.dw_orchestrations "
              "ORDER BY started_at DESC LIMIT 1").fetchone()
runs = c.execute("SELECT r.job_id, j.name, r.duration_seconds, r.api_calls, r.records_extracted FROM etl.dw_etl_runs r "
                 "JOIN etl.dw_etl_jobs j ON j.id = r.job_id WHERE r.orchestration_id = %s ORDER BY r.duration_seconds DESC",
                 (o[0],)).fetchall()
print(json.dumps({"status": o[1], "orchestration_s": float(o[2]), "records_extracted": o[3], "records_loaded": o[4],
                  "api_calls": sum(r[3] for r in runs), "jobs": len(runs),
                  "slowest": [{"job": r[0], "name": r[1], "s": float(r[2] or 0), "api_calls": r[3],
                               "records": r[4]} for r in runs[:10]]}))
"""
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.01)
    ap.add_argument("--parallel", type=int, default=None)
    ap.add_argument("--fanout-workers", type=int, default=None)
    ap.add_argument("--once", action="store_true", help="skip the incremental re-run")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="trialsync-bench-demo-"))
    state.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "DATABASE_HOST", "KAFKA_BOOTSTRAP_SERVERS", "CC_API_KEY", "CC_API_BASE_URL")}
    env.update({"TRIALSYNC_STATE_DIR": str(state), "COLUMNS": "200"})
    if args.fanout_workers:
        env["ETL_FANOUT_WORKERS"] = str(args.fanout_workers)
    demo = ["demo", "--scale", str(args.scale)] + (["--parallel", str(args.parallel)] if args.parallel else [])
    out: dict[str, Any] = {"scale": args.scale, "parallel": args.parallel, "fanout_workers": args.fanout_workers,
                           "cpus": os.cpu_count(), "load_avg_before": os.getloadavg()[0], "runs": []}
    try:
        for label in ("full", "incremental")[: 1 if args.once else 2]:
            code, wall, text = _run(env, demo)
            entry: dict[str, Any] = {"run": label, "exit_code": code, "wall_s": round(wall, 1)}
            if code == 0:
                entry.update(_stats(env))
                entry["api_calls_per_s"] = round(entry["api_calls"] / max(entry["orchestration_s"], 1e-6))
                entry["records_per_s"] = round(entry["records_extracted"] / max(entry["orchestration_s"], 1e-6))
            else:
                entry["output_tail"] = text[-3000:]
            out["runs"].append(entry)
            out["load_avg_after_" + label] = os.getloadavg()[0]
    finally:
        _run(env, ["demo", "--stop"])
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
