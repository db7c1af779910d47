"""A token bucket per API key, like the gateway in front of a real CC instance.

``rate`` tokens per second refill a bucket of ``burst`` tokens (default: one second's worth,
at least 1). A request takes one token; without one it is answered 429 with ``Retry-After``:
the whole seconds until a token is back (at least 1, as HTTP wants an integer).
"""

from __future__ import annotations

import math
import time


class TokenBucketLimiter:
    def __init__(self, rate: float, burst: float | None = None):
        if rate <= 0:
            raise ValueError("rate limit must be > 0 requests/s")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._buckets: dict[bytes, tuple[float, float]] = {}

    def take(self, key: bytes, now: float | None = None) -> float:
        """Take a token for ``key``; return 0 when allowed, else the seconds to wait."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> int:
        return max(1, math.ceil(wait))
