"""Peak memory and CPU time per process type while a benchmark runs, from /proc.

Why /proc polling of whole process trees: the processes that matter are not all ours to wrap --
the orchestrator forks extraction workers from a forkserver, ``trialsync load --workers 2`` spawns
loader processes, PostgreSQL forks a backend per connection. Every ``interval`` seconds the
watcher reads ``/proc/*/stat`` once (pid -> parent, CPU ticks) and walks the tree below each
registered root. Per type it keeps

* the peak of the tree's memory total, as proportional set size (shared pages -- PostgreSQL's
  shared buffers, a forkserver's copy-on-write pages -- count once), and the peak resident set of
  its largest single process (a type such as "extractor workers" is several processes: what the
  host needs vs what one process needs);
* the CPU seconds its processes used while watched (user + system). On a small machine where the
  simulator, extractors, broker, loader and PostgreSQL share the cores, this says where the wall
  time went; ``machine_cpu_s`` (all processes, from /proc/stat) shows what other tenants took.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime ticks) of every process visible now."""
    out: dict[int, tuple[int, int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            data = (d / "stat").read_bytes()
            f = data[data.rfind(b")") + 2:].split()
            out[int(d.name)] = (int(f[1]), int(f[11]) + int(f[12]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def rss_bytes(pid: int) -> int:
    try:
        return int((Path(f"/proc/{pid}/statm")).read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def machine_ticks() -> int:
    """CPU ticks of the whole machine spent not idle (user, nice, system, irq, softirq, steal)."""
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        v = [int(x) for x in f]
        return sum(v) - v[3] - (v[4] if len(v) > 4 else 0)
    except (OSError, ValueError, IndexError):
        return 0


def descendants(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in table:
            out.append(p)
            todo.extend(children.get(p, ()))
    return out


@dataclass
class _Kind:
    total: int = 0
    largest: int = 0
    processes: int = 0
    #: pid -> (ticks when first seen, latest ticks)
    cpu: dict[int, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        ticks = sum(last - first for first, last in self.cpu.values())
        return {"peak_total_mib": round(self.total / 2**20, 1), "peak_process_mib": round(self.largest / 2**20, 1),
                "max_processes": self.processes, "cpu_s": round(ticks / TICK, 1)}


@dataclass
class ProcWatch:
    """Register roots per type (``add``), ``start()``, run the workload, ``stop()`` -> per type."""

    interval: float = 0.5
    roots: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    kinds: dict[str, _Kind] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _started: bool = False
    _machine0: int = 0
    _wall0: float = 0.0

    def add(self, kind: str, pid: int | None, what: str = "tree") -> None:
        """Count processes as ``kind``: ``tree`` = ``pid`` and everything below it, ``self`` = only
        ``pid``, ``below`` = only its descendants (the extraction workers below the orchestrator)."""
        if pid:
            with self._lock:
                self.roots.setdefault(kind, []).append((pid, what))
                self.kinds.setdefault(kind, _Kind())

    def sample(self) -> None:
        table = proc_table()
        with self._lock:
            roots = {k: list(v) for k, v in self.roots.items()}
            started = self._started
        for kind, rs in roots.items():
            pids: set[int] = set()
            for root, what in rs:
                if what == "self":
                    if root in table:
                        pids.add(root)
                    continue
                pids.update(p for p in descendants(root, table) if what == "tree" or p != root)
            k = self.kinds[kind]
            sizes = [rss_bytes(p) for p in pids]
            total = sum(pss_bytes(p) for p in pids) if len(pids) > 1 else sum(sizes)
            k.total = max(k.total, total)
            k.largest = max(k.largest, max(sizes, default=0))
            k.processes = max(k.processes, sum(1 for s in sizes if s))
            for p in pids:
                ticks = table[p][1]
                seen = k.cpu.get(p)
                if seen is None:
                    # a process already running when watching began counts from now; a new one from 0
                    k.cpu[p] = [ticks if not started else 0, ticks]
                else:
                    seen[1] = max(seen[1], ticks)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> ProcWatch:
        import time

        self._machine0, self._wall0 = machine_ticks(), time.monotonic()
        self.sample()
        with self._lock:
            self._started = True
        self._thread = threading.Thread(target=self._loop, name="procwatch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, dict[str, Any]]:
        import time

        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()
        out = {k: v.as_dict() for k, v in self.kinds.items()}
        out["machine"] = {"cpu_s": round((machine_ticks() - self._machine0) / TICK, 1),
                          "wall_s": round(time.monotonic() - self._wall0, 1), "cores": os.cpu_count()}
        return out
