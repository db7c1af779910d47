"""What a night costs: a full run against incremental nights, in API calls and seconds, each run
reconciled key by key against the simulator (0 missing, 0 duplicated, 0 stale), and a projection to
production volumes.

    .venv/bin/python -m bench.nights                       # scale 0.05, both change models
    .venv/bin/python -m bench.nights --scale 0.1 --out-dir bench/results

One embedded stack and simulator (bench.harness), a loader service, then:

1. ``trialsync doctor --sources``: the cheaper list sources the simulator can be trusted with are
   switched on (``source: list`` in a generated jobs file), as an operator would after the check;
2. ``trialsync run --all --full``: the first load;
3. a first night after a 1 % uniform change (``verify``): the ``changed`` fan-out policy checks
   its assumption before trusting it, so this night asks every parent and sorts the child changes
   it finds into announced on their parents or not (by timestamp, or by content for jobs without
   a watermark); a job with nothing unannounced is trusted from then on -- reported on its own,
   it is paid once;
4. one night per change model, each after its own ~1 % change (``/_sim/mutate``): ``uniform``
   (1 % of every entity's records, anywhere) and ``realistic`` (days of site activity on active
   studies until 1 % of all records changed), CC moving a parent's timestamp when a child changes
   (the assumption the ``changed`` fan-out policy relies on, checked by its sweep);
5. the realistic night again with the parents *not* touched (the assumption fails): the sweep finds
   the changes it was not told about and the guard makes the next night ask every parent -- what
   that costs, and that nothing is lost;
6. every run reconciled; the calls per job projected to scale 1.0 (calls scale with the records)
   at 10, 50 and 200 requests/s, and the nights a first load takes in an 8-hour window.

Targets (issue 15): realistic night <= 0.05 of the full run's calls and <= 0.10 of its time;
uniform night <= 0.15 of its calls. Numbers, not assertions: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import Harness, orchestration_stats  # noqa: E402

RATES = (10, 50, 200)
WINDOW_HOURS = 8


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def trusted_sources(h: Harness) -> dict[str, Any]:
    """``trialsync doctor --sources`` on the simulator; a jobs file switching the trusted ones on."""
    run = h.trialsync(["doctor", "--sources", "--sample", "10"])
    verdicts = (run.result or {}).get("jobs", [])
    trusted = [v["job_id"] for v in verdicts if v.get("trusted")]
    write_jobs_file(h, {j: {"source": "list"} for j in trusted})
    return {"checked": [v["job_id"] for v in verdicts], "trusted": trusted,
            "untrusted": {str(v["job_id"]): v.get("error") or v.get("differences") for v in verdicts
                          if not v.get("trusted")}}


def write_jobs_file(h: Harness, overrides: dict[int, dict[str, str]]) -> None:
    jobs_file = h.state / "jobs.yaml"
    lines = "".join(f"  {j}: {{{', '.join(f'{k}: {v}' for k, v in o.items())}}}\n" for j, o in sorted(overrides.items()))
    jobs_file.write_text("jobs:\n" + lines if lines else "")
    os.environ["ETL_JOBS_FILE"] = str(jobs_file)


def night(h: Harness, args: list[str]) -> dict[str, Any]:
    """One ``trialsync run`` (waits for the load), its calls from the simulator, its reconciliation."""
    h.sim_reset_stats()
    t0 = time.perf_counter()
    run = h.trialsync(["run", *args, "--wait-load"])
    wall = time.perf_counter() - t0
    if run.result is None:
        raise RuntimeError(f"`trialsync run {' '.join(args)}` exited {run.code}: {run.stderr_tail}")
    oid = run.result["orchestration_id"]
    with h.connect() as conn:
        stats = orchestration_stats(conn, oid)
        per_job = {str(r[0]): {"api_calls": int(r[1]), "kind": r[2], "fanout": r[3]} for r in conn.execute(
            """SELECT r.job_id, sum(r.api_calls), max(CASE WHEN j.requires_parameters THEN 'fan-out' ELSE 'plain' END),
                      (array_agg(r.run_context->'fanout' ORDER BY r.id DESC))[1]
                 FROM etl.dw_etl_runs r JOIN etl.dw_etl_jobs j ON j.id = r.job_id
                WHERE r.orchestration_id = %s GROUP BY r.job_id""", (oid,)).fetchall()}
    return {"orchestration_id": oid, "status": run.result["status"], "api_calls": h.sim_api_calls(), "wall_s": round(wall, 1),
            "first_request_to_last_commit_s": stats["first_request_to_last_commit_s"],
            "records_extracted": stats["records_extracted"], "records_loaded": stats["records_loaded"],
            "not_ok": {str(j["job_id"]): j.get("error") or j.get("reason") or j["status"]
                       for j in run.result["jobs"] if j["status"] != "success"},
            "per_job": per_job, "reconciliation": reconcile(h)}


def reconcile(h: Harness) -> dict[str, Any]:
    from common.catalog import load_catalog
    from simulator.reconcile import reconcile as rec

    catalog = load_catalog()
    with h.connect() as conn:
        r = rec(conn, h.sim_admin, catalog, [j.id for j in catalog.runnable])
    t = r.totals
    # rows whose own timestamp is current but which embed a preview of another record that changed
    # (a staff member's name inside a query): no timestamp filter can see them; the fan-out sweep
    # and full runs refresh them (docs/extraction.md). Everything else must be exact every night.
    changes_lost = t["missing"] + t["duplicated"] + t["extra"] + t["stale"] - t["stale_refs"]
    return {**t, "exact": r.exact, "exact_but_embedded_refs": changes_lost == 0, "problems": r.problems()}


def change(h: Harness, model: str, touch: bool) -> dict[str, Any]:
    """~1 % of the records change, the way ``model`` says."""
    if model == "realistic":
        res = h.sim_post("/mutate", {"model": "realistic", "fraction": 0.01, "touch_parents": touch})
        return {"model": model, "touch_parents": touch, "changed": res.get("changed"), "share": res.get("share"),
                "days": res.get("days")}
    h.sim_post("/clock", {"advance_seconds": 86400})
    changed = 0
    for name in h.sim_get("/entities"):
        try:
            res = h.sim_post("/mutate", {"entity": name, "modify": 0.01, "touch_parents": touch})
        except RuntimeError:  # an entity with nothing to modify (plain lookup values)
            continue
        changed += len(res.get("modified") or [])
    return {"model": model, "touch_parents": touch, "changed": changed}


def projection(full: dict[str, Any], nights: dict[str, dict[str, Any]], scale: float) -> dict[str, Any]:
    """Calls at scale 1.0 (calls grow with the records: parents for fan-out jobs, pages for the
    others), hours at 10/50/200 req/s, and the nights a first load takes in an 8-hour window."""
    def at(calls: float) -> dict[str, Any]:
        return {f"{r}_rps": {"hours": round(calls / r / 3600, 2),
                             "nights_in_8h": math.ceil(calls / (r * WINDOW_HOURS * 3600))} for r in RATES}

    prod_full = full["api_calls"] / scale
    out: dict[str, Any] = {"scale_measured": scale, "full_run": {"calls": round(prod_full), **at(prod_full)}}
    for name, n in nights.items():
        prod = n["api_calls"] / scale
        out[name] = {"calls": round(prod), **at(prod)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    ns = ap.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    res: dict[str, Any] = {"bench": "nights", "scale": ns.scale, "started": stamp}
    h = Harness()
    t0 = time.monotonic()
    try:
        h.up()
        log(f"simulator at scale {ns.scale}")
        h.start_simulator(ns.scale)
        h.use_database("bench_nights")
        h.use_prefix(f"nights{int(time.time())}")
        h.start_loader()
        log("doctor --sources: which cheaper sources to trust")
        res["sources"] = trusted_sources(h)
        log(f"first load: run --all --full (sources: {res['sources']['trusted']})")
        full = night(h, ["--all", "--full"])
        res["full"] = full
        nights: dict[str, dict[str, Any]] = {}
        for name, model, touch in (("verify", "uniform", True),
                                   ("uniform", "uniform", True), ("realistic", "realistic", True),
                                   ("realistic_untouched", "realistic", False),
                                   ("after_guard", "realistic", True)):
            ch = change(h, model, touch)
            log(f"night '{name}': {ch}")
            n = night(h, ["--all"])
            n["change"] = ch
            n["calls_ratio"] = round(n["api_calls"] / full["api_calls"], 4) if full["api_calls"] else None
            fs, ns_ = full["first_request_to_last_commit_s"], n["first_request_to_last_commit_s"]
            n["time_ratio"] = round(ns_ / fs, 4) if fs and ns_ else None
            n["wall_ratio"] = round(n["wall_s"] / full["wall_s"], 4) if full["wall_s"] else None
            n["guard_jobs"] = sorted(j for j, v in n["per_job"].items() if (v["fanout"] or {}).get("guard_after"))
            nights[name] = n
            if name == "verify":
                res["not_trusted_after_verify"] = sorted(
                    j for j, v in n["per_job"].items() if (v["fanout"] or {}).get("asked")
                    and v["fanout"].get("assumption_after") != "holds")
            log(f"  {n['api_calls']} calls ({n['calls_ratio']} of full), {n['wall_s']} s "
                f"({n['wall_ratio']} of full), exact: {n['reconciliation']['exact']} (but embedded refs: "
                f"{n['reconciliation']['exact_but_embedded_refs']}), not ok: {sorted(n['not_ok'])}, guard: {n['guard_jobs']}")
        res["nights"] = nights
        res["projection"] = projection(full, {k: v for k, v in nights.items() if k in ("uniform", "realistic")},
                                       ns.scale)
        res["targets"] = {
            "realistic_calls_ratio<=0.05": nights["realistic"]["calls_ratio"],
            "realistic_time_ratio<=0.10": nights["realistic"]["wall_ratio"],
            "uniform_calls_ratio<=0.15": nights["uniform"]["calls_ratio"],
            "full_exact": full["reconciliation"]["exact"],
            # the untouched night is the assumption failing: what it misses waits for the sweep
            "nights_exact_but_embedded_refs": {k: n["reconciliation"]["exact_but_embedded_refs"]
                                               for k, n in nights.items()},
            "nights_not_ok_jobs": {k: sorted(n["not_ok"]) for k, n in nights.items()},
        }
    finally:
        res["wall_s"] = round(time.monotonic() - t0, 1)
        res["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        h.close()
        ns.out_dir.mkdir(parents=True, exist_ok=True)
        out = ns.out_dir / f"{stamp}-nights.json"
        out.write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {out}")
    print(json.dumps({k: res.get(k) for k in ("targets", "projection")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
