"""Fault suite runner: every fault scenario on its own full run of all 72 jobs, then the exact
reconciliation of every staging table with the simulator's ground truth.

    .venv/bin/python -m bench.faults [--scale 0.002] [--only loader_kill,api_storm] \
        [--json faults.json] [--markdown faults.md]

Scenarios (``tests/faults/scenarios.py``): ``loader_kill``, ``loader_kill_2`` (one of two group
members), ``extractor_worker_kill``, ``orchestrator_kill``, ``postgres_restart``,
``broker_restart_memory``, ``broker_restart_durable`` (tansu on an S3 object store: moto's server),
``api_storm``. Each runs on a private embedded stack (one for the memory-broker scenarios, one for
the durable one) with a fresh warehouse database and topic prefix. Above scale 0.01 the runner
takes ``/tmp/trialsync-heavy.lock`` (shared with the other heavy benchmarks) before it starts.

Prints the Markdown table; ``--json``/``--markdown`` also write them to files. Exit code 1 when a
scenario is not exact (missing, duplicated, stale or extra rows) or failed to run.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.faults.lab import Lab  # noqa: E402
from tests.faults.scenarios import (  # noqa: E402
    Outcome,
    api_storm,
    broker_restart,
    extractor_worker_kill,
    loader_kill,
    orchestrator_kill,
    postgres_restart,
)

MEMORY = {
    "loader_kill": loader_kill,
    "loader_kill_2": lambda lab: loader_kill(lab, loaders=2),
    "extractor_worker_kill": extractor_worker_kill,
    "orchestrator_kill": orchestrator_kill,
    "postgres_restart": postgres_restart,
    "broker_restart_memory": broker_restart,
    "api_storm": api_storm,
}
DURABLE = {"broker_restart_durable": broker_restart}
ALL = [*MEMORY, *DURABLE]
HEAVY_LOCK = "/tmp/trialsync-heavy.lock"


@contextlib.contextmanager
def heavy_lock(scale: float) -> Iterator[None]:
    if scale <= 0.01:
        yield
        return
    with open(HEAVY_LOCK, "a") as f:
        print(f"waiting for {HEAVY_LOCK} ...", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(names: list[str], scale: float, seed: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    groups = [(False, [n for n in names if n in MEMORY]), (True, [n for n in names if n in DURABLE])]
    for durable, group in groups:
        if not group:
            continue
        with Lab(scale=scale, seed=seed, durable_broker=durable) as lab:
            for name in group:
                fn = (DURABLE if durable else MEMORY)[name]
                print(f"== {name} (scale {scale}) ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                try:
                    o: Outcome = fn(lab)
                    d = o.as_dict()
                    d["scenario"] = name
                except Exception as e:  # noqa: BLE001 - report it and go on with the next scenario
                    d = {"scenario": name, "error": f"{type(e).__name__}: {e}", "exact": False,
                         "trace": traceback.format_exc()[-3000:], "seconds": round(time.monotonic() - t0, 1)}
                print(json.dumps({k: d.get(k) for k in ("scenario", "exact", "expected", "missing", "duplicated",
                                                         "stale", "extra", "seconds", "error")}),
                      file=sys.stderr, flush=True)
                results.append(d)
    return results


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"Fault suite, scale {meta['scale']} (seed {meta['seed']}), {meta['date']}, {meta['machine']}", "",
             "| scenario | faults injected | healed by | faulted run | expected | missing | duplicated | stale | "
             "extra | rejected (DLQ) | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['scenario']} | **did not run**: {r['error'][:120]} | | | | | | | | | {r['seconds']} |")
            continue
        faults = "; ".join(f.split(": ", 1)[-1] if f.startswith("simulator faults") else f for f in r["faults"])
        if r["scenario"] == "api_storm":
            inj = r["checks"].get("faults_injected") or {}
            faults = "API: " + ", ".join(f"{v}x {k}" for k, v in sorted(inj.items()))
        heal = "; ".join(r["heal"]) or "nothing (healed inside the run)"
        run_s = f"exit {r['run_exit']}, {r['run_status'] or 'killed'}"
        lost = ""
        if r.get("before_heal"):
            b = r["before_heal"]
            lost = f" (before healing: {b['missing']} missing, {b['stale']} stale)"
        lines.append(f"| {r['scenario']} | {faults} | {heal} | {run_s}{lost} | {r['expected']} | {r['missing']} | "
                     f"{r['duplicated']} | {r['stale']} | {r['extra']} | {r['rejected']} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.002)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(ALL)}")
    ap.add_argument("--json", type=Path, help="write the full results here")
    ap.add_argument("--markdown", type=Path, help="write the Markdown table here")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else ALL
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}: choose from {', '.join(ALL)}")
    meta = {"scale": args.scale, "seed": args.seed, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"}
    t0 = time.monotonic()
    with heavy_lock(args.scale):
        results = run(names, args.scale, args.seed)
    meta["total_seconds"] = round(time.monotonic() - t0, 1)
    md = markdown(results, meta)
    print(md)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    if args.markdown:
        args.markdown.write_text(md)
    return 0 if all(r.get("exact") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
