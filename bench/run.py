"""The benchmark suite in one command: TrialSync against its limits and its peer, in one run.

    .venv/bin/python -m bench.run                         # scales 0.05 and 0.2 (make bench)
    .venv/bin/python -m bench.run --quick                 # tiny scale, < 3 min (the smoke test)
    .venv/bin/python -m bench.run --scales 0.05 --only e2e,peer --out-dir /tmp/b

Starts its own embedded stack (PostgreSQL 16 + tansu) in a temporary directory and, per scale, one
CC simulator; everything below runs against that simulator and that PostgreSQL server:

* ``e2e``: ``trialsync run --all --full --wait-load`` of the 72 jobs through the real loader and
  transformer services: records/s into staging (records loaded / first request -> last record
  committed), wall time, peak RSS per process type, API calls (the simulator's own count);
* ``incremental``: 1 % of every entity's records changed (the simulated clock a day later), then
  ``trialsync run --all`` (incremental): time and API calls vs the full run;
* ``limit``: the largest staging table's records -- plain ``COPY`` into an empty staging-shaped
  table vs one loader draining the same table's topic into an empty table; the ratio;
* ``peer``: dlt's ``rest_api`` source -> ``postgres`` vs ``trialsync run`` on the 43
  non-parameterized jobs, each into an empty database (bench/peer_dlt.py says how it is made fair);
* ``fanout``: the largest parameterized job at 0 ms (vs the simulator's measured capacity) and at
  50 ms added latency (vs C / 50 ms), through ``bench.extract_bench.run``;
* ``scaling``: 1 vs 2 loader processes draining every topic of the full run; 1 vs 2 extractor
  processes on the fan-out job.

``e2e`` and ``limit`` run at every scale; ``incremental``, ``peer``, ``fanout`` and ``scaling`` at
the first (``--incremental-scales``, ``--peer-scales`` change that): at scale 0.2 the run is
bound by ~2.2 M API calls, and an incremental run makes almost all of them again. Writes ``<out-dir>/<date>.json`` and ``.md``.
Numbers from a shared 2-core machine are indicative; see bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import SIM_KEY, Harness, orchestration_stats, staging_rows  # noqa: E402
from bench.procwatch import ProcWatch  # noqa: E402

SECTIONS = ("e2e", "incremental", "limit", "peer", "fanout", "scaling", "paged", "loader")
#: the largest parameterized job: /patient-visits/{patientVisitId}/elements/odata, one call per visit
FANOUT_JOB = 24


def tag_of(scale: float) -> str:
    return "s" + f"{scale:g}".replace(".", "_").replace("-", "m")


def rate(n: float | None, seconds: float | None) -> float | None:
    return round(n / seconds, 1) if n and seconds else None


def log(msg: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- e2e ---------------------------------------------------------------------------------------------

def watch_services(h: Harness) -> ProcWatch:
    """Memory and CPU of every part: simulator, loader, transformer (when running), PostgreSQL, broker."""
    w = ProcWatch()
    w.add("simulator", h.sim.pid)
    w.add("loader", h.service_pid("loader"))
    w.add("transformer", h.service_pid("transformer"))
    w.add("postgresql", h.pg_pid)
    w.add("broker", h.broker_pid)
    return w


def run_all(h: Harness, args: list[str], sampler: ProcWatch | None) -> dict[str, Any]:
    """One ``trialsync run ...`` with the simulator's request counter reset first."""
    h.sim_reset_stats()

    def on_start(pid: int) -> None:
        if sampler is not None:
            sampler.add("orchestrator", pid, "self")
            sampler.add("extractor_workers", pid, "below")

    run = h.trialsync(["run", *args, "--wait-load"], on_start=on_start)
    if run.result is None:
        raise RuntimeError(f"`trialsync run {' '.join(args)}` exited {run.code} without a result: {run.stderr_tail}")
    with h.connect() as conn:
        stats = orchestration_stats(conn, run.result["orchestration_id"])
        rows = staging_rows(conn)
    stats.update({
        "status": run.result["status"], "jobs": len(run.result["jobs"]), "counts": run.result["counts"],
        "api_calls": h.sim_api_calls(), "cli_wall_s": round(run.wall_s, 2),
        "orchestration_s": run.result["duration_seconds"], "staging_rows": sum(rows.values()),
        "records_per_s": rate(stats["records_loaded"], stats["first_request_to_last_commit_s"]),
        "run_ids": [rid for j in run.result["jobs"] for rid in j.get("run_ids") or []],
        "not_ok": {str(j["job_id"]): j.get("error") or j.get("reason") or j["status"]
                   for j in run.result["jobs"] if j["status"] != "success"},
    })
    stats["largest_tables"] = dict(sorted(rows.items(), key=lambda kv: -kv[1])[:5])
    return stats


def wait_transforms(h: Harness, run_ids: list[int], timeout: float) -> float:
    from common.config import get_settings
    from orchestrator.demo import wait_for_transforms

    t0 = time.monotonic()
    wait_for_transforms(get_settings(), run_ids, timeout)
    return round(time.monotonic() - t0, 1)


