"""The shared request-rate limiter: never more than R requests in any 1-second window."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from producers.rate_limit import RateLimiter, SharedRateLimiter, limiter_for


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        with self.lock:
            self.t += s


def max_in_window(starts: list[float], window: float = 1.0) -> int:
    starts = sorted(starts)
    best, j = 0, 0
    for i, t in enumerate(starts):
        while starts[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_spacing_keeps_every_window_at_or_under_rate() -> None:
    clk = FakeClock()
    lim = RateLimiter(10, clock=clk, sleep=clk.sleep)
    starts = []
    for _ in range(50):
        lim.acquire()
        starts.append(clk.t)
    assert max_in_window(starts, 1.0 - 1e-9) <= 10
    assert starts[-1] - starts[0] >= 4.9 - 1e-9


def test_burst_allows_that_many_at_once() -> None:
    clk = FakeClock()
    lim = RateLimiter(10, burst=5, clock=clk, sleep=clk.sleep)
    starts = []
    for _ in range(5):
        lim.acquire()
        starts.append(clk.t)
    assert starts == pytest.approx([1000.0] * 5)
    lim.acquire()
    assert clk.t > 1000.0


def test_unlimited_never_waits() -> None:
    clk = FakeClock()
    lim = RateLimiter(0, clock=clk, sleep=clk.sleep)
    for _ in range(100):
        assert lim.acquire() == 0.0
    assert clk.t == 1000.0


def test_pause_holds_everyone() -> None:
    clk = FakeClock()
    lim = RateLimiter(0, clock=clk, sleep=clk.sleep)
    lim.pause(3.0)
    assert lim.acquire() == 3.0


def test_threads_share_one_limiter() -> None:
    lim = RateLimiter(40)
    starts: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            lim.acquire()
            with lock:
                starts.append(time.monotonic())

    ts = [threading.Thread(target=work) for _ in range(4)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    # 40 requests at 40/s, spaced: the last one cannot start before 39/40 s
    assert time.monotonic() - t0 >= 39 / 40 - 0.01
    assert max_in_window(starts, 0.5 - 0.01) <= 21


def _proc(lim: SharedRateLimiter, out: mp.Queue, n: int) -> None:
    for _ in range(n):
        lim.acquire()
        out.put(time.monotonic())


def test_processes_share_one_limiter() -> None:
    ctx = mp.get_context("spawn")
    lim = SharedRateLimiter(30, ctx=ctx)
    out: mp.Queue = ctx.Queue()
    ps = [ctx.Process(target=_proc, args=(lim, out, 10)) for _ in range(3)]
    for p in ps:
        p.start()
    starts = [out.get(timeout=60) for _ in range(30)]
    for p in ps:
        p.join(30)
    starts.sort()
    # 30 requests at 30/s across three processes: spaced at least ~1/30 s apart overall
    assert starts[-1] - starts[0] >= 29 / 30 - 0.05
    assert max_in_window(starts, 0.5 - 0.01) <= 16


def test_limiter_for_is_one_per_instance() -> None:
    a = limiter_for("inst-a", 5)
    assert limiter_for("inst-a", 5) is a
    assert limiter_for("inst-b", 5) is not a


def test_late_wakeups_never_squeeze_requests_together() -> None:
    clk = FakeClock()
    late = iter([0.05, 0.0, 0.08, 0.0, 0.0, 0.03] * 10)

    def oversleep(s: float) -> None:  # the OS wakes us up later than asked, now and then
        clk.sleep(s + next(late))

    lim = RateLimiter(10, clock=clk, sleep=oversleep)
    sent = []
    for _ in range(40):
        lim.acquire()
        sent.append(clk.t)
    gaps = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    assert min(gaps) >= 0.1 - 1e-9
    assert max_in_window(sent, 1.0) <= 10
