"""Fan-out across worker *processes* (``run_job(..., processes=N)``, ``trialsync extract --processes N``).

Each worker process claims parent streams from a shared counter, fetches them with its own
:class:`~producers.fanout.ThreadFanout` (``threads`` requests in flight), and publishes the
records itself through its own idempotent producer -- records never cross a process boundary.
The parent process receives only small messages: per-stream outcome (``done`` with the record
count and max timestamp, or ``fail`` with the error), periodic progress, and at the end each
worker's delivery bookkeeping (per-partition counts and last offsets), which it merges into the
run's tracker. All workers share one :class:`~producers.rate_limit.SharedRateLimiter`.

Why it is not the default: measured on the 2-core reference machine (bench/extract_bench.py), the
thread fan-out reaches the simulator's capacity, and processes add start-up (spawn + imports,
~1 s each), a producer per process and IPC. Processes help where one core cannot keep up with the
API (many cores, a fast API, large pages). Caveat: the shared limiter is per run here; two
concurrent runs in different modes against one instance do not share a limiter.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import threading
import time
from datetime import UTC, datetime
from typing import Any

from producers.fanout import Stream, ThreadFanout


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


def worker_main(worker: int, settings: Any, job: Any, run_id: int, streams: list[Stream], counter: Any,
                results: Any, limiter: Any, threads: int, stop_evt: Any, tracks_watermarks: bool,
                engine: str = "async") -> None:
    """Body of one worker process (spawned): fetch claimed streams, publish, report."""
    from common import kafka as K
    from common.logging import setup_logging
    from producers import watermarks as wm_mod
    from producers.cc_client import CCClient
    from producers.keys import key_builder
    from producers.publisher import DeliveryTracker, Publisher, record_headers

    setup_logging("extractor")
    topic = K.bronze_topic(job.target_table, settings)
    publisher = Publisher(settings)
    tracker = DeliveryTracker(topic)
    stop = threading.Event()
    client = CCClient.from_settings(settings, limiter=limiter, pool_size=threads + 2, cancel=stop)

    def claim() -> int | None:
        if stop_evt.is_set():
            return None
        with counter.get_lock():
            i = counter.value
            counter.value = i + 1
        return i

    from producers.async_fanout import AsyncFanout
    from producers.extractor import stable_orderby
    from producers.fanout import drive

    keyfn = key_builder(job.primary_key, settings.cc_instance_id)
    ts_field = job.timestamp_field or None
    counts: dict[int, int] = {}
    maxes: dict[int, datetime] = {}
    totals = {"records": 0, "pages": 0, "missing": 0}
    last = [time.monotonic()]

    def on_page(idx: int, url: str, page: Any) -> None:
        st = streams[idx]
        headers = record_headers(job.id, run_id, settings.cc_instance_id, datetime.now(UTC), st.params)
        n, miss, stamps, _rep = publisher.publish_page(topic, page.records, keyfn, st.params, headers, tracker, ts_field)
        totals["records"] += n
        totals["missing"] += miss
        totals["pages"] += 1
        counts[idx] = counts.get(idx, 0) + n
        if stamps and tracks_watermarks:
            mt = wm_mod.max_timestamp(stamps)
            if mt is not None and (idx not in maxes or mt > maxes[idx]):
                maxes[idx] = mt

    def on_done(idx: int) -> None:
        results.put(("done", idx, counts.get(idx, 0), maxes.get(idx)))

    def on_fail(idx: int, err: BaseException) -> None:
        results.put(("fail", idx, _picklable(err)))

    def on_tick() -> None:
        if stop_evt.is_set():
            stop.set()
        now = time.monotonic()
        if now - last[0] > 0.25:
            last[0] = now
            results.put(("progress", worker, totals["records"], totals["pages"], client.api_calls, tracker.delivered))

    common = {"endpoint": job.endpoint, "odata": job.is_odata, "page_size": job.page_size,
              "orderby": stable_orderby(job), "stop": stop, "claim": claim}
    try:
        if engine == "async":
            AsyncFanout(client, streams, concurrency=threads, on_page=on_page, on_done=on_done, on_fail=on_fail,
                        on_tick=on_tick, **common).run()
        else:
            fan = ThreadFanout(client, streams, workers=threads, **common).start()
            try:
                drive(fan, on_page=on_page, on_done=on_done, on_fail=on_fail, on_tick=on_tick)
            finally:
                stop.set()
                fan.join(5)
        publisher.wait(tracker)
    finally:
        stop.set()
        client.close()
        results.put(("final", worker, tracker.snapshot(), totals["records"], totals["pages"], totals["missing"],
                     client.api_calls, client.retries, tracker.produced))


class ProcessFanout:
    """Starts the workers and turns their messages into the extractor's bookkeeping calls."""

    def __init__(self, settings: Any, job: Any, run_id: int, streams: list[Stream], *, processes: int,
                 threads: int, tracks_watermarks: bool, engine: str = "async"):
        self.ctx = mp.get_context("spawn")
        from producers.rate_limit import SharedRateLimiter

        self.limiter = SharedRateLimiter(settings.cc_rate_limit_rps, ctx=self.ctx)
        self.counter = self.ctx.Value("q", 0)
        self.results = self.ctx.Queue()
        self.stop = self.ctx.Event()
        self.procs = [
            self.ctx.Process(target=worker_main, name=f"extract-worker-{k}", daemon=True,
                             args=(k, settings, job, run_id, streams, self.counter, self.results, self.limiter,
                                   threads, self.stop, tracks_watermarks, engine))
            for k in range(max(1, processes))
        ]
        self.progress: dict[int, tuple[int, int, int, int]] = {}
        self.finals: dict[int, tuple[Any, ...]] = {}

    def start(self) -> ProcessFanout:
        for p in self.procs:
            p.start()
        return self

    def messages(self, tick: float = 0.25):
        """Yield worker messages until every worker sent its final report (or died)."""
        while len(self.finals) < len(self.procs):
            try:
                msg = self.results.get(timeout=tick)
            except queue.Empty:
                dead = [k for k, p in enumerate(self.procs) if not p.is_alive() and k not in self.finals]
                if dead:
                    # drain what a dying worker may still have queued
                    try:
                        while True:
                            yield self._note(self.results.get(timeout=0.5))
                    except queue.Empty:
                        pass
                    for k in dead:
                        if k not in self.finals:
                            self.finals[k] = ("died", k, self.procs[k].exitcode)
                            yield ("died", k, self.procs[k].exitcode)
                yield None
                continue
            yield self._note(msg)

    def _note(self, msg: tuple[Any, ...]) -> tuple[Any, ...]:
        if msg[0] == "progress":
            self.progress[msg[1]] = msg[2:]
        elif msg[0] == "final":
            self.finals[msg[1]] = msg
            self.progress[msg[1]] = (msg[3], msg[4], msg[6], msg[2]["delivered"])
        return msg

    def totals(self) -> tuple[int, int, int, int]:
        """(records, pages, api_calls, delivered) summed over workers, as last reported."""
        r = p = a = d = 0
        for rec, pg, calls, dl in self.progress.values():
            r, p, a, d = r + rec, p + pg, a + calls, d + dl
        return r, p, a, d

    def join(self, timeout: float = 30) -> None:
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(5)
