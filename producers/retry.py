"""When to try a failed request again, and how long to wait first -- decided in one place for every
fetch engine (threads, asyncio, worker processes).

The decision is made from the error class (which already encodes the HTTP status: 429, 5xx/408,
timeout, connection, malformed body), the server's ``Retry-After`` header and the request's own
attempt counts. Engines never sleep-and-retry on their own: they hand the error to
:class:`producers.fetch.Fetch`, which asks :meth:`RetryPolicy.next_delay` and either schedules the
request again (``not_before``) or fails its stream.

Why hand-written and not tenacity/stamina: the two rules that matter here are not theirs -- a 429
has its own, larger budget that does not consume the transient-error retries, and it pauses every
worker of the CC instance (the limit is per API key), which needs the shared rate limiter; the
policy is also sans-IO, so the same object serves blocking threads and an event loop.
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Callable
from datetime import UTC, datetime

from producers.errors import ApiError, RateLimitedError, TransientApiError

#: longest Retry-After we honour; a server asking for more gets this (and the retry budget decides)
MAX_RETRY_AFTER = 300.0
#: longest backoff between two attempts
MAX_BACKOFF = 60.0
#: 429s do not consume the transient-error budget (the server told us when to come back), but a
#: server that never lets us in must end the run: this many 429s in a row for one request fail it.
MAX_RATE_LIMITED = 50


def parse_retry_after(value: str | None, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(MAX_RETRY_AFTER, max(0.0, (when - now()).total_seconds()))


class RetryPolicy:
    """How many times and how long to wait.

    Transient errors get ``max_retries`` retries with exponential backoff and "equal jitter" (half
    fixed, half random, capped at :data:`MAX_BACKOFF`); 429s honour Retry-After and have their own
    budget of ``max_rate_limited``. Permanent errors (401/403/404/400/501, unsafe links) never retry.
    """

    def __init__(self, max_retries: int = 3, retry_delay: float = 5.0, max_rate_limited: int = MAX_RATE_LIMITED,
                 rng: random.Random | None = None):
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.max_rate_limited = max_rate_limited
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not crypto

    def backoff(self, attempt: int) -> float:
        d = min(MAX_BACKOFF, self.retry_delay * (2 ** (attempt - 1)))
        return d / 2 + self.rng.uniform(0, d / 2)

    def next_delay(self, err: ApiError, attempt: int, limited: int) -> float | None:
        """Seconds to wait before retrying ``err`` (None: give up). ``attempt``/``limited`` count
        the transient failures and 429s so far, including this one."""
        if isinstance(err, RateLimitedError):
            if limited > self.max_rate_limited:
                return None
            return err.retry_after if err.retry_after is not None else self.backoff(limited)
        if isinstance(err, TransientApiError):
            return None if attempt > self.max_retries else self.backoff(attempt)
        return None
