"""Extractor throughput against the CC simulator; prints one JSON document.

    .venv/bin/python -m bench.extract_bench                 # embedded stack + simulator started here
    .venv/bin/python -m bench.extract_bench --quick         # smaller volumes
    .venv/bin/python -m bench.extract_bench --sim-url http://127.0.0.1:8765/CCSWEB --sim-key KEY

Scenarios (the issue's speed goals):

* ``paged``: job 9 (``/patient-visits/odata``, 1000-record pages) at zero latency: records/s
  published by one extractor process (goal >= 25,000/s), per engine;
* ``sim_capacity``: the simulator's request rate on a small fan-out endpoint under a lean
  multi-process ``http.client`` load (no parsing, no publishing) -- the reference for:
* ``fanout``: job 147 (``/patients/{patientId}/devices``, one call per patient) per engine
  (asyncio/uvloop, threads/requests, worker processes): requests/s, and the share of the
  simulator's capacity (goal >= 80 %);
* ``latency``: 50 ms added per request, concurrency C: requests/s vs C / 0.05 (goal >= 80 %);
* ``rate_limit``: ``CC_RATE_LIMIT_RPS=10``: observed rate and the most requests seen in any
  one-second window (goal <= 10);
* ``http_client``: job 147 on the asyncio engine (16 in flight) with the hand-written HTTP client
  (``producers/http_async.py``) and with aiohttp (``bench/http_clients.py``), alternating A B A B:
  requests/s, CPU per request and the ratio aiohttp / hand-written per pair (the rule: the library
  replaces the hand-written client if it reaches >= 0.9).

Rates use ``RunResult.fetch_s`` (first request to last broker acknowledgement); ``duration_s`` (the
whole run: bookkeeping, topic checks, watermarks) is reported too. The machine is shared: numbers
are indicative; run it on a quiet machine for the record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# -- the simulator -------------------------------------------------------------------------------

class Sim:
    """A simulator to talk to: started here (SimulatorProcess) or an external one (--sim-url)."""

    def __init__(self, url: str | None, key: str | None, scale: float, header: str = "X-ApiKey"):
        import requests

        self.proc = None
        self.port: int | None = None
        if url is None:
            from bench.simulator_bench import KEY, _pin, _pin_tree
            from simulator.testing import SimulatorProcess

            self.proc = SimulatorProcess(scale=scale, seed=42, api_key=KEY, startup_timeout=600).start()
            url, key, header = self.proc.base_url, self.proc.api_key, self.proc.key_header
            self.port = self.proc.port
            # as in bench/simulator_bench.py: the simulator on CPU 0, the extractor (this process) on CPU 1
            _pin_tree(self.proc.pid, 0)
            for task in Path(f"/proc/{os.getpid()}/task").iterdir():
                _pin(int(task.name), 1)
        self.base_url = url.rstrip("/")
        self.key = key or ""
        self.header = header
        root = self.base_url.rsplit("/CCSWEB", 1)[0] if "/CCSWEB" in self.base_url else self.base_url
        self.admin = root + "/_sim"
        self.http = requests.Session()

    def faults(self, spec: str | None) -> None:
        if spec:
            self.http.post(self.admin + "/faults", json={"spec": spec}, timeout=30).raise_for_status()
        else:
            self.http.delete(self.admin + "/faults", timeout=30).raise_for_status()

    def expected(self, template: str) -> list[dict[str, Any]]:
        r = self.http.get(self.admin + "/expected", params={"endpoint": template}, timeout=600)
        r.raise_for_status()
        return [json.loads(line) for line in r.iter_lines() if line]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.faults(None)
        if self.proc is not None:
            self.proc.stop()


# -- helpers ----------------------------------------------------------------------------------------

def seed_parents(table: str, records: list[dict[str, Any]], instance: str) -> int:
    """Write parent rows straight into a staging table (the loader is not what is measured here)."""
    import orjson
    from psycopg import sql

    from common.db import connect, staging_table

    with connect() as conn, conn.transaction():
        conn.execute(sql.SQL("TRUNCATE {}").format(staging_table(table)))
        with conn.cursor().copy(sql.SQL("COPY {} (source_id, data) FROM STDIN").format(staging_table(table))) as cp:
            for r in records:
                cp.write_row((f"{instance}:{r['id']}", orjson.dumps(r).decode()))
    return len(records)


def run(job_id: int, **kw: Any) -> dict[str, Any]:
    from common.catalog import load_catalog
    from common.config import get_settings
    from producers.extractor import run_job

    job = load_catalog().get(job_id)
    cpu0 = time.process_time()
    r = run_job(job, mode="full", settings=get_settings(), trigger="bench", **kw)
    cpu = time.process_time() - cpu0
    fetch = r.fetch_s or r.duration_s
    out = {"status": r.status, "records": r.records_published, "api_calls": r.api_calls,
           "duration_s": r.duration_s, "fetch_s": fetch,
           "records_per_s": round(r.records_published / fetch) if fetch else None,
           "requests_per_s": round(r.api_calls / fetch) if fetch else None, "error": r.error}
    if not kw.get("processes"):
        # CPU of this process for the whole run: steadier than rates on a shared machine
        out["cpu_s"] = round(cpu, 3)
        out["cpu_us_per_request"] = round(cpu / r.api_calls * 1e6) if r.api_calls else None
        out["cpu_us_per_record"] = round(cpu / r.records_published * 1e6, 1) if r.records_published else None
    return out


def sim_capacity(sim: Sim, paths: list[str], seconds: float = 5.0) -> dict[str, Any]:
    """The simulator's request capacity on the fan-out endpoint, measured like
    bench/simulator_bench.py does (keep-alive ``http.client`` threads on the other CPU, bodies read,
    not parsed): the reference the fan-out share is computed against."""
    from urllib.parse import urlsplit

    from bench.simulator_bench import python_load, wrk_load

    if sim.key != "bench-key":
        return {"skipped": "external simulator: its key is not the bench key"}
    u = urlsplit(sim.base_url)
    full = [u.path + p for p in paths]
    python_load(u.port or 80, full[:200], 1.0, 4, False)  # warm-up
    best: dict[str, Any] = {}
    for threads in (4, 8, 16):
        r = python_load(u.port or 80, full, seconds, threads, False)
        if r["requests_per_s"] > best.get("requests_per_s", 0):
            best = r
    wrk = wrk_load(u.port or 80, full, seconds, 16, None, 1)
    out = {"python": best, "wrk": wrk}
    # the reference: the highest rate any load generator got out of the simulator
    out["requests_per_s"] = max(best["requests_per_s"], (wrk or {}).get("requests_per_s") or 0)
    return out


class WireClock:
    """Records when each request leaves the asyncio engine, to check the rate limit on the wire."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._undo: list[Any] = []

    def __enter__(self) -> WireClock:
        from producers import http_async

        orig = http_async.AsyncHttpClient.get
        clock = self

        async def get(self_: Any, url: str) -> Any:
            clock.times.append(time.monotonic())
            return await orig(self_, url)

        http_async.AsyncHttpClient.get = get  # type: ignore[method-assign]
        self._undo.append(lambda: setattr(http_async.AsyncHttpClient, "get", orig))
        return self

    def __exit__(self, *exc: object) -> None:
        for u in self._undo:
            u()

    def max_in_window(self, window: float = 1.0) -> int:
        ts = sorted(self.times)
        best = j = 0
        for i, t in enumerate(ts):
            while ts[j] <= t - window:
                j += 1
            best = max(best, i - j + 1)
        return best


