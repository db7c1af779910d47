"""Embedded broker storage: memory vs durable (tansu on s3:// against the local s3rver store).

    .venv/bin/python -m bench.broker_bench [--records 100000] [--rounds 3] [--engines memory,durable,moto]
                                           [--out FILE]

Engines: ``memory`` (tansu memory://), ``durable`` (the stack's default: tansu s3:// on the local
s3rver store with conditional PUTs, common/embedded_s3_server.js) and ``moto`` (tansu s3:// on
moto's S3 server from PyPI -- in memory itself, so not durable across its own restart; measured as
the other registry-installable S3 endpoint). Each round starts a fresh broker of each engine in
turn (alternating order, so machine noise hits all), produces ``--records`` extractor-sized records (~380-byte JSON, key = source id)
to a 3-partition topic with TrialSync's own producer settings, waits for every delivery report,
then reads them all back with an assigned consumer. Reported per storage (median over rounds):
produce and fetch records/s (wall), CPU-µs per record of the broker's processes (tansu + s3rver,
from /proc: the machine-independent cost), and disk bytes per record of the durable store. For the
durable broker a kill -9 + restart follows and the records are counted again (must be all).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from common import stack
from common.config import Settings
from common.kafka import ensure_topics, producer_config

TOPIC = "bench.bronze.broker_bench"
PARTITIONS = 3


def _cpu_seconds(pid: int | None) -> float:
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _broker_cpu(st: stack.StackState) -> float:
    return _cpu_seconds(st.kafka_pid) + _cpu_seconds(st.s3_pid)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _consume_all(bootstrap: str, n: int, timeout: float = 300) -> tuple[int, float]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-broker", "enable.auto.commit": False,
                  "fetch.max.bytes": 52_428_800, "log_level": 3})
    c.assign([TopicPartition(TOPIC, p, 0) for p in range(PARTITIONS)])
    got, t0 = 0, time.perf_counter()
    deadline = time.monotonic() + timeout
    while got < n and time.monotonic() < deadline:
        got += sum(1 for m in c.consume(10_000, 1.0) if not m.error())
    dt = time.perf_counter() - t0
    c.close()
    return got, dt


def _round_trip_ms(s: Settings, value: bytes, n: int = 200) -> float:
    """One record produced and acknowledged at a time (what a control message or a small page costs):
    median milliseconds per round trip."""
    topic = TOPIC + "_rtt"
    ensure_topics([topic], s, partitions=1)
    p = Producer(producer_config(s, **{"linger.ms": 0}))
    p.produce(topic, key=b"warm-up", value=value)
    p.flush(30)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        p.produce(topic, key=f"rtt:{i}".encode(), value=value)
        p.flush(30)
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def _start_moto(d: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """moto's S3 server with a bucket, and the environment tansu needs to use it."""
    import sys
    import urllib.request

    port = stack.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(d / "moto.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/tansu", method="PUT"), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    env = {"AWS_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    return proc, env


def _start_moto_broker(d: Path) -> tuple[stack.StackState, subprocess.Popen[bytes]]:
    moto, env = _start_moto(d)
    port = stack.free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([stack.tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "s3://tansu/"], env={**os.environ, **env},
                            stdout=open(d / "tansu.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    stack._wait_port(port, 15)
    return stack.StackState(kafka_port=port, kafka_pid=proc.pid, s3_pid=moto.pid), moto


def one(storage: str, records: int) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix=f"trialsync-bench-broker-{storage}-"))
    s = Settings(trialsync_state_dir=d, trialsync_broker_storage="memory" if storage == "moto" else storage,
                 kafka_bootstrap_servers=None, trialsync_kafka_port=None, enable_metrics=False)
    moto = None
    if storage == "moto":
        st, moto = _start_moto_broker(d)
    else:
        st = stack.start_broker(s, stack.StackState())
    try:
        bootstrap = f"127.0.0.1:{st.kafka_port}"
        s = Settings(trialsync_state_dir=d, kafka_bootstrap_servers=bootstrap, enable_metrics=False)
        ensure_topics([TOPIC], s, partitions=PARTITIONS)
        value = json.dumps({"id": 0, "name": "x" * 300, "modifiedDate": "2025-12-01T20:30:52Z"}).encode()
        rtt_ms = _round_trip_ms(s, value)
        p = Producer(producer_config(s))
        cpu0, t0 = _broker_cpu(st), time.perf_counter()
        for i in range(records):
            while True:
                try:
                    p.produce(TOPIC, key=f"cc1:{i}".encode(), value=value)
                    break
                except BufferError:
                    p.poll(0.05)
            if i % 5000 == 0:
                p.poll(0)
        left = p.flush(300)
        produce_s = time.perf_counter() - t0
        cpu1 = _broker_cpu(st)
        got, fetch_s = _consume_all(bootstrap, records)
        cpu2 = _broker_cpu(st)
        out: dict[str, Any] = {
            "storage": storage, "records": records, "undelivered": left, "fetched": got,
            "produce_round_trip_ms": rtt_ms,
            "produce_rps": round(records / produce_s), "fetch_rps": round(got / fetch_s) if fetch_s else None,
            "produce_cpu_us_per_record": round((cpu1 - cpu0) * 1e6 / records, 1),
            "fetch_cpu_us_per_record": round((cpu2 - cpu1) * 1e6 / max(got, 1), 1),
        }
        if storage == "durable":
            out["disk_bytes_per_record"] = round(_disk_bytes(d / "kafka" / "s3") / records, 1)
            assert st.kafka_pid is not None
            os.kill(st.kafka_pid, signal.SIGKILL)
            st.kafka_pid = None
            st = stack.start_broker(Settings(trialsync_state_dir=d, trialsync_broker_storage=storage,
                                             kafka_bootstrap_servers=None, enable_metrics=False), st)
            out["fetched_after_kill9"] = _consume_all(bootstrap, records)[0]
        return out
    finally:
        stack.stop_broker(s, st)
        if moto is not None:
            moto.terminate()
            moto.wait(30)
        else:
            stack.stop_object_store(s, st)
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="memory,durable", help="comma-separated: memory, durable, moto")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    rows: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for storage in order:
            row = one(storage, args.records)
            row["round"] = r
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary: dict[str, Any] = {}
    for storage in engines:
        mine = [x for x in rows if x["storage"] == storage]
        summary[storage] = {k: statistics.median(x[k] for x in mine)
                            for k in ("produce_round_trip_ms", "produce_rps", "fetch_rps", "produce_cpu_us_per_record",
                                      "fetch_cpu_us_per_record") if all(x.get(k) is not None for x in mine)}
        if storage == "durable":
            summary[storage]["disk_bytes_per_record"] = statistics.median(x["disk_bytes_per_record"] for x in mine)
            summary[storage]["all_back_after_kill9"] = all(x["fetched_after_kill9"] == args.records for x in mine)
    if "memory" in summary:
        m = summary["memory"]
        summary["ratio_to_memory"] = {
            e: {"produce_rps": round(summary[e]["produce_rps"] / m["produce_rps"], 3),
                "fetch_rps": round(summary[e]["fetch_rps"] / m["fetch_rps"], 3)} for e in engines if e != "memory"}
    result = {"records": args.records, "rounds": args.rounds, "loadavg": os.getloadavg(), "runs": rows,
              "summary": summary}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