def section_e2e(h: Harness, scale: float) -> dict[str, Any]:
    tag = tag_of(scale)
    h.use_database(f"bench_{tag}")
    h.use_prefix(f"bench_{tag}")
    h.start_loader()
    h.start_transformer()
    watch = watch_services(h).start()
    log(f"e2e scale {scale}: trialsync run --all --full")
    try:
        out = run_all(h, ["--all", "--full"], watch)
    finally:
        procs = watch.stop()
    out["procs"] = procs
    out["transform_wait_s"] = wait_transforms(h, out.pop("run_ids"), 1800)
    out["database"], out["topic_prefix"] = f"bench_{tag}", f"bench_{tag}"
    return out


# -- incremental ----------------------------------------------------------------------------------

def mutate_one_percent(h: Harness, fraction: float = 0.01, touch_parents: bool = False) -> dict[str, int]:
    """A day passes on the simulated clock, then ``fraction`` of every entity's live records change
    (``touch_parents``: their parents' modifiedDate moves too, as if CC cascaded it)."""
    h.sim_post("/clock", {"advance_seconds": 86400})
    changed: dict[str, int] = {}
    for name in h.sim_get("/entities"):
        try:
            res = h.sim_post("/mutate", {"entity": name, "modify": fraction, "touch_parents": touch_parents})
        except RuntimeError:  # an entity without a field to modify (plain lookup values)
            continue
        if res.get("modified"):
            changed[name] = len(res["modified"])
    return changed


#: the incremental runs measured, in order: (fan-out policy, whether the simulated CC touches parents)
# both nights with CC moving the parents: the `all` night asks every parent with its own filter, so
# it is also the verification the `changed` policy needs before it trusts a job (docs/extraction.md)
INCREMENTAL_POLICIES = (("all", True), ("changed", True))


def reconcile_all(h: Harness) -> dict[str, int]:
    """Every staging table against the simulator's truth: missing / duplicated / stale / extra."""
    from common.catalog import load_catalog
    from simulator.reconcile import reconcile

    catalog = load_catalog()
    with h.connect() as conn:
        rec = reconcile(conn, h.sim_admin, catalog, [j.id for j in catalog.runnable])
    return {**rec.totals, "problems": rec.problems()}


def section_incremental(h: Harness, full: dict[str, Any]) -> dict[str, Any]:
    """One incremental run per fan-out policy, each after its own 1 % change, each reconciled."""
    full_s, full_calls = full["first_request_to_last_commit_s"], full["api_calls"]
    out: dict[str, Any] = {"full_s": full_s, "full_api_calls": full_calls, "policies": {}}
    for policy, touch in INCREMENTAL_POLICIES:
        changed = mutate_one_percent(h, touch_parents=touch)
        log(f"incremental ({policy}): {sum(changed.values())} records changed"
            f"{' (parents touched)' if touch else ''}; trialsync run --all")
        with mock.patch.dict(os.environ, {"ETL_FANOUT_INCREMENTAL": policy}):  # the CLI child reads it
            run = run_all(h, ["--all"], None)
        run.pop("run_ids", None)
        inc_s = run["first_request_to_last_commit_s"]
        out["policies"][policy] = {
            "parents_touched": touch, "records_changed": sum(changed.values()), "entities_changed": len(changed),
            "incremental_s": inc_s, "time_ratio": round(inc_s / full_s, 3) if inc_s and full_s else None,
            "api_calls": run["api_calls"],
            "api_calls_ratio": round(run["api_calls"] / full_calls, 3) if full_calls else None,
            "records_extracted": run["records_extracted"], "records_loaded": run["records_loaded"],
            "cli_wall_s": run["cli_wall_s"], "status": run["status"], "not_ok": run["not_ok"],
            "top_jobs_by_api_calls": top_jobs(h, run), "reconciliation": reconcile_all(h)}
    return out


