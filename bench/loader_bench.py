"""Loader throughput and end-to-end lag, printed as JSON.

    .venv/bin/python -m bench.loader_bench [--records 300000] [--existing 1000000]
        [--batch-size 10000] [--flush-ms 500] [--lag-rate 10000] [--lag-seconds 20]
        [--only copy,single,two,lag,micro] [--running-stack] [--out FILE]

Measures against a real PostgreSQL 16 and a real Kafka-API broker (a temporary embedded stack
unless ``--running-stack``), with ~400-byte JSON records carrying the extractor's headers:

* ``copy``: the ceiling -- plain ``COPY`` of the same rows straight into a staging table that
  already holds ``--existing`` rows (the issue quotes ~80,000 rows/s on this machine);
* ``single``: one loader process (``Loader`` with ``--once``, in a child process) draining
  ``--records`` new keys from a pre-filled topic into a staging table holding ``--existing`` rows
  (goal >= 50,000 records/s, reported as a ratio of ``copy``), timed from the first message
  consumed to the last batch committed (the group join is excluded);
* ``two``: two loader processes, each on its own topic and table (goal >= 1.6x ``single``);
* ``lag``: a loader running continuously while this process publishes at ``--lag-rate``
  records/s for ``--lag-seconds``; per record ``commit time - producer timestamp``
  (goal p95 < 2 s at 10,000 records/s);
* ``micro``: Python cost per record of building the COPY payload -- the loader's bulk text
  builder vs psycopg's binary ``copy.write_row`` -- plus the database time of COPYing each into
  the temporary table.

Numbers on a shared 2-core machine are indicative; the lead re-measures on a quiet one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TABLE_A = "zz_bench_a_staging"
TABLE_B = "zz_bench_b_staging"
HEADERS_BASE = [("ts-job-id", b"9"), ("ts-instance-id", b"cc1"), ("ts-params", b'{"studyId": 12}')]


def record(i: int, tag: str) -> bytes:
    """~400 bytes of JSON shaped like a CC patient visit."""
    return orjson.dumps({
        "id": i, "studyId": i % 500, "subjectId": i // 3, "patientId": i // 5, "visitName": f"Visit {i % 12}",
        "visitType": "Scheduled", "status": "Completed", "tag": tag,
        "scheduledDate": "2025-11-03T09:30:00Z", "actualDate": "2025-11-03T10:12:00Z",
        "modifiedDate": "2025-12-01T20:30:52Z", "siteId": i % 40, "coordinator": "A. Smith",
        "notes": "Patient tolerated procedure well; next visit per protocol schedule. " * 2,
    })


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of a process, from /proc (None where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# -- set-up ----------------------------------------------------------------------------------------

def prefill(conn, table: str, existing: int) -> float:
    """Create ``bronze.<table>`` holding ``existing`` rows (server-side, fast); returns seconds."""
    from psycopg import sql

    from common.db import staging_table

    t0 = time.monotonic()
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(staging_table(table)))
    conn.execute("SELECT etl.create_staging_table(%s)", (table,))
    conn.execute("SELECT etl.add_loader_columns(%s)", (table,))
    conn.execute(sql.SQL("""
        INSERT INTO {} (source_id, data, etl_job_id, etl_run_id, extracted_at, kafka_partition, kafka_offset)
        SELECT 'cc1:pre:' || g, jsonb_build_object('id', g, 'studyId', g %% 500, 'status', 'Completed',
               'notes', repeat('Patient tolerated procedure well; ', 9)), 9, 1, now() - interval '1 day', 0, g
        FROM generate_series(1, %s) g""").format(staging_table(table)), (existing,))
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(staging_table(table)))
    conn.execute("CHECKPOINT")
    return time.monotonic() - t0


def produce(topic: str, n: int, tag: str, run_id: int = 4242, partitions: int = 3, legacy: bool = False,
            changed: tuple[int, str] | None = None) -> float:
    """Publish ``n`` keys (``cc1:<tag>:<i>``) to ``topic`` as fast as possible; returns records/s.

    As the extractor does (``Publisher.publish_page``: one ``ts-load-v1`` header with the content
    hash), or with ``legacy`` the named headers of earlier versions. ``changed = (every, tag2)``:
    every ``every``-th record gets other content (a re-extraction where some records changed)."""
    from common.kafka import ensure_topics

    ensure_topics([topic], partitions=partitions)
    if not legacy:
        return _produce_publisher(topic, n, tag, run_id, changed)
    from confluent_kafka import Producer

    from common.kafka import producer_config

    p = Producer(producer_config())
    hdr = [*HEADERS_BASE, ("ts-run-id", str(run_id).encode()),
           ("ts-extracted-at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode())]
    t0 = time.monotonic()
    for i in range(n):
        while True:
            try:
                p.produce(topic, key=f"cc1:{tag}:{i}".encode(), value=record(i, tag), headers=hdr)
                break
            except BufferError:
                p.poll(0.05)
        if i % 5000 == 0:
            p.poll(0)
    p.flush(120)
    return n / (time.monotonic() - t0)


def _produce_publisher(topic: str, n: int, tag: str, run_id: int, changed: tuple[int, str] | None) -> float:
    from datetime import UTC, datetime

    from common.config import get_settings
    from producers.publisher import DeliveryTracker, Publisher, record_headers

    pub = Publisher(get_settings())
    tracker = DeliveryTracker(topic)
    hdr = record_headers(9, run_id, "cc1", datetime.now(UTC), {"studyId": 12})

    def key(rec: dict[str, Any], _params: Any) -> str:
        return f"cc1:{tag}:{rec['id']}"

    t0 = time.monotonic()
    for start in range(0, n, 1000):
        page = [orjson.loads(record(i, changed[1] if changed and i % changed[0] == 0 else tag))
                for i in range(start, min(n, start + 1000))]
        pub.publish_page(topic, page, key, {"studyId": 12}, hdr, tracker, "modifiedDate")
    pub.wait(tracker, 120)
    if tracker.failed:
        raise RuntimeError(f"publishing {topic}: {tracker.first_error}")
    return n / (time.monotonic() - t0)


# -- measurements --------------------------------------------------------------------------------

def measure_copy(conn, table: str, n: int) -> dict[str, Any]:
    """Plain COPY (text) of ``n`` rows into ``table`` -- the ceiling the loader is compared with."""
    from psycopg import sql

    from common.db import staging_table

    rows = [b"cc1:copy:%d\t" % i + record(i, "copy").replace(b"\\", b"\\\\") for i in range(n)]
    payload = b"\n".join(rows) + b"\n"
    backend = conn.info.backend_pid
    cpu0 = proc_cpu(backend)
    t0 = time.monotonic()
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} (source_id, data) FROM STDIN").format(staging_table(table))) as cp:
            for i in range(0, len(payload), 1 << 20):
                cp.write(payload[i:i + (1 << 20)])
    secs = time.monotonic() - t0
    cpu1 = proc_cpu(backend)
    conn.execute(sql.SQL("DELETE FROM {} WHERE source_id LIKE 'cc1:copy:%%'").format(staging_table(table)))
    conn.execute(sql.SQL("VACUUM {}").format(staging_table(table)))
    out = {"rows": n, "seconds": round(secs, 3), "rows_per_second": round(n / secs)}
    if cpu0 is not None and cpu1 is not None:
        out["postgres_cpu_us_per_row"] = round((cpu1 - cpu0) * 1e6 / n, 1)
    return out


def measure_copy_empty(conn, table: str, n: int, tag: str) -> dict[str, Any]:
    """Plain COPY (source_id, data) of the loader's own records into a new empty staging table."""
    from psycopg import sql

    from common.db import staging_table

    prefill(conn, table, 0)
    rows = [b"cc1:%s:%d\t" % (tag.encode(), i) + record(i, tag).replace(b"\\", b"\\\\") for i in range(n)]
    payload = b"\n".join(rows) + b"\n"
    backend = conn.info.backend_pid
    cpu0 = proc_cpu(backend)
    t0 = time.monotonic()
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} (source_id, data) FROM STDIN").format(staging_table(table))) as cp:
            for i in range(0, len(payload), 1 << 20):
                cp.write(payload[i:i + (1 << 20)])
    secs = time.monotonic() - t0
    cpu1 = proc_cpu(backend)
    conn.execute(sql.SQL("DROP TABLE {}").format(staging_table(table)))
    out = {"rows": n, "seconds": round(secs, 3), "rows_per_second": round(n / secs)}
    if cpu0 is not None and cpu1 is not None:
        out["postgres_cpu_us_per_row"] = round((cpu1 - cpu0) * 1e6 / n, 1)
    return out


