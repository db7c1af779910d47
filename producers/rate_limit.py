"""Request-rate limiting shared by every worker that talks to one Clinical Conductor instance.

Why a "next free slot" scheduler (GCRA, a token bucket of capacity 1) and not a bucket with a
large burst: a gateway that allows R req/s counts requests per window, and a burst of B tokens lets
a client send B + R*T requests in T seconds -- more than R/s over any short run. Spacing requests
1/R apart keeps the observed rate at or under R over every window, which is what an operator who
sets ``CC_RATE_LIMIT_RPS=10`` expects. ``burst`` can still be raised for APIs that allow it.

A 429 from the server pauses *all* workers (``pause``), not only the one that got it: the limit is
per API key, so the other workers would be refused too.

Two implementations with one interface:

* :class:`RateLimiter` -- threads of one process (a lock and two floats);
* :class:`SharedRateLimiter` -- worker processes (``multiprocessing`` shared doubles and a lock;
  ``time.monotonic`` is the system-wide CLOCK_MONOTONIC on Linux, so processes agree on "now").

:func:`limiter_for` returns the one limiter of an instance within a process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol


class Limiter(Protocol):
    rate: float

    def reserve(self) -> float: ...

    def confirm(self) -> None: ...

    def acquire(self) -> float: ...

    def pause(self, seconds: float) -> None: ...


class _Slots:
    """The scheduling arithmetic, independent of where the two numbers live."""

    @staticmethod
    def reserve(now: float, next_free: float, paused_until: float, interval: float, burst: int) -> tuple[float, float]:
        """GCRA: return (time this request may start, new theoretical next slot)."""
        start = max(now, next_free - interval * (burst - 1), paused_until)
        return start, max(next_free, start) + interval


class RateLimiter:
    """Thread-safe limiter: ``acquire()`` blocks until the caller may send one request.

    ``rate`` <= 0 means unlimited (``acquire`` only honours a pause).
    """

    def __init__(self, rate: float, burst: int = 1, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self.interval = 1.0 / self.rate if self.rate > 0 else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        #: senders pass one at a time while a rate applies, so the spacing holds between *actual*
        #: send times (a late wake-up pushes the next slot back instead of squeezing two together)
        self._gate = threading.Lock()
        self._next = 0.0
        self._paused_until = 0.0

    def reserve(self) -> float:
        """Book the next slot without waiting; return how long the caller must wait before sending
        (the asyncio engine awaits it, threads sleep it)."""
        with self._lock:
            now = self._clock()
            if self.rate <= 0:
                start = max(now, self._paused_until)
            else:
                start, self._next = _Slots.reserve(now, self._next, self._paused_until, self.interval, self.burst)
        return max(0.0, start - now)

    def confirm(self) -> None:
        """Call right after sending: the next slot is at least one interval after *now*."""
        if self.rate > 0:
            with self._lock:
                self._next = max(self._next, self._clock() + self.interval - self.interval * (self.burst - 1))

    def acquire(self) -> float:
        """Wait for a slot; return the seconds waited."""
        if self.rate <= 0:
            wait = self.reserve()
            if wait > 0:
                self._sleep(wait)
            return wait
        with self._gate:
            wait = self.reserve()
            if wait > 0:
                self._sleep(wait)
            self.confirm()
        return wait

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` (a 429's Retry-After)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))


class SharedRateLimiter:
    """The same limiter for worker processes. Create it in the parent and pass it to the children
    (it pickles through ``multiprocessing`` process arguments)."""

    def __init__(self, rate: float, burst: int = 1, ctx: Any = None):
        import multiprocessing as mp

        ctx = ctx or mp.get_context()
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self.interval = 1.0 / self.rate if self.rate > 0 else 0.0
        self._state = ctx.Array("d", [0.0, 0.0], lock=True)  # next_free, paused_until

    def reserve(self) -> float:
        with self._state.get_lock():
            now = time.monotonic()
            st = self._state.get_obj()
            if self.rate <= 0:
                start = max(now, st[1])
            else:
                start, st[0] = _Slots.reserve(now, st[0], st[1], self.interval, self.burst)
        return max(0.0, start - now)

    def confirm(self) -> None:
        if self.rate > 0:
            with self._state.get_lock():
                st = self._state.get_obj()
                st[0] = max(st[0], time.monotonic() + self.interval - self.interval * (self.burst - 1))

    def acquire(self) -> float:
        """Wait for a slot while holding the shared lock (the cross-process gate)."""
        with self._state.get_lock():
            now = time.monotonic()
            st = self._state.get_obj()
            if self.rate <= 0:
                start = max(now, st[1])
            else:
                start, st[0] = _Slots.reserve(now, st[0], st[1], self.interval, self.burst)
            wait = max(0.0, start - now)
            if wait > 0:
                time.sleep(wait)
            if self.rate > 0:
                st[0] = max(st[0], time.monotonic() + self.interval - self.interval * (self.burst - 1))
        return wait

    def pause(self, seconds: float) -> None:
        with self._state.get_lock():
            st = self._state.get_obj()
            st[1] = max(st[1], time.monotonic() + max(0.0, seconds))


_LIMITERS: dict[str, RateLimiter] = {}
_LIMITERS_LOCK = threading.Lock()


def limiter_for(instance_id: str, rate: float) -> RateLimiter:
    """The process-wide limiter of one CC instance (created on first use; rate updated if changed)."""
    with _LIMITERS_LOCK:
        lim = _LIMITERS.get(instance_id)
        if lim is None or lim.rate != float(rate):
            lim = RateLimiter(rate)
            _LIMITERS[instance_id] = lim
        return lim