def top_jobs(h: Harness, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The five jobs of the latest orchestration with the most API calls (where incremental time goes)."""
    with h.connect() as conn:
        rows = conn.execute(
            """SELECT r.job_id, r.api_calls, r.records_extracted, r.duration_seconds FROM etl.dw_etl_runs r
                WHERE r.orchestration_id = (SELECT id FROM etl.dw_orchestrations ORDER BY started_at DESC LIMIT 1)
                ORDER BY r.api_calls DESC LIMIT 5""").fetchall()
    return [{"job": r[0], "api_calls": r[1], "records": r[2], "s": float(r[3] or 0)} for r in rows]


# -- loader drains (limit, scaling) -----------------------------------------------------------------

def loader_drain(h: Harness, table: str, processes: int, group: str) -> dict[str, Any]:
    """``processes`` loader processes (one consumer group; bench/loader_bench.py's timed child) drain
    the current prefix's topics for ``table`` ('*' = every table) into the current database."""
    from bench.loader_bench import child_result, run_child
    from consumers.loader import DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_MS

    env = dict(os.environ)
    share = ["--join-group"] if processes > 1 else []  # share the partitions, as `load --workers N` does
    procs = [run_child(["once", "--table", table, "--group", group, "--batch-size", str(DEFAULT_BATCH_SIZE),
                        "--flush-ms", str(DEFAULT_FLUSH_MS), *share], env) for _ in range(processes)]
    rs = [child_result(p, timeout=1800) for p in procs]
    done = [r for r in rs if r.get("first")]
    records = sum(r["records"] for r in rs)
    secs = (max(r["last"] for r in done) - min(r["first"] for r in done)) if done else None
    return {"processes": processes, "records": records, "seconds": round(secs, 3) if secs else None,
            "records_per_s": rate(records, secs),
            "per_process": [{k: r.get(k) for k in ("records", "seconds", "records_per_second",
                                                     "loader_process_cpu_us_per_record",
                                                     "postgres_backend_cpu_us_per_record")} for r in rs]}


def plain_copy(h: Harness, source_dsn: str, table: str, target: str = "zz_bench_plain_copy") -> dict[str, Any]:
    """Read the table's (source_id, data) from the full run's database, COPY it into an empty
    staging-shaped table in the current database; time only the COPY (and its commit)."""
    import psycopg
    from psycopg import sql

    from bench.loader_bench import proc_cpu
    from common.db import staging_table

    with psycopg.connect(source_dsn, autocommit=True) as src, src.cursor() as cur:
        buf = bytearray()
        with cur.copy(sql.SQL("COPY (SELECT source_id, data FROM {}) TO STDOUT").format(staging_table(table))) as cp:
            for chunk in cp:
                buf += chunk
        rows = cur.execute(sql.SQL("SELECT count(*) FROM {}").format(staging_table(table))).fetchone()[0]
    with h.connect() as conn:
        conn.execute("SELECT etl.create_staging_table(%s)", (target,))
        conn.execute("SELECT etl.add_loader_columns(%s)", (target,))
        conn.execute("CHECKPOINT")
        payload = bytes(buf)
        backend = conn.info.backend_pid
        cpu0 = proc_cpu(backend)
        t0 = time.monotonic()
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} (source_id, data) FROM STDIN").format(staging_table(target))) as cp:
                for i in range(0, len(payload), 1 << 20):
                    cp.write(payload[i:i + (1 << 20)])
        secs = time.monotonic() - t0
        cpu1 = proc_cpu(backend)
    return {"rows": int(rows), "bytes": len(payload), "seconds": round(secs, 3), "rows_per_s": rate(rows, secs),
            "postgres_cpu_us_per_row": round((cpu1 - cpu0) * 1e6 / rows, 1) if cpu0 is not None and cpu1 is not None
            and rows else None}


def publish_rows(source_dsn: str, table: str, change_every: int = 0) -> int:
    """Publish every row of the full run's ``table`` once, as the extractor does (key = source_id,
    value = the record, ``Publisher.publish_page``'s ts-load-v1 header with run/job/instance/
    extracted-at/modified-at and the content hash), to the current prefix's topic: the loader then
    gets exactly the records the plain COPY gets. (The full run's own topic can hold a record more
    than once: two jobs feed the patient-visit table.) ``change_every``: every n-th record gets a
    changed field (a re-extraction where 1/n of the records changed)."""
    from datetime import UTC, datetime

    import orjson
    import psycopg
    from psycopg import sql

    from common import kafka as K
    from common.config import get_settings
    from common.db import staging_table
    from producers.publisher import DeliveryTracker, Publisher, record_headers

    topic = K.bronze_topic(table)
    K.ensure_topics([topic])
    pub = Publisher(get_settings())
    tracker = DeliveryTracker(topic)
    n = 0
    q = sql.SQL("SELECT source_id, data::text, etl_run_id, etl_job_id, source_instance_id, extracted_at "
                "FROM {} WHERE NOT is_deleted ORDER BY etl_run_id").format(staging_table(table))
    page: list[tuple[str, dict[str, Any]]] = []
    page_hdr: tuple[Any, ...] | None = None

    def flush() -> None:
        if not page:
            return
        run, job, inst, ext = page_hdr  # type: ignore[misc]
        keys = {id(rec): sid for sid, rec in page}
        pub.publish_page(topic, [rec for _, rec in page], lambda rec, _p: keys[id(rec)], None,
                         record_headers(job, run, inst or "", ext or datetime.now(UTC), None), tracker,
                         "modifiedDate")
        page.clear()

    with psycopg.connect(source_dsn, autocommit=True) as src, src.transaction(), \
            src.cursor(name="bench_rows") as cur:
        cur.itersize = 5000
        for sid, data, run, job, inst, ext in cur.execute(q):
            rec = orjson.loads(data)
            if change_every and n % change_every == 0:
                rec["_bench_changed"] = True
            hdr = (run, job, inst, ext)
            if hdr != page_hdr or len(page) >= 1000:
                flush()
                page_hdr = hdr
            page.append((sid, rec))
            n += 1
        flush()
    pub.wait(tracker, 300)
    if tracker.failed:
        raise RuntimeError(f"could not publish the limit topic {topic}: {tracker.first_error}")
    pub = None  # type: ignore[assignment]  # its producer must not outlive the broker (a reference cycle)
    gc.collect()
    return n


def section_limit(h: Harness, scale: float, e2e: dict[str, Any]) -> dict[str, Any]:
    tag = tag_of(scale)
    table = next(iter(e2e["largest_tables"]))
    source_dsn = h.admin_dsn(e2e["database"])
    h.stop_consumers()
    h.use_prefix(f"bench_{tag}_limit")  # a topic with each of the table's records exactly once
    h.use_database(f"bench_{tag}_limit")
    log(f"limit scale {scale}: plain COPY vs one loader, {table}")
    published = publish_rows(source_dsn, table)
    copy = plain_copy(h, source_dsn, table)
    loader = loader_drain(h, table, 1, f"bench-limit-{tag}")
    loader["published"] = published
    return {"table": table, "copy": copy, "loader": loader,
            "ratio": round(loader["records_per_s"] / copy["rows_per_s"], 3)
            if loader["records_per_s"] and copy["rows_per_s"] else None}


def section_loader_scaling(h: Harness, scale: float, e2e: dict[str, Any]) -> dict[str, Any]:
    tag = tag_of(scale)
    h.stop_consumers()
    h.use_prefix(e2e["topic_prefix"])
    out = {}
    for n in (1, 2):
        h.use_database(f"bench_{tag}_drain{n}")
        log(f"scaling: {n} loader process(es) drain every topic of the full run")
        out[n] = loader_drain(h, "*", n, f"bench-drain{n}-{tag}")
    one, two = out[1]["records_per_s"], out[2]["records_per_s"]
    return {"what": f"loader processes draining all topics of the scale-{scale} full run", "unit": "records/s",
            "one": one, "two": two, "speedup": round(two / one, 2) if one and two else None,
            "detail": {"1": out[1], "2": out[2]}}


# -- fan-out and extractor processes -------------------------------------------------------------

def quick_capacity(h: Harness, paths: list[str]) -> dict[str, Any]:
    """--quick: one short round of each load generator instead of extract_bench's three."""
    from urllib.parse import urlsplit

    from bench.simulator_bench import python_load, wrk_load

    u = urlsplit(h.sim.urls["api"])
    full = [u.path + p for p in paths]
    py = python_load(u.port or 80, full, 1.5, 8, False)
    wrk = wrk_load(u.port or 80, full, 2, 16, None, 1)
    return {"python": py, "wrk": wrk,
            "requests_per_s": max(py["requests_per_s"], (wrk or {}).get("requests_per_s") or 0)}


def section_fanout(h: Harness, scale: float, e2e: dict[str, Any], quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """In this process (bench.extract_bench.run -> producers.extractor.run_job), on a subset of the
    job's real parents (from the full run's database), publishing to a topic prefix nobody loads."""
    from bench.extract_bench import run as extract_run
    from bench.extract_bench import sim_capacity
    from common import config
    from common.catalog import load_catalog
    from common.db import connect
    from orchestrator.settings import get_orchestrator_settings
    from producers.parents import load_parents

    h.stop_consumers()
    os.environ["DATABASE_URL"] = h.admin_dsn(e2e["database"])
    h.use_prefix(f"bench_{tag_of(scale)}_fanout")
    config.reset_settings()
    s = config.get_settings()
    job = load_catalog().get(FANOUT_JOB)
    with connect() as conn:
        parents = load_parents(conn, job)
    conf_c = get_orchestrator_settings().etl_fanout_workers or s.etl_parallel_jobs
    n0 = min(len(parents), 400 if quick else 20_000)
    subset = parents[:n0]
    h.sim_faults(None)
    paths = [job.render_endpoint(p) for p in subset[:5000]]
    log(f"fan-out: simulator capacity on {job.endpoint}")
    cap = quick_capacity(h, paths) if quick else sim_capacity(SimpleNamespace(base_url=h.sim.urls["api"], key=SIM_KEY),
                                                               paths, seconds=5.0)
    runs: list[dict[str, Any]] = []

    def one(latency_ms: int, c: int, parts: list[dict[str, str]], ref_name: str, ref: float,
            processes: int | None = None) -> dict[str, Any]:
        r = extract_run(FANOUT_JOB, workers=c, only_parents=parts, processes=processes)
        rps = r.get("requests_per_s")
        return {"latency_ms": latency_ms, "workers": c, "processes": processes or 1, "parents": len(parts),
                "requests_per_s": rps, "reference": ref_name, "reference_requests_per_s": round(ref),
                "share": round(rps / ref, 3) if rps and ref else None, "status": r["status"],
                "api_calls": r["api_calls"], "records": r["records"], "fetch_s": r["fetch_s"],
                "cpu_us_per_request": r.get("cpu_us_per_request")}

    extract_run(FANOUT_JOB, workers=conf_c, only_parents=subset[:200])  # warm-up: topic, connections
    for c in sorted({conf_c, 32}):
        log(f"fan-out: 0 ms, C={c}, {len(subset)} parents")
        runs.append(one(0, c, subset, "simulator capacity", cap["requests_per_s"]))
    h.sim_faults("latency,ms=50")
    try:
        for c in ([conf_c] if quick else sorted({conf_c, 20, 50})):
            parts = parents[: min(len(parents), max(100, c * (10 if quick else 60)))]
            log(f"fan-out: 50 ms, C={c}, {len(parts)} parents")
            runs.append(one(50, c, parts, "C / 50 ms", c / 0.05))
    finally:
        h.sim_faults(None)
    log("scaling: extractor processes 1 vs 2")
    c = 16
    ones = one(0, c, subset, "simulator capacity", cap["requests_per_s"])
    twos = one(0, c, subset, "simulator capacity", cap["requests_per_s"], processes=2)
    from producers.publisher import reset_publishers

    reset_publishers()  # this process's producer must not outlive the broker
    gc.collect()
    fan = {"job": job.id, "name": job.name, "endpoint": job.endpoint, "parents_available": len(parents),
           "simulator_capacity": cap, "runs": runs}
    ext = {"what": f"extractor processes on job {job.id} ({len(subset)} parents, {c} in flight each, 0 ms)",
           "unit": "requests/s", "one": ones["requests_per_s"], "two": twos["requests_per_s"],
           "speedup": round(twos["requests_per_s"] / ones["requests_per_s"], 2)
           if ones["requests_per_s"] and twos["requests_per_s"] else None, "detail": {"1": ones, "2": twos}}
    return fan, ext


# -- peer ------------------------------------------------------------------------------------------------

def section_peer(h: Harness, scale: float) -> dict[str, Any]:
    from common.catalog import load_catalog
    from common.config import get_settings

    tag = tag_of(scale)
    jobs = [j for j in load_catalog().runnable if not j.requires_parameters and j.source_type == "cc_api"]
    s = get_settings()
    # TrialSync: the same jobs, full, into an empty database, through the loader service
    h.stop_consumers()
    args = ["--full"] + [a for j in jobs for a in ("--job", str(j.id))]
    sides: dict[str, dict[str, Any]] = {}
    for state in ("cold", "warm"):
        # cold: a new installation -- the topics appear while the jobs run, and the running loader
        # finds them at its next metadata refresh (<= 5 s) and rebalances; warm: every night after
        # the first -- the topics exist (a durable broker keeps them) and the loader is assigned
        h.use_database(f"bench_{tag}_peer_{state}")
        h.use_prefix(f"bench_{tag}_peer_{state}")
        if state == "warm":
            from common.kafka import bronze_topic, ensure_topics

            ensure_topics(sorted({bronze_topic(j.target_table) for j in jobs}))
        h.start_loader(wait_assigned=30.0 if state == "warm" else 0.0)
        log(f"peer scale {scale}: trialsync run on {len(jobs)} non-parameterized jobs ({state} topics)")
        watch = watch_services(h).start()
        try:
            side = run_all(h, args, watch)
        finally:
            procs = watch.stop()
        side["procs"] = procs
        side.pop("run_ids", None)
        sides[state] = side
        h.stop_consumers()
    ts = sides["warm"]
    # dlt: the same endpoints into an empty database of the same server
    dsn = h.use_database(f"bench_{tag}_peer_dlt")
    spec = {"base_url": h.sim.urls["api"], "key_header": s.cc_api_key_header,
            "dsn": dsn,
            "dataset": "dlt_peer", "workers": s.etl_parallel_jobs, "page_size": 1000, "file_format": "csv",
            "pipelines_dir": str(h.state / f"dlt-{tag}"),
            "jobs": [{"id": j.id, "name": j.name, "endpoint": j.endpoint, "odata": j.paging == "odata"} for j in jobs]}
    log(f"peer scale {scale}: dlt rest_api -> postgres on the same {len(jobs)} endpoints")
    h.sim_reset_stats()
    watch = watch_services(h)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.peer_dlt"], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BENCH_CC_API_KEY": SIM_KEY})
    watch.add("dlt", proc.pid)
    watch.start()
    out, err = proc.communicate(json.dumps(spec), timeout=3600)
    procs = watch.stop()
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"dlt peer exited {proc.returncode}: {err[-2000:]}")
    d = json.loads(out.strip().splitlines()[-1])
    d.update({"process_wall_s": round(time.perf_counter() - t0, 2), "api_calls": h.sim_api_calls(),
              "records_per_s": rate(d["records"], d["wall_s"]), "procs": procs})
    d.pop("rows", None)
    cold = sides["cold"]
    return {"jobs": len(jobs), "trialsync": ts, "trialsync_cold": cold, "dlt": d,
            "ratio": round(ts["records_per_s"] / d["records_per_s"], 2)
            if ts["records_per_s"] and d["records_per_s"] else None,
            "ratio_cold": round(cold["records_per_s"] / d["records_per_s"], 2)
            if cold["records_per_s"] and d["records_per_s"] else None,
            "config": {"parallel_jobs": s.etl_parallel_jobs, "page_size": 1000, "dlt_file_format": "csv",
                       "dlt_write_disposition": "append", "dlt_max_table_nesting": 0}}


