"""How long ``trialsync load --once`` of a small table takes, command start to exit (issue 17, point 4).

    .venv/bin/python -m bench.once_bench [--rounds 5]

Its own embedded stack and simulator (scale 0.002), no loader service: each round publishes a
small plain table again (``trialsync extract -j 1 --full``: every record, so the load has work
to do), then times ``trialsync load --once --tables <table>`` in a child process -- Python
start-up and imports included, as a user sees it. Goal: < 1.5 s. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import Harness  # noqa: E402

JOB = 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ns = ap.parse_args(argv)
    from common.catalog import load_catalog

    table = load_catalog().get(JOB).target_table
    h = Harness()
    out: dict[str, object] = {"bench": "load_once", "table": table, "rounds": []}
    try:
        h.up()
        h.start_simulator(0.002)
        h.use_database("bench_once")
        h.use_prefix(f"once{int(time.time())}")
        for _ in range(ns.rounds):
            ext = h.trialsync(["extract", "-j", str(JOB), "--full"])
            if ext.code != 0:
                raise RuntimeError(f"extract exited {ext.code}: {ext.stderr_tail}")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "common.cli", "load", "--once", "--tables", table],
                                  cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"load --once exited {proc.returncode}: {proc.stderr[-2000:]}")
            records = (ext.result or {}).get("records_published")
            out["rounds"].append({"records": records, "seconds": round(wall, 3)})  # type: ignore[union-attr]
        secs = sorted(r["seconds"] for r in out["rounds"])  # type: ignore[union-attr]
        out["median_s"] = secs[len(secs) // 2]
        out["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        h.close()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