def measure_paths(ns, prefix: str) -> dict[str, Any]:
    """The issue-17 targets, A B A B: per round, plain COPY of N records into an empty table, then
    one loader draining the same N records into an empty table (first load: the direct path),
    then the same N keys again with 1 % of contents changed into that now populated table (the
    upsert path). Ratios use each round's own COPY; medians over the rounds."""
    from common.db import connect
    from common.kafka import bronze_topic

    rounds: list[dict[str, Any]] = []
    env = use_prefix(prefix + "p")
    for r in range(ns.rounds):
        tag = f"p{r}"
        table = f"zz_bench_p{r}_staging"
        with connect(autocommit=True) as conn:
            copy = measure_copy_empty(conn, f"zz_bench_c{r}_staging", ns.records, tag)
            prefill(conn, table, 0)
        topic = bronze_topic(table)
        produce(topic, ns.records, tag, legacy=ns.legacy_headers)
        args = ["once", "--table", table, "--group", f"bench-paths-{prefix}-{r}",
                "--batch-size", str(ns.batch_size), "--flush-ms", str(ns.flush_ms)]
        first = child_result(run_child(args, env, ns.profile))
        produce(topic, ns.records, tag, run_id=4243, legacy=ns.legacy_headers, changed=(100, f"{tag}x"))
        reload = child_result(run_child(args, env, ns.profile))
        for x in (first, reload):
            x["ratio_to_copy"] = round(x["records_per_second"] / copy["rows_per_second"], 3)
        rounds.append({"copy": copy, "first_load": first, "reload_1pct_changed": reload,
                       "loadavg": os.getloadavg()})
        with connect(autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS bronze.{table}")

    def med(path: str, key: str) -> float | None:
        vals = [x[path].get(key) for x in rounds if x[path].get(key) is not None]
        return round(statistics.median(vals), 3) if vals else None

    summary = {p: {k: med(p, k) for k in ("records_per_second", "rows_per_second", "ratio_to_copy",
                                          "loader_process_cpu_us_per_record", "postgres_backend_cpu_us_per_record",
                                          "postgres_cpu_us_per_row") if med(p, k) is not None}
               for p in ("copy", "first_load", "reload_1pct_changed")}
    return {"records": ns.records, "rounds": rounds, "median": summary,
            "headers": "legacy named headers" if ns.legacy_headers else "ts-load-v1"}


def use_prefix(prefix: str) -> dict[str, str]:
    """Topics of each measurement live under their own prefix (fresh topics, fresh groups)."""
    from common import config

    os.environ["KAFKA_TOPIC_PREFIX"] = prefix
    config.reset_settings()
    return dict(os.environ)


def run_child(args: list[str], env: dict[str, str], profile: bool = False) -> subprocess.Popen:
    extra = ["--profile"] if profile else []
    return subprocess.Popen([sys.executable, "-m", "bench.loader_bench", "--child", *args, *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=str(Path(__file__).resolve().parent.parent))


def child_result(proc: subprocess.Popen, timeout: float = 900) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"bench child failed (exit {proc.returncode}): {out[-2000:]}")


def child_main(ns: argparse.Namespace) -> None:
    """In a child process: run a Loader and print one JSON line with timings."""
    from common.config import get_settings
    from common.logging import setup_logging
    from consumers.loader import Loader, LoaderOptions

    setup_logging("bench", level="WARNING")
    s = get_settings()
    first: list[float] = []
    last: list[float] = [0.0]
    lags: list[float] = []
    records = [0]

    class TimedLoader(Loader):
        def _add(self, msgs: list[Any], since: float | None = None) -> None:
            if not first and msgs:
                first.append(time.time())
            super()._add(msgs, since)

    cpu: dict[str, float | None] = {}

    def on_batch(info: dict[str, Any]) -> None:
        if not cpu:  # CPU from the end of the first batch to the end of the last one
            backend = loader.sink.conn.info.backend_pid if loader.sink.conn is not None else None
            cpu.update(backend=backend, me0=proc_cpu(os.getpid()), pg0=proc_cpu(backend) if backend else None,
                       n0=records[0] + info["records"])
        else:
            cpu.update(me1=proc_cpu(os.getpid()), pg1=proc_cpu(cpu["backend"]) if cpu["backend"] else None,
                       n1=records[0] + info["records"])
        last[0] = info["written_at"]
        records[0] += info["records"]
        if ns.child == "lag":
            now_ms = info["written_at"] * 1000
            for lst in info["batch"].values():
                lags.extend((now_ms - m.timestamp()[1]) / 1000 for m in lst)

    # several children sharing one group must join it (alone, a one-shot loader takes every partition)
    opts = LoaderOptions(group=ns.group, tables=[ns.table], batch_size=ns.batch_size, flush_ms=ns.flush_ms,
                         once=ns.child == "once", assign_when_alone=not ns.join_group)
    loader = TimedLoader(opts, s, on_batch=on_batch)
    prof = None
    if ns.profile:
        import cProfile

        prof = cProfile.Profile()  # the consumer thread only (where the per-record work is)
        prof.enable()
    loader.run()
    out: dict[str, Any] = {"records": records[0], "first": first[0] if first else None, "last": last[0]}
    if first and last[0]:
        out["seconds"] = last[0] - first[0]
        out["records_per_second"] = records[0] / max(1e-9, last[0] - first[0])
    n_cpu = (cpu.get("n1") or 0) - (cpu.get("n0") or 0)
    if n_cpu > 0:
        for name, a, b in (("loader_process", "me0", "me1"), ("postgres_backend", "pg0", "pg1")):
            if cpu.get(a) is not None and cpu.get(b) is not None:
                out[f"{name}_cpu_us_per_record"] = round((cpu[b] - cpu[a]) * 1e6 / n_cpu, 1)
    if prof is not None:
        import pstats

        prof.disable()
        st = pstats.Stats(prof)
        total = sum(v[2] for v in st.stats.values()) or 1e-9  # type: ignore[attr-defined]
        top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]  # type: ignore[attr-defined]
        out["profile_top_tottime"] = [
            {"function": f"{Path(f).name}:{line}:{fn}", "calls": v[1], "tottime_s": round(v[2], 3),
             "share": round(v[2] / total, 3), "us_per_record": round(v[2] * 1e6 / max(1, records[0]), 3)}
            for (f, line, fn), v in top]
    if lags:
        lags.sort()
        out["lag"] = {"count": len(lags), "p50": lags[len(lags) // 2], "p95": lags[int(len(lags) * 0.95)],
                      "p99": lags[int(len(lags) * 0.99)], "max": lags[-1], "mean": statistics.fmean(lags)}
    print(json.dumps(out), flush=True)


def measure_single(ns, prefix: str) -> dict[str, Any]:
    from common.kafka import bronze_topic

    env = use_prefix(prefix + "s")
    topic = bronze_topic(TABLE_A)
    rate = produce(topic, ns.records, f"s{prefix}", legacy=ns.legacy_headers)
    proc = run_child(["once", "--table", TABLE_A, "--group", f"bench-single-{prefix}",
                      "--batch-size", str(ns.batch_size), "--flush-ms", str(ns.flush_ms)], env)
    r = child_result(proc)
    r["produce_rate"] = round(rate)
    return r


def measure_two(ns, prefix: str) -> dict[str, Any]:
    from common.kafka import bronze_topic

    env = use_prefix(prefix + "t")
    for t in (TABLE_A, TABLE_B):
        produce(bronze_topic(t), ns.records, f"t{prefix}{t[-9]}", legacy=ns.legacy_headers)
    procs = [run_child(["once", "--table", t, "--group", f"bench-two-{prefix}-{t}",
                        "--batch-size", str(ns.batch_size), "--flush-ms", str(ns.flush_ms)], env)
             for t in (TABLE_A, TABLE_B)]
    rs = [child_result(p) for p in procs]
    start = min(r["first"] for r in rs)
    end = max(r["last"] for r in rs)
    total = sum(r["records"] for r in rs)
    return {"processes": rs, "records": total, "seconds": round(end - start, 3),
            "records_per_second": round(total / (end - start))}


def measure_lag(ns, prefix: str) -> dict[str, Any]:
    from confluent_kafka import Producer

    from common.kafka import bronze_topic, ensure_topics, producer_config

    env = use_prefix(prefix + "l")
    topic = bronze_topic(TABLE_A)
    ensure_topics([topic])
    proc = run_child(["lag", "--table", TABLE_A, "--group", f"bench-lag-{prefix}",
                      "--batch-size", str(ns.batch_size), "--flush-ms", str(ns.flush_ms)], env)
    # the group must have joined before the clock starts: publish a warm-up record and wait
    p = Producer(producer_config(**{"linger.ms": 5}))
    time.sleep(8)
    hdr = [*HEADERS_BASE, ("ts-run-id", b"4243")]
    sent = 0
    t0 = time.monotonic()
    tick = 0.01
    per_tick = max(1, int(ns.lag_rate * tick))
    while time.monotonic() - t0 < ns.lag_seconds:
        target = int((time.monotonic() - t0) * ns.lag_rate)
        while sent < target:
            ext = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()).encode() + b"Z"
            for _ in range(min(per_tick, target - sent)):
                p.produce(topic, key=f"cc1:lag{prefix}:{sent}".encode(), value=record(sent, "lag"),
                          headers=[*hdr, ("ts-extracted-at", ext)])
                sent += 1
        p.poll(0)
        time.sleep(tick)
    p.flush(60)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    r = child_result(proc)
    r["published"] = sent
    r["rate"] = ns.lag_rate
    return r