# -- paged: the four big paged tables, TrialSync vs dlt, empty and populated, A B A B ------------------

#: studies, patients, patient visits, appointments: the big paged (OData, non-parameterized) endpoints
PAGED_JOBS = (2, 3, 9, 25)


def paged_dlt_spec(h: Harness, dsn: str, pipelines_dir: str) -> dict[str, Any]:
    """dlt as issue 17 ran it: ``rest_api`` -> ``postgres``, merge on the primary key, 4 extract
    threads, 2 normalize workers (load workers 4, csv loader files: dlt's fastest for postgres)."""
    from common.catalog import load_catalog
    from common.config import get_settings

    cat = load_catalog()
    jobs = [cat.get(j) for j in PAGED_JOBS]
    return {"base_url": h.sim.urls["api"], "key_header": get_settings().cc_api_key_header,
            "dsn": dsn.replace("postgres@", "postgres:unused@"), "dataset": "dlt_paged", "workers": 4,
            "extract_workers": 4, "normalize_workers": 2, "load_workers": 4, "page_size": 1000,
            "file_format": "csv", "write_disposition": "merge", "pipelines_dir": pipelines_dir,
            "jobs": [{"id": j.id, "name": j.name, "endpoint": j.endpoint, "odata": j.paging == "odata",
                      "primary_key": list(j.primary_key)} for j in jobs]}


