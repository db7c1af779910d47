"""Error classes of the Clinical Conductor client: one type per failure class, so callers decide by
type (retry, skip a parent, fail the run) instead of parsing messages.

Every error carries the URL (never the API key: it travels in a header, and messages are scrubbed
again before they are raised), the HTTP status when there is one, and the endpoint *template*
(``/api/v1/studies/{studyId}/subjects/odata``) used for metrics.

Transient errors are retried with backoff by the fetch core (``producers.fetch``, ``producers.retry``); when the retry
budget is spent the last transient error is raised with ``attempts`` set. Permanent errors are
raised at once.
"""

from __future__ import annotations

from typing import TypedDict, Unpack

from common.logging import scrub


class ErrorContext(TypedDict, total=False):
    """Where an :class:`ApiError` happened: the keyword arguments every error class accepts."""

    url: str | None
    status: int | None
    endpoint: str | None
    attempts: int
    detail: str | None


class ApiError(Exception):
    """A request to the source API failed. ``str(e)`` is one line: what, where, what to do."""

    transient = False
    #: short reason label for metrics and run records
    reason = "error"

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None,
                 endpoint: str | None = None, attempts: int = 1, detail: str | None = None):
        self.url = scrub(url) if url else url
        self.status = status
        self.endpoint = endpoint
        self.attempts = attempts
        self.detail = scrub(detail)[:300] if detail else None
        self.base_message = scrub(message)
        super().__init__(self.base_message)

    def __str__(self) -> str:
        parts = [self.base_message]
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.url:
            parts.append(f"GET {self.url}")
        if self.attempts > 1:
            parts.append(f"after {self.attempts} attempts")
        if self.detail:
            parts.append(f"server said: {self.detail}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, object]:
        return {"error_class": type(self).__name__, "status": self.status, "url": self.url, "message": str(self)}


class TransientApiError(ApiError):
    """Worth retrying: the same request may succeed later."""

    transient = True


class RateLimitedError(TransientApiError):
    """HTTP 429. ``retry_after`` is the server's Retry-After in seconds, when it sent one."""

    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Unpack[ErrorContext]):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(TransientApiError):
    """HTTP 5xx (except 501) or 408."""

    reason = "server_error"


class ApiTimeoutError(TransientApiError):
    """Connect or read timeout (ETL_REQUEST_TIMEOUT_SECONDS)."""

    reason = "timeout"


class ApiConnectionError(TransientApiError):
    """Connection refused, reset or dropped."""

    reason = "connection"


class MalformedResponseError(TransientApiError):
    """The body is not valid JSON, is truncated, or is empty where JSON was expected."""

    reason = "malformed"


class PermanentApiError(ApiError):
    """Retrying the same request cannot help."""


class AuthError(PermanentApiError):
    """HTTP 401/403: the key is wrong, missing or not allowed. Fails the whole run at once."""

    reason = "auth"


class NotFoundError(PermanentApiError):
    """HTTP 404: for one parent, the parent is skipped; for a whole endpoint, the job is invalid."""

    reason = "not_found"


class NotImplementedApiError(PermanentApiError):
    """HTTP 501: the endpoint exists only in another edition of the API (e.g. CCE)."""

    reason = "not_implemented"


class BadRequestError(PermanentApiError):
    """HTTP 400: the API rejected our query (often an unsupported ``$filter``/``$orderby``)."""

    reason = "bad_request"


class ClientError(PermanentApiError):
    """Any other 4xx."""

    reason = "client_error"


class UnsafeLinkError(PermanentApiError):
    """A next-page link points to another host: following it would send the API key there."""

    reason = "unsafe_link"


def error_for_status(status: int, *, url: str, endpoint: str | None, detail: str | None,
                     retry_after: float | None = None, key_header: str = "X-ApiKey") -> ApiError:
    """The exception for a non-2xx answer, with a message that says what to do about it."""
    kw: ErrorContext = {"url": url, "status": status, "endpoint": endpoint, "detail": detail}
    if status in (401, 403):
        return AuthError(f"the API key was refused: check CC_API_KEY / CC_API_KEY_HEADER (header sent: {key_header})",
                         **kw)
    if status == 404:
        return NotFoundError("the API has no such resource", **kw)
    if status == 501:
        return NotImplementedApiError("the API does not implement this endpoint (disable the job)",
                                      **kw)
    if status == 429:
        return RateLimitedError("the API is rate limiting us", retry_after=retry_after, **kw)
    if status == 400:
        return BadRequestError(
            "the API rejected the request: if it is the $filter, set `incremental: false` for the job "
            "in config/jobs.yaml", **kw)
    if status == 408 or status >= 500:
        return ServerError("the API failed to answer", **kw)
    return ClientError("the API refused the request", **kw)