def compare_http_clients(pairs: int) -> dict[str, Any]:
    """Hand-written client vs aiohttp on job 147, alternating, one warm-up each."""
    from bench.http_clients import AiohttpClient, using

    def one(name: str) -> dict[str, Any]:
        if name == "aiohttp":
            with using(AiohttpClient):
                return run(147, engine="async", workers=16)
        return run(147, engine="async", workers=16)

    one("handwritten"), one("aiohttp")  # warm-up
    rows = []
    for _ in range(pairs):
        a, b = one("handwritten"), one("aiohttp")
        rows.append({"handwritten": a, "aiohttp": b,
                     "ratio_requests_per_s": round((b["requests_per_s"] or 0) / (a["requests_per_s"] or 1), 3)})

    def med(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2]

    return {"job": 147, "workers": 16, "pairs": rows,
            "median_requests_per_s": {k: med([r[k]["requests_per_s"] or 0 for r in rows]) for k in ("handwritten", "aiohttp")},
            "median_cpu_us_per_request": {k: med([r[k]["cpu_us_per_request"] or 0 for r in rows])
                                          for k in ("handwritten", "aiohttp")},
            "median_ratio": med([r["ratio_requests_per_s"] for r in rows]), "rule": "aiohttp replaces it at >= 0.9"}