def measure_micro(n: int = 50_000) -> dict[str, Any]:
    """Cost per record of building and COPYing the batch into the temporary table, two ways: the
    loader's bulk text builder vs psycopg's binary ``copy.write_row``. Python CPU (this process)
    and PostgreSQL backend CPU are measured separately (best of 5; CPU time is steadier than wall
    time on a shared machine)."""
    import confluent_kafka

    from common.db import connect
    from consumers import staging_writer as sw

    hdr = [*HEADERS_BASE, ("ts-run-id", b"1"), ("ts-extracted-at", b"2025-12-01T20:30:52.123456+00:00"),
           ("ts-modified-at", b"2025-12-01T20:30:52Z")]
    msgs = [confluent_kafka.Message(topic="t", partition=i % 3, offset=i, key=f"cc1:m:{i}".encode(),
                                    value=record(i, "micro"), headers=hdr, timestamp=(1, 1_700_000_000_000))
            for i in range(n)]
    binary_copy = sw._COPY.as_string(None).replace("FROM STDIN", "FROM STDIN (FORMAT BINARY)")
    types = ["text", "bool", "text", "text", "text", "text", "text", "text", "text", "int4", "int8", "text"]

    def text_path(cur: Any) -> None:
        pb = sw.prepare(msgs)
        with cur.copy(sw._COPY) as cp:
            for chunk in pb.payload:
                cp.write(chunk)

    def binary_path(cur: Any) -> None:
        with cur.copy(binary_copy) as cp:
            cp.set_types(types)
            for m in msgs:
                v = m.value()
                hd = dict(m.headers())
                cp.write_row((m.key().decode(), v is None, v.decode() if v is not None else "",
                              hd.get("ts-run-id", b"").decode(), hd.get("ts-job-id", b"").decode(),
                              hd.get("ts-instance-id", b"").decode(), hd.get("ts-extracted-at", b"").decode(),
                              hd.get("ts-modified-at", b"").decode(), hd.get("ts-params", b"").decode(),
                              m.partition(), m.offset(), str(m.timestamp()[1])))

    out: dict[str, Any] = {"records": n}
    with connect(autocommit=True) as conn:
        conn.execute(sw._CREATE_TMP)
        backend = conn.info.backend_pid
        for name, fn in (("text_bulk_builder", text_path), ("binary_write_row", binary_path)):
            best_py = best_pg = float("inf")
            for _ in range(5):
                pg0, py0 = proc_cpu(backend), time.process_time()
                with conn.transaction(), conn.cursor() as cur:
                    fn(cur)
                py1, pg1 = time.process_time(), proc_cpu(backend)
                best_py = min(best_py, py1 - py0)
                if pg0 is not None and pg1 is not None:
                    best_pg = min(best_pg, pg1 - pg0)
            out[name] = {"python_cpu_us_per_record": round(best_py * 1e6 / n, 2),
                         "postgres_cpu_us_per_record": round(best_pg * 1e6 / n, 2) if best_pg < float("inf") else None}
    return out