def run_dlt(h: Harness, spec: dict[str, Any]) -> dict[str, Any]:
    """bench/peer_dlt.py in a child process; wall time from process start to exit (imports included)."""
    h.sim_reset_stats()
    watch = watch_services(h)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.peer_dlt"], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "BENCH_CC_API_KEY": SIM_KEY})
    watch.add("dlt", proc.pid)
    watch.start()
    out, err = proc.communicate(json.dumps(spec), timeout=3600)
    wall = time.perf_counter() - t0
    procs = watch.stop()
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"dlt exited {proc.returncode}: {err[-2000:]}")
    d = json.loads(out.strip().splitlines()[-1])
    d.update({"process_wall_s": round(wall, 2), "api_calls": h.sim_api_calls(), "procs": procs,
              "records_per_s": rate(d["records"], wall)})
    return d


def section_paged(h: Harness, scale: float, rounds: int = 2) -> dict[str, Any]:
    """Issue 17's comparison: ``trialsync run -j 2 -j 3 -j 9 -j 25 --full --wait-load`` (a loader
    service running) vs dlt on the same four endpoints, each into empty tables and then again into
    the tables it filled (every key present), alternating TrialSync and dlt (A B A B) in ``rounds``
    rounds. Times are command start -> exit (CLI start-up included; ``--wait-load`` returns after
    the loader's last commit; dlt's ``pipeline.run`` returns after its load). TrialSync's topics
    exist before its first run (a durable broker keeps them between nights)."""
    from common.catalog import load_catalog
    from common.kafka import bronze_topic, ensure_topics

    tag = tag_of(scale)
    cat = load_catalog()
    tables = sorted({cat.get(j).target_table for j in PAGED_JOBS})
    args = ["--full"] + [a for j in PAGED_JOBS for a in ("--job", str(j))]
    out: dict[str, Any] = {"jobs": list(PAGED_JOBS), "tables": tables, "rounds": []}
    for r in range(rounds):
        rd: dict[str, Any] = {"loadavg_before": [round(x, 2) for x in os.getloadavg()]}
        h.stop_consumers()
        h.use_database(f"bench_{tag}_paged_ts{r}")
        h.use_prefix(f"bench_{tag}_paged_ts{r}")
        ensure_topics([bronze_topic(t) for t in tables])
        h.start_loader(wait_assigned=30.0)
        dlt_dsn = h.empty_database(f"bench_{tag}_paged_dlt{r}")
        pipelines = str(h.state / f"dlt-paged-{tag}-{r}")
        for state in ("empty", "populated"):
            log(f"paged scale {scale} round {r + 1}: trialsync run {' '.join(args)} ({state} tables)")
            watch = watch_services(h).start()
            try:
                side = run_all(h, args, watch)
            finally:
                procs = watch.stop()
            side["procs"] = procs
            side.pop("run_ids", None)
            side["records_per_s_cli"] = rate(side["records_loaded"], side["cli_wall_s"])
            rd[f"trialsync_{state}"] = side
            log(f"paged scale {scale} round {r + 1}: dlt ({state} dataset)")
            rd[f"dlt_{state}"] = run_dlt(h, paged_dlt_spec(h, dlt_dsn, pipelines))
            t, d = side["cli_wall_s"], rd[f"dlt_{state}"]["process_wall_s"]
            rd[f"ratio_{state}"] = round(d / t, 2) if t and d else None
            log(f"paged {state}: TrialSync {t} s, dlt {d} s -> {rd[f'ratio_{state}']}x")
        rd["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        out["rounds"].append(rd)
    h.stop_consumers()
    for state in ("empty", "populated"):
        vals = [x[f"ratio_{state}"] for x in out["rounds"] if x.get(f"ratio_{state}")]
        out[f"ratio_{state}"] = round(sorted(vals)[len(vals) // 2], 2) if vals else None  # the median (upper)
        out[f"ratio_{state}_min"] = min(vals) if vals else None
    out["trialsync_db"] = f"bench_{tag}_paged_ts0"
    return out


# -- loader: first load and re-load of the largest paged table vs plain COPY, A B A B ------------------

def section_loader(h: Harness, scale: float, paged: dict[str, Any], rounds: int = 2) -> dict[str, Any]:
    """Issue 17's loader targets on the patient visits the paged run loaded: per round, plain COPY of
    the rows into an empty staging table, one loader draining the same rows (published as the
    extractor does) into an empty table (the first-load path), then the same keys again with 1 % of
    the contents changed (the upsert path). Ratios use that round's COPY."""
    import statistics

    table = "dim_patient_visits_staging"
    source_dsn = h.admin_dsn(paged["trialsync_db"])
    tag = tag_of(scale)
    h.stop_consumers()
    out: dict[str, Any] = {"table": table, "rounds": []}
    for r in range(rounds):
        h.use_prefix(f"bench_{tag}_loader{r}")
        h.use_database(f"bench_{tag}_loader{r}")
        log(f"loader scale {scale} round {r + 1}: plain COPY, first load, re-load with 1 % changed")
        copy = plain_copy(h, source_dsn, table, target=f"zz_bench_plain_copy_{r}")
        published = publish_rows(source_dsn, table)
        first = loader_drain(h, table, 1, f"bench-loader-{tag}-{r}")
        changed = publish_rows(source_dsn, table, change_every=100)
        reload = loader_drain(h, table, 1, f"bench-loader-{tag}-{r}")
        rd = {"copy": copy, "published": published, "republished": changed, "first_load": first,
              "reload_1pct_changed": reload, "loadavg": [round(x, 2) for x in os.getloadavg()]}
        for k in ("first_load", "reload_1pct_changed"):
            x = rd[k]
            x["ratio_to_copy"] = round(x["records_per_s"] / copy["rows_per_s"], 3) \
                if x.get("records_per_s") and copy.get("rows_per_s") else None
        out["rounds"].append(rd)
    for k in ("first_load", "reload_1pct_changed"):
        vals = [x[k]["ratio_to_copy"] for x in out["rounds"] if x[k].get("ratio_to_copy")]
        cpu = [x[k]["per_process"][0].get("loader_process_cpu_us_per_record") for x in out["rounds"]]
        cpu = [c for c in cpu if c is not None]
        out[f"{k}_ratio"] = round(statistics.median(vals), 3) if vals else None
        out[f"{k}_loader_cpu_us_per_record"] = round(statistics.median(cpu), 2) if cpu else None
    return out


# -- targets and output ---------------------------------------------------------------------------------

def targets(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float | None, goal: str, met: bool | None) -> None:
        out[name] = {"value": value, "goal": goal, "met": met}

    for scale, x in res.get("limit", {}).items():
        add(f"loader / plain COPY @ {scale}", x["ratio"], ">= 0.6", x["ratio"] is not None and x["ratio"] >= 0.6)
    for scale, x in res.get("peer", {}).items():
        add(f"TrialSync / dlt records/s @ {scale}", x["ratio"], ">= 3", x["ratio"] is not None and x["ratio"] >= 3)
    for scale, x in res.get("paged", {}).items():
        for state in ("empty", "populated"):
            v = x.get(f"ratio_{state}")
            add(f"dlt / TrialSync time, jobs 2 3 9 25, {state} tables @ {scale} (median of rounds)", v, ">= 3.5",
                v is not None and v >= 3.5)
    for scale, x in res.get("loader", {}).items():
        for k, goal in (("first_load", 0.7), ("reload_1pct_changed", 0.6)):
            v = x.get(f"{k}_ratio")
            add(f"loader / plain COPY, {k.replace('_', ' ')} @ {scale}", v, f">= {goal}", v is not None and v >= goal)
            c = x.get(f"{k}_loader_cpu_us_per_record")
            add(f"loader process CPU µs/record, {k.replace('_', ' ')} @ {scale}", c, "<= 5", c is not None and c <= 5)
    for scale, x in res.get("incremental", {}).items():
        for policy, p in x["policies"].items():
            v = p["time_ratio"]
            add(f"incremental / full time @ {scale}, fan-out {policy}", v, "<= 0.1", v is not None and v <= 0.1)
    for r in res.get("fanout", {}).get("runs", []):
        add(f"fan-out {r['latency_ms']} ms C={r['workers']} share of {r['reference']}", r["share"], ">= 0.8",
            r["share"] is not None and r["share"] >= 0.8)
    return out


def write(res: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path]:
    from bench.report import to_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    jp, mp = out_dir / f"{stamp}.json", out_dir / f"{stamp}.md"
    jp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    mp.write_text(to_markdown(res) + "\n")
    return jp, mp


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny scale (0.002), small subsets: < 3 min")
    ap.add_argument("--scales", help="comma-separated simulator scales (default 0.05,0.2; --quick: 0.002)")
    ap.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    ap.add_argument("--peer-scales", help="scales for the dlt comparison (default: the first scale)")
    ap.add_argument("--incremental-scales", help="scales for the incremental run (default: the first scale)")
    ap.add_argument("--paged-scales", help="scales for the paged and loader sections (default: the first scale)")
    ap.add_argument("--rounds", type=int, help="A B rounds of the paged and loader sections (default 2; --quick 1)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    ns = ap.parse_args(argv)
    ns.scale_list = [float(x) for x in (ns.scales or ("0.002" if ns.quick else "0.05,0.2")).split(",")]
    ns.sections = set(ns.only.split(",")) if ns.only else set(SECTIONS)
    unknown = ns.sections - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}: choose from {','.join(SECTIONS)}")
    ns.peer_list = [float(x) for x in ns.peer_scales.split(",")] if ns.peer_scales else ns.scale_list[:1]
    ns.incremental_list = ([float(x) for x in ns.incremental_scales.split(",")] if ns.incremental_scales
                           else ns.scale_list[:1])
    ns.paged_list = [float(x) for x in ns.paged_scales.split(",")] if ns.paged_scales else ns.scale_list[:1]
    ns.rounds = ns.rounds or (1 if ns.quick else 2)
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    t_start = time.monotonic()
    from bench.report import machine_facts

    h = Harness()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    res: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "scales": ns.scale_list}

    def checkpoint() -> None:
        """Write what is measured so far (marked partial): a run stopped midway keeps its numbers."""
        try:
            write({**res, "partial": True, "targets": targets(res), "wall_s": round(time.monotonic() - t_start, 1),
                   **({"errors": errors} if errors else {})}, ns.out_dir, stamp)
        except Exception as e:  # noqa: BLE001 - a failed checkpoint must not stop the run
            log(f"checkpoint not written: {e}")

    errors: dict[str, str] = {}
    try:
        h.up()
        res["machine"] = machine_facts(h.pg_version())
        from common.config import get_settings
        from orchestrator.settings import get_orchestrator_settings

        s, o = get_settings(), get_orchestrator_settings()
        res["config"] = {"ETL_PARALLEL_JOBS": s.etl_parallel_jobs,
                         "ETL_FANOUT_WORKERS": o.etl_fanout_workers or s.etl_parallel_jobs,
                         "ETL_PLAIN_WORKERS": o.etl_plain_workers or s.etl_parallel_jobs,
                         "ETL_HTTP_ENGINE": s.etl_http_engine, "KAFKA_PARTITIONS": s.kafka_partitions,
                         "LOADER_BATCH_SIZE": s.loader_batch_size, "LOADER_FLUSH_MS": s.loader_flush_ms,
                         "CC_PAGE_SIZE": s.cc_page_size, "ETL_TIMEOUT_SECONDS": s.etl_timeout_seconds}
        need_e2e = bool(ns.sections & {"e2e", "incremental", "limit", "fanout", "scaling"})
        for i, scale in enumerate(ns.scale_list):
            key = f"{scale:g}"
            log(f"simulator at scale {scale}")
            h.start_simulator(scale)
            res.setdefault("simulator_start", {})[key] = True
            e2e = None
            if need_e2e:
                e2e = section_e2e(h, scale)
                res.setdefault("e2e", {})[key] = e2e
                checkpoint()
            steps: list[tuple[str, Any]] = []
            if e2e is not None and "incremental" in ns.sections and scale in ns.incremental_list:
                steps.append(("incremental", lambda e=e2e: section_incremental(h, e)))
            if e2e is not None and i == 0 and ns.sections & {"fanout", "scaling"}:
                steps.append(("fanout", lambda e=e2e, sc=scale: section_fanout(h, sc, e, ns.quick)))
            if e2e is not None and "limit" in ns.sections:
                steps.append(("limit", lambda e=e2e, sc=scale: section_limit(h, sc, e)))
            if e2e is not None and i == 0 and "scaling" in ns.sections:
                steps.append(("scaling", lambda e=e2e, sc=scale: section_loader_scaling(h, sc, e)))
            if "peer" in ns.sections and scale in ns.peer_list:
                steps.append(("peer", lambda sc=scale: section_peer(h, sc)))
            if ns.sections & {"paged", "loader"} and scale in ns.paged_list:
                steps.append(("paged", lambda sc=scale: section_paged(h, sc, ns.rounds)))
            if "loader" in ns.sections and scale in ns.paged_list:
                steps.append(("loader", lambda sc=scale, k=key: section_loader(h, sc, res["paged"][k], ns.rounds)))
            for name, fn in steps:
                try:
                    value = fn()
                except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
                    errors[f"{name}@{key}"] = f"{type(e).__name__}: {e}"
                    log(f"{name} failed: {traceback.format_exc()}")
                    continue
                if name == "fanout":
                    fan, ext = value
                    if "fanout" in ns.sections:
                        res["fanout"] = fan
                    if "scaling" in ns.sections:
                        res.setdefault("scaling", {})["extractor_processes"] = ext
                elif name == "scaling":
                    res.setdefault("scaling", {})["loader_processes"] = value
                else:
                    res.setdefault(name, {})[key] = value
                checkpoint()
            if "e2e" not in ns.sections:
                res.pop("e2e", None)
    except Exception as e:  # noqa: BLE001 - report what was measured, then fail
        errors["run"] = f"{type(e).__name__}: {e}"
        log(traceback.format_exc())
    finally:
        h.close()
    res.pop("simulator_start", None)
    res["targets"] = targets(res)
    res.setdefault("machine", {})["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_s"] = round(time.monotonic() - t_start, 1)
    if errors:
        res["errors"] = errors
    jp, mp = write(res, ns.out_dir, stamp)
    log(f"wrote {jp} and {mp} ({res['wall_s']} s)")
    print(mp.read_text())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
