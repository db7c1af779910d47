"""Simulator throughput and memory, printed as JSON.

    .venv/bin/python -m bench.simulator_bench [--scale 0.05] [--seconds 8] [--memory] [--out FILE]

Measures, against a real ``trialsync simulator serve`` subprocess (1 worker, pinned to one CPU
when the machine has two or more; the load generator runs in this process on the other CPU):

* ``paged``: records/s served by ``/api/v1/patient-visits/odata?$top=1000&$skip=…`` (goal ≥ 30,000);
* ``small``: requests/s of small parameterized calls -- ``/patients/{id}/allergies`` and
  ``/studies/{id}/subjects/odata?$top=50`` over real parent ids (goal ≥ 1,500), zero latency;
* each with a Python load generator (threads of keep-alive ``http.client`` connections, bodies
  read fully, paged bodies parsed to count records) and with ``wrk`` when it is installed
  (``apt-get install wrk``);
* ``--memory``: RSS of a scale-1.0 server (2.3 M patient visits) after start-up and after
  paging, from /proc (goal < 2 GiB).

Numbers on a shared 2-core machine are indicative; the lead re-measures on a quiet one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulator.testing import SimulatorProcess  # noqa: E402

KEY = "bench-key"


def _pin(pid: int, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        try:
            os.sched_setaffinity(pid, {cpu})
        except OSError:
            pass


def _pin_tree(pid: int, cpu: int) -> None:
    _pin(pid, cpu)
    for child in Path(f"/proc/{pid}/task").iterdir() if Path(f"/proc/{pid}/task").exists() else []:
        _pin(int(child.name), cpu)


def _rss_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def _server_pid(sim: SimulatorProcess) -> int:
    """The serving process (the helper's pid is the CLI process itself)."""
    return sim.pid


def python_load(port: int, paths: list[str], seconds: float, threads: int, count_records: bool) -> dict:
    """Keep-alive GETs over ``paths`` round-robin from ``threads`` connections for ``seconds``."""
    stop = time.monotonic() + seconds
    totals = {"requests": 0, "records": 0, "bytes": 0, "errors": 0}
    lock = threading.Lock()

    def worker(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        n = rec = size = err = 0
        i = offset
        while time.monotonic() < stop:
            path = paths[i % len(paths)]
            i += threads
            try:
                conn.request("GET", path, headers={"X-ApiKey": KEY})
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                err += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            if resp.status != 200:
                err += 1
                continue
            n += 1
            size += len(body)
            if count_records:
                data = orjson.loads(body)
                rec += len(data["Items"] if isinstance(data, dict) else data)
        conn.close()
        with lock:
            totals["requests"] += n
            totals["records"] += rec
            totals["bytes"] += size
            totals["errors"] += err

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.monotonic() - t0
    return {"tool": "python http.client", "threads": threads, "seconds": round(elapsed, 2),
            "requests_per_s": round(totals["requests"] / elapsed, 1),
            "records_per_s": round(totals["records"] / elapsed, 1) if count_records else None,
            "mib_per_s": round(totals["bytes"] / elapsed / 2**20, 1), "errors": totals["errors"]}


def wrk_load(port: int, paths: list[str], seconds: float, connections: int, records_per_request: float | None,
             cpu: int | None) -> dict | None:
    """The same load with wrk (C, event-driven): the client is never the bottleneck."""
    if shutil.which("wrk") is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("paths = {" + ",".join(json.dumps(p) for p in paths) + "}\n"
                "i = 0\n"
                'wrk.headers["X-ApiKey"] = "' + KEY + '"\n'
                "request = function()\n  i = i + 1\n  return wrk.format(nil, paths[(i % #paths) + 1])\nend\n"
                "done = function(summary, latency, requests)\n"
                '  io.write(string.format("JSON {\\"requests\\": %d, \\"errors\\": %d, \\"p50_ms\\": %.2f, \\"p99_ms\\": %.2f, \\"duration_us\\": %d}\\n",'
                " summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read"
                " + summary.errors.timeout, latency:percentile(50)/1000, latency:percentile(99)/1000, summary.duration))\n"
                "end\n")
        script = f.name
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "-s", script, f"http://127.0.0.1:{port}"]
    if cpu is not None and shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    os.unlink(script)
    line = next((ln for ln in out.splitlines() if ln.startswith("JSON ")), None)
    if line is None:
        return {"tool": "wrk", "error": out[-500:]}
    s = json.loads(line[5:])
    secs = s["duration_us"] / 1e6
    rps = s["requests"] / secs
    res = {"tool": "wrk", "connections": connections, "seconds": round(secs, 2), "requests_per_s": round(rps, 1),
           "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "errors": s["errors"]}
    if records_per_request:
        res["records_per_s"] = round(rps * records_per_request, 1)
    return res


def throughput(scale: float, seconds: float) -> dict:
    with SimulatorProcess(scale=scale, seed=42, api_key=KEY, startup_timeout=600) as sim:
        _pin_tree(_server_pid(sim), 0)
        _pin(0, 1)  # this process (load generator) on the other CPU
        total = sim.counts()["/api/v1/patient-visits/odata"]["records"]
        pages = [f"/CCSWEB/api/v1/patient-visits/odata?$top=1000&$skip={s}" for s in range(0, total - 999, 1000)]
        patients = [p["patientId"] for p in sim.parents("/api/v1/patients/{patientId}/allergies")][:5000]
        studies = [p["studyId"] for p in sim.parents("/api/v1/studies/{studyId}/subjects/odata")][:5000]
        small = []
        for k in range(max(len(patients), len(studies))):
            if k < len(patients):
                small.append(f"/CCSWEB/api/v1/patients/{patients[k]}/allergies")
            if k < len(studies):
                small.append(f"/CCSWEB/api/v1/studies/{studies[k]}/subjects/odata?$top=50")
        # warm-up (JIT-free Python, but caches and lazy variants)
        python_load(sim.port, pages[:5] + small[:50], 1.0, 2, False)
        result = {
            "scale": scale, "patient_visits": total, "server_workers": 1,
            "paged_top_1000": {
                "python": python_load(sim.port, pages, seconds, 2, True),
                "wrk": wrk_load(sim.port, pages, seconds, 4, 1000.0, 1),
                "goal_records_per_s": 30_000,
            },
            "small_parameterized": {
                "python": python_load(sim.port, small, seconds, 8, False),
                "wrk": wrk_load(sim.port, small, seconds, 16, None, 1),
                "goal_requests_per_s": 1_500,
            },
            "server_memory_mib": _rss_mib(_server_pid(sim)),
        }
        stats = sim.stats()
        result["server_errors"] = {t: {s: n for s, n in by.items() if s != "200"}
                                   for t, by in stats["requests"].items() if set(by) - {"200"}}
        return result


def memory(seconds: float) -> dict:
    t0 = time.monotonic()
    with SimulatorProcess(scale=1.0, seed=42, api_key=KEY, startup_timeout=900) as sim:
        started = time.monotonic() - t0
        pid = _server_pid(sim)
        after_start = _rss_mib(pid)
        counts = {t: c["records"] for t, c in sim.counts().items() if c.get("records")}
        pages = [f"/CCSWEB/api/v1/patient-visits/odata?$top=1000&$skip={s}" for s in range(0, 2_000_000, 1000)]
        filtered = [f"/CCSWEB/api/v1/appointments/odata?$top=1000&$skip={s}&$filter=modifiedDate%20gt%202023-01-01T00:00:00Z"
                    "&$orderby=modifiedDate" for s in range(0, 200_000, 1000)]
        load = python_load(sim.port, pages + filtered, seconds, 2, True)
        sim.mutate("patient_visits", modify=0.05, insert=0.01, delete=0.01)
        after_mutation = _rss_mib(pid)
        return {"scale": 1.0, "startup_seconds": round(started, 1), "rss_after_start_mib": after_start,
                "rss_after_paging_and_a_5pct_mutation_mib": after_mutation, "paging_during_test": load,
                "records": {k: v for k, v in counts.items() if v >= 100_000}, "goal_mib": 2048}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--memory", action="store_true", help="also measure a scale-1.0 server (~1 min)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = {"bench": "simulator", "cpus": os.cpu_count(), "throughput": throughput(args.scale, args.seconds)}
    if args.memory:
        result["memory"] = memory(args.seconds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