# -- main ------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["once", "lag"], help=argparse.SUPPRESS)
    ap.add_argument("--table", help=argparse.SUPPRESS)
    ap.add_argument("--group", help=argparse.SUPPRESS)
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument("--existing", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--flush-ms", type=int, default=None)
    ap.add_argument("--lag-rate", type=int, default=10_000)
    ap.add_argument("--lag-seconds", type=float, default=20.0)
    ap.add_argument("--only", default="copy,single,two,lag,micro",
                    help="copy,single,two,lag,micro,paths (paths: the issue-17 first-load/reload targets)")
    ap.add_argument("--rounds", type=int, default=2, help="paths: A B rounds (medians reported)")
    ap.add_argument("--legacy-headers", action="store_true",
                    help="publish with the named headers of earlier versions instead of ts-load-v1")
    ap.add_argument("--profile", action="store_true", help="run the loader child under cProfile (top entries)")
    ap.add_argument("--join-group", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--running-stack", action="store_true", help="use the configured stack instead of a temporary one")
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args()

    from consumers.loader import DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_MS

    ns.batch_size = ns.batch_size or DEFAULT_BATCH_SIZE
    ns.flush_ms = ns.flush_ms or DEFAULT_FLUSH_MS
    if ns.child:
        child_main(ns)
        return

    only = set(ns.only.split(","))
    state_dir = None
    if not ns.running_stack:
        state_dir = tempfile.mkdtemp(prefix="trialsync-bench-")
        os.chmod(state_dir, 0o755)
        os.environ["TRIALSYNC_STATE_DIR"] = state_dir
    prefix = f"lb{int(time.time())}"
    os.environ["KAFKA_TOPIC_PREFIX"] = prefix
    os.environ["ENABLE_METRICS"] = "false"
    from common import config, stack
    from common.db import connect, migrate

    config.reset_settings()
    result: dict[str, Any] = {"bench": "loader", "records": ns.records, "existing_rows": ns.existing,
                              "batch_size": ns.batch_size, "flush_ms": ns.flush_ms, "cpus": os.cpu_count(),
                              "loadavg_before": os.getloadavg()}
    try:
        if state_dir:
            stack.up()
        migrate()
        with connect(autocommit=True) as conn:
            tables = [TABLE_A, TABLE_B] if "two" in only else [TABLE_A]
            result["prefill_seconds"] = {t: round(prefill(conn, t, ns.existing), 1)
                                         for t in tables if only & {"copy", "single", "two", "lag"}}
            if "copy" in only:
                result["copy"] = measure_copy(conn, TABLE_A, ns.records)
        if "single" in only:
            result["single"] = measure_single(ns, prefix)
        if "two" in only:
            result["two"] = measure_two(ns, prefix)
            if "single" in result:
                result["two"]["speedup_vs_single"] = round(
                    result["two"]["records_per_second"] / result["single"]["records_per_second"], 2)
        if "copy" in result and "single" in result:
            result["single"]["ratio_to_copy"] = round(
                result["single"]["records_per_second"] / result["copy"]["rows_per_second"], 3)
        if "paths" in only:
            result["paths"] = measure_paths(ns, prefix)
        if "lag" in only:
            result["lag"] = measure_lag(ns, prefix)
        if "micro" in only:
            result["micro"] = measure_micro()
        result["loadavg_after"] = os.getloadavg()
        result["goals"] = {
            "single_records_per_second>=50000": result.get("single", {}).get("records_per_second", 0) >= 50_000,
            "two_speedup>=1.6": result.get("two", {}).get("speedup_vs_single", 0) >= 1.6,
            "lag_p95<2s": result.get("lag", {}).get("lag", {}).get("p95", 99) < 2.0,
        }
    finally:
        if state_dir:
            with contextlib.suppress(Exception):
                stack.down()
            shutil.rmtree(state_dir, ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if ns.out:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