# -- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.05, help="simulator scale (0.05: 115k patient visits)")
    ap.add_argument("--quick", action="store_true", help="scale 0.01 and shorter scenarios")
    ap.add_argument("--sim-url", help="use a running simulator (base URL ending in /CCSWEB)")
    ap.add_argument("--sim-key", help="its API key")
    ap.add_argument("--only", help="comma-separated scenarios: paged,sim_capacity,fanout,latency,rate_limit,http_client")
    ap.add_argument("--pairs", type=int, default=3, help="http_client: A/B pairs")
    args = ap.parse_args(argv)
    scale = 0.01 if args.quick else args.scale
    only = set(args.only.split(",")) if args.only else None

    def want(name: str) -> bool:
        return only is None or name in only

    from common import config
    from common import stack as stack_mod

    tmp = None
    own_stack = False
    os.environ.setdefault("ENABLE_METRICS", "false")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ["LOG_FORMAT"] = "json"
    os.environ["KAFKA_TOPIC_PREFIX"] = f"bench{uuid.uuid4().hex[:6]}"
    config.reset_settings()
    try:
        stack_mod.database_dsn()
        stack_mod.bootstrap_servers()
    except Exception:  # noqa: BLE001 - no stack configured: start a private one
        tmp = Path(tempfile.mkdtemp(prefix="trialsync-bench-"))
        tmp.chmod(0o755)
        os.environ["TRIALSYNC_STATE_DIR"] = str(tmp)
        config.reset_settings()
        stack_mod.up()
        own_stack = True
    from common.catalog import load_catalog, sync
    from common.db import migrate
    from common.logging import setup_logging

    setup_logging("bench")
    migrate()
    sync(load_catalog())
    sim = Sim(args.sim_url, args.sim_key, scale)
    os.environ.update({"CC_API_BASE_URL": sim.base_url, "CC_API_KEY": sim.key, "CC_API_KEY_HEADER": sim.header})
    config.reset_settings()
    s = config.get_settings()
    out: dict[str, Any] = {"bench": "extract", "scale": scale, "machine_cpus": os.cpu_count(),
                           "defaults": {"ETL_PARALLEL_JOBS": s.etl_parallel_jobs, "KAFKA_PARTITIONS": s.kafka_partitions}}
    try:
        sim.faults(None)
        if want("paged"):
            res = {}
            for engine in ("async", "threads"):
                run(9, engine=engine, workers=5)  # warm-up: topic creation, connections, caches
                res[engine] = run(9, engine=engine, workers=5)
            out["paged"] = {"job": 9, "goal_records_per_s": 25000, **res}
        patients = [e["record"] for e in sim.expected("/api/v1/patients/odata")]
        seed_parents("dim_patients_staging", patients, s.cc_instance_id)
        paths = [f"/api/v1/patients/{p['id']}/devices" for p in patients]
        cap = None
        if want("sim_capacity") or want("fanout"):
            cap = sim_capacity(sim, paths, seconds=3.0 if args.quick else 5.0)
            out["sim_capacity"] = cap
        if want("fanout"):
            res = {}
            for name, kw in (("async_c16", {"engine": "async", "workers": 16}),
                             ("async_c5", {"engine": "async", "workers": 5}),
                             ("async_c32", {"engine": "async", "workers": 32}),
                             ("threads_c16", {"engine": "threads", "workers": 16}),
                             ("processes2_async_c16", {"engine": "async", "workers": 16, "processes": 2}),
                             ("processes2_threads_c16", {"engine": "threads", "workers": 16, "processes": 2})):
                tries = [run(147, **kw) for _ in range(1 if args.quick or "processes" in kw else 3)]
                tries.sort(key=lambda t: t["requests_per_s"] or 0)
                r = dict(tries[len(tries) // 2])  # the median run
                r["requests_per_s_all"] = [t["requests_per_s"] for t in tries]
                if cap and r["requests_per_s"]:
                    r["share_of_sim_capacity"] = round(r["requests_per_s"] / cap["requests_per_s"], 3)
                res[name] = r
            out["fanout"] = {"job": 147, "parents": len(patients), "goal_share": 0.8, **res}
        if want("http_client"):
            out["http_client"] = compare_http_clients(args.pairs)
        if want("latency"):
            sim.faults("latency,ms=50")
            res = {}
            for c in ((5, 20) if args.quick else (5, 20, 50)):
                subset = [{"patientId": str(p["id"])} for p in patients[: max(100, c * 30)]]
                r = run(147, engine="async", workers=c, only_parents=subset)
                r["ideal_requests_per_s"] = round(c / 0.05)
                r["share_of_ideal"] = round(r["requests_per_s"] / (c / 0.05), 3) if r["requests_per_s"] else None
                res[f"c{c}"] = r
            sim.faults(None)
            out["latency_50ms"] = {"job": 147, "goal_share": 0.8, **res}
        if want("rate_limit"):
            os.environ["CC_RATE_LIMIT_RPS"] = "10"
            config.reset_settings()
            from producers import rate_limit

            rate_limit._LIMITERS.clear()  # noqa: SLF001 - fresh limiter at the new rate
            subset = [{"patientId": str(p["id"])} for p in patients[:50 if args.quick else 80]]
            with WireClock() as wc:
                r = run(147, engine="async", workers=16, only_parents=subset)
            span = (max(wc.times) - min(wc.times)) if len(wc.times) > 1 else 0
            r["observed_requests_per_s"] = round((len(wc.times) - 1) / span, 2) if span else None
            r["max_requests_in_any_1s_window"] = wc.max_in_window(1.0)
            out["rate_limit_10rps"] = {"job": 147, "goal_max_per_s": 10, **r}
            os.environ.pop("CC_RATE_LIMIT_RPS", None)
            config.reset_settings()
    finally:
        sim.stop()
        if own_stack:
            with contextlib.suppress(Exception):
                stack_mod.down()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
