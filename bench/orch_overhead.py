"""What running each extraction in a child process costs; prints one JSON document.

    .venv/bin/python -m bench.orch_overhead            # embedded stack + simulator started here
    .venv/bin/python -m bench.orch_overhead --reps 10

The orchestrator runs every attempt in a forkserver child (orchestrator/launcher.py) so a job that
exceeds its timeout can be killed. This compares, for a small plain job (job 1, Sites) and a small
fan-out job (job 141, Study Arms), the wall time of one run

* ``in_process``: ``producers.extractor.run_job`` called directly (no isolation);
* ``forkserver``: through ``ProcessLauncher`` (a fresh forkserver child per attempt);
* ``pool``: through ``PoolLauncher`` (what ``trialsync run`` does: a warm worker per concurrent job);
* ``subprocess``: ``trialsync extract --job N`` as a fresh interpreter (the alternative design);

and reports the medians and the overhead of the two isolated variants over ``in_process``. The
machine is shared: numbers are indicative.
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
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scale", type=float, default=0.002)
    args = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="trialsync-bench-orch-"))
    state.chmod(0o755)
    os.environ.update({"TRIALSYNC_STATE_DIR": str(state), "ENABLE_METRICS": "false", "LOG_LEVEL": "WARNING",
                       "LOG_FORMAT": "json", "KAFKA_TOPIC_PREFIX": "benchorch"})
    for k in ("DATABASE_URL", "DATABASE_HOST", "KAFKA_BOOTSTRAP_SERVERS"):
        os.environ.pop(k, None)
    from common import config, stack

    config.reset_settings()
    from simulator.testing import SimulatorProcess

    out: dict[str, Any] = {"reps": args.reps, "scale": args.scale, "jobs": {}}
    try:
        stack.up()
        from common.catalog import load_catalog, sync
        from common.db import migrate
        from common.logging import setup_logging

        setup_logging("bench", level="WARNING")
        migrate()
        with SimulatorProcess(scale=args.scale, seed=7, api_key="bench-key") as sim:
            os.environ.update({"CC_API_BASE_URL": sim.base_url, "CC_API_KEY": "bench-key"})
            config.reset_settings()
            catalog = load_catalog()
            sync(catalog)
            from orchestrator.launcher import LaunchRequest, PoolLauncher, ProcessLauncher

            run_job = _extractor()
            run_job(catalog.get(2), mode="full")  # studies: the parents of job 141
            _load_directly(catalog.get(2))  # no loader service here: drain the topic into Bronze once
            launcher = ProcessLauncher()
            pool = PoolLauncher()
            exe = str(Path(sys.executable).parent / "trialsync")
            for job_id in (1, 141):
                job = catalog.get(job_id)
                times: dict[str, list[float]] = {"in_process": [], "forkserver": [], "pool": [], "subprocess": []}
                first_msg: list[float] = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    r = run_job(job, mode="full")
                    times["in_process"].append(time.perf_counter() - t)
                    assert r.status == "success", r.error
                    t = time.perf_counter()
                    first_msg.append(_attempt(launcher, LaunchRequest(job=job, mode="full")))
                    times["forkserver"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    _attempt(pool, LaunchRequest(job=job, mode="full"))
                    times["pool"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    subprocess.run([exe, "extract", "--job", str(job_id), "--full", "--json"], check=True,
                                   capture_output=True, cwd=REPO)
                    times["subprocess"].append(time.perf_counter() - t)
                med = {k: round(statistics.median(v), 4) for k, v in times.items()}
                out["jobs"][str(job_id)] = {
                    "name": job.name, "median_s": med,
                    "overhead_forkserver_s": round(med["forkserver"] - med["in_process"], 4),
                    "overhead_pool_s": round(med["pool"] - med["in_process"], 4),
                    "overhead_subprocess_s": round(med["subprocess"] - med["in_process"], 4),
                    "forkserver_first_message_s": round(statistics.median(first_msg), 4),
                }
            pool.close()
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(out, indent=2))


def _attempt(launcher: Any, request: Any) -> float:
    """Run one attempt through a launcher; return when its first message arrived (s after start)."""
    t = time.perf_counter()
    h = launcher.start(request)
    first = None
    result = None
    while result is None:
        for kind, payload in h.poll():
            if first is None:
                first = time.perf_counter() - t
            if kind in ("result", "error"):
                result = payload
        if result is None:
            time.sleep(0.002)
    h.join(10)
    assert result.get("status", "failed") == "success", result
    return first or 0.0


def _extractor() -> Any:
    from producers.extractor import run_job

    return run_job


def _load_directly(job: Any) -> None:
    """Upsert the topic's records into Bronze without a loader service (bench set-up only)."""
    subprocess.run([str(Path(sys.executable).parent / "trialsync"), "load", "--once", "--tables", job.target_table],
                   check=True, capture_output=True, cwd=REPO, timeout=300)


if __name__ == "__main__":
    main()
