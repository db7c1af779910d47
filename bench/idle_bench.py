"""What an idle installation costs: the loader and transformer services running with nothing to do.

    .venv/bin/python -m bench.idle_bench [--seconds 60] [--warmup 15] [--running-stack] [--out FILE]

Starts a temporary embedded stack (PostgreSQL 16 + tansu) unless ``--running-stack``, creates the
bronze topics of every runnable job (as after a first night: the loader's subscription matches
them all) and the control topics, starts the real ``trialsync load`` and ``trialsync transform``
services, lets them join their groups (``--warmup``), then reads the CPU time of each part from
/proc over ``--seconds``: the broker, each service's process tree, and the PostgreSQL server
(all its processes: the services' backends, the checkpointer, autovacuum...). Prints JSON with
CPU seconds and the share of one core per part (goal: broker + services < 2 %, issue 17).
Numbers on a shared machine are indicative; CPU time is what this measures, not wall time.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procwatch import TICK, proc_table  # noqa: E402


def tree_ticks(table: dict[int, tuple[int, int]], root: int | None) -> int:
    """CPU ticks of ``root`` and every process below it (children at the moment of reading)."""
    if root is None or root not in table:
        return 0
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _t) in table.items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += table[pid][1]
        todo.extend(kids.get(pid, ()))
    return total


def measure(roots: dict[str, int | None], seconds: float) -> dict[str, Any]:
    t0, a = time.monotonic(), proc_table()
    time.sleep(seconds)
    t1, b = time.monotonic(), proc_table()
    wall = t1 - t0
    parts: dict[str, Any] = {}
    for name, pid in roots.items():
        used = (tree_ticks(b, pid) - tree_ticks(a, pid)) / TICK
        parts[name] = {"cpu_s": round(used, 3), "core_share_pct": round(100 * used / wall, 2)}
    return {"seconds": round(wall, 1), "parts": parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--running-stack", action="store_true")
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args()

    state_dir = None
    if not ns.running_stack:
        state_dir = tempfile.mkdtemp(prefix="trialsync-idle-")
        os.chmod(state_dir, 0o755)
        os.environ["TRIALSYNC_STATE_DIR"] = state_dir
    os.environ.setdefault("KAFKA_TOPIC_PREFIX", f"idle{int(time.time())}")
    os.environ["ENABLE_METRICS"] = "false"
    from common import config, kafka, stack
    from common.catalog import load_catalog, sync
    from common.db import migrate
    from orchestrator.services import Services

    config.reset_settings()
    out: dict[str, Any] = {"bench": "idle", "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    services = None
    try:
        st = stack.up() if state_dir else stack.read_state()
        migrate()
        catalog = load_catalog()
        sync(catalog)
        topics = sorted({kafka.bronze_topic(j.target_table) for j in catalog.runnable})
        kafka.ensure_topics(topics)
        kafka.ensure_system_topics()
        out["bronze_topics"] = len(topics)
        services = Services()
        loader = services.start_loader()
        transformer = services.start_transformer()
        time.sleep(ns.warmup)
        roots = {"broker": st.kafka_pid, "loader": loader.pid, "transformer": transformer.pid,
                 "postgresql": st.pg_pid}
        out.update(measure(roots, ns.seconds))
        p = out["parts"]
        out["broker_and_services_core_share_pct"] = round(
            sum(p[k]["core_share_pct"] for k in ("broker", "loader", "transformer")), 2)
        out["with_postgresql_core_share_pct"] = round(sum(v["core_share_pct"] for v in p.values()), 2)
        out["loadavg_after"] = os.getloadavg()
    finally:
        if services is not None:
            with contextlib.suppress(Exception):
                services.stop_all()
        if state_dir:
            with contextlib.suppress(Exception):
                stack.down()
            shutil.rmtree(state_dir, ignore_errors=True)
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if ns.out:
        ns.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
