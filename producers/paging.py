"""How an endpoint pages: from the last response, the next request(s) -- or the end of the stream.

A job declares its paging in the catalog (``Job.paging``, shown by ``trialsync jobs show``), in
the spirit of Singer SDK's and dlt's paginators; the engines never look at URLs or response shapes
themselves:

* ``odata`` (:class:`ODataPaginator`): ``$top`` = page size (<= 1000), ``$skip``, ``$count=true``
  on the first page, ``$orderby=<key>`` when the key is one top-level field (stable ``$skip``
  paging), ``$filter`` for incremental streams. When the first page reveals the count and no
  server-driven link (or a link that is exactly our query with ``$skip`` advanced), the remaining
  pages are *planned* by ``$skip`` and may be fetched concurrently; the last planned page, when
  full, keeps paging (the entity grew meanwhile). Any other next link (``$skiptoken``, ...) is
  followed link by link, as the server wants. ``$skip`` advances by the records received but never
  by more than ``$top`` (a server that caps ``$top`` sends fewer; a page that repeats a record
  sends more). Paging stops on an empty page, at the count, when links stop, or -- with neither
  count nor links -- on a page shorter than ``$top``.
* ``none`` (:class:`Paginator`): one request; the answer is an array, a single object or a
  wrapped page; a next link, when the server sends one, is still followed.

Response shapes are parsed by :mod:`producers.pages`. Next links to another host are refused
(:class:`~producers.errors.UnsafeLinkError`): they would receive the API key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urljoin, urlsplit

from requests.utils import requote_uri

from producers.errors import ApiError, UnsafeLinkError
from producers.pages import Page
from schemas.jobs import Job

MAX_PAGE_SIZE = 1000
_QUERY_SAFE = "$,:'()/@"

#: request kinds: a stream's first page, a page planned by ``$skip``, the next page of a sequence
FIRST, PLANNED, NEXT = 0, 1, 2


@dataclass(slots=True)
class Stream:
    """One paged request sequence: an endpoint path with its parameter values substituted."""

    idx: int
    path: str
    params: dict[str, str] | None = None
    filter_expr: str | None = None

    @property
    def parent_key(self) -> str:
        """Canonical JSON of ``params`` ('' for plain jobs): the per-parent watermark key."""
        from producers.keys import parent_key

        return parent_key(self.params)


@dataclass(slots=True)
class Request:
    """One page to fetch, with what the paginator needs to continue after it, and its retry state."""

    stream: int
    url: str
    kind: int = FIRST
    #: ``$skip`` of this page (OData)
    skip: int = 0
    #: records the server reported in all (``$count``), once known
    count: int | None = None
    #: this sequence follows server-driven links
    followed: bool = False
    #: the last page of a ``$skip`` plan: a full one means the entity grew, keep paging
    last_planned: bool = False
    #: records per planned page (a full last planned page has at least this many)
    step: int = 0
    #: transient failures and 429s so far (producers.retry)
    attempts: int = 0
    limited: int = 0
    #: monotonic time before which it must not be sent (a retry's backoff)
    not_before: float = 0.0


def build_query(params: dict[str, Any] | None) -> str:
    """``$top=1000&$filter=modifiedDate%20gt%20...`` -- OData names keep their ``$`` (readable URLs)."""
    if not params:
        return ""
    return "&".join(f"{quote(str(k), safe='$')}={quote(str(v), safe=_QUERY_SAFE)}" for k, v in params.items())


def odata_params(*, page_size: int, skip: int = 0, filter_expr: str | None = None,
                 orderby: str | None = None, count: bool = False) -> dict[str, Any]:
    p: dict[str, Any] = {"$top": min(MAX_PAGE_SIZE, max(1, page_size)), "$skip": skip}
    if orderby:
        p["$orderby"] = orderby
    if filter_expr:
        p["$filter"] = filter_expr
    if count:
        p["$count"] = "true"
    return p


def origin(url: str) -> tuple[str, str]:
    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return (u.scheme.lower(), f"{(u.hostname or '').lower()}:{port}")


class ApiUrls:
    """Absolute URLs under the CC base URL, and the one check every next link passes."""

    def __init__(self, base_url: str):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("CC_API_BASE_URL must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.origin = origin(self.base_url)

    def url_for(self, path: str, params: dict[str, Any] | None = None) -> str:
        """Absolute URL of ``path`` (already URL-quoted) with a query."""
        if not path.startswith("/"):
            path = "/" + path
        q = build_query(params)
        return f"{self.base_url}{path}" + (f"?{q}" if q else "")

    def resolve_link(self, link: str, current: str, endpoint: str | None = None) -> str:
        """Absolute next-page URL; refuses links to another origin (they would receive the API key)."""
        url = urljoin(current, link)
        if origin(url) != self.origin:
            raise UnsafeLinkError(f"next-page link leaves {self.origin} (refusing to send the API key there)",
                                  url=url.split("?", 1)[0], endpoint=endpoint)
        return str(requote_uri(url))


def stable_orderby(job: Job) -> str | None:
    """``$orderby`` that keeps ``$skip`` paging stable: the key, when it is one top-level field."""
    if job.fetch_paging == "odata" and len(job.primary_key) == 1 and not job.primary_key[0].startswith("$") \
            and "." not in job.primary_key[0]:
        return job.primary_key[0]
    return None


class Paginator:
    """Paging ``none``: one request per stream; a server-sent next link is followed all the same."""

    style = "none"

    def __init__(self, urls: ApiUrls, endpoint: str):
        self.urls = urls
        self.endpoint = endpoint

    def first(self, stream: Stream) -> Request:
        """The stream's first request."""
        return Request(stream.idx, self.urls.url_for(stream.path))

    def after(self, stream: Stream, req: Request, page: Page) -> list[Request]:
        """The requests that follow ``page`` (the answer to ``req``); [] = this sequence ended."""
        nxt = self._link(req, page)
        return [] if nxt is None else [nxt]

    def _link(self, req: Request, page: Page) -> Request | None:
        if not page.next_link or not page.records:
            return None
        url = self.urls.resolve_link(page.next_link, req.url, self.endpoint)
        if url == req.url:
            return None
        return Request(req.stream, url, NEXT, followed=True)

    def describe(self) -> str:
        return "none (one request: an array, an object or a wrapped page; server next links followed)"


class ODataPaginator(Paginator):
    """Paging ``odata`` (module docstring)."""

    style = "odata"

    def __init__(self, urls: ApiUrls, endpoint: str, *, page_size: int, orderby: str | None = None,
                 split_pages: bool = True):
        super().__init__(urls, endpoint)
        self.page_size = min(MAX_PAGE_SIZE, max(1, page_size))
        self.orderby = orderby
        self.split_pages = split_pages

    def url(self, stream: Stream, skip: int = 0, count: bool = False) -> str:
        return self.urls.url_for(stream.path, odata_params(page_size=self.page_size, skip=skip,
                                                           filter_expr=stream.filter_expr, orderby=self.orderby,
                                                           count=count))

    def first(self, stream: Stream) -> Request:
        return Request(stream.idx, self.url(stream, count=True))

    def advance(self, page: Page) -> int:
        """How far ``$skip`` moves after ``page``: the records received, but never more than
        ``$top`` (a server that capped ``$top`` sends fewer; a page that repeats a record sends
        more, and skipping by its length would jump over the next page's first record)."""
        return min(len(page.records), self.page_size)

    def after(self, stream: Stream, req: Request, page: Page) -> list[Request]:
        n = self.advance(page)
        if req.kind == FIRST and self.split_pages:
            plan = self._split(stream, req, page, n)
            if plan:
                return plan
        if req.kind == PLANNED and not req.last_planned:
            return []
        if req.kind == PLANNED and len(page.records) < req.step:
            return []  # the last planned page was not full: the entity did not grow
        count = page.count if page.count is not None else (None if req.kind == PLANNED else req.count)
        skip = req.skip + n
        if page.next_link:
            return [] if (nxt := self._link(req, page)) is None else [nxt]
        if req.followed or not page.records:
            return []
        if count is not None and skip >= count:
            return []
        if count is None and len(page.records) < self.page_size:
            return []
        return [Request(req.stream, self.url(stream, skip=skip), NEXT, skip=skip, count=count)]

    def _split(self, stream: Stream, req: Request, page: Page, n: int) -> list[Request] | None:
        """The remaining pages by ``$skip`` when they can be fetched concurrently, else None (count
        unknown, a single page, or server-driven links that are not plain ``$skip``)."""
        if page.count is None or not 0 < n < page.count:
            return None
        if page.next_link and not self._is_plain_skip_link(page.next_link, req.url, n):
            return None
        skips = range(n, page.count, n)
        last = skips[-1]
        return [Request(req.stream, self.url(stream, skip=sk), PLANNED, skip=sk, count=page.count,
                        last_planned=sk == last, step=n) for sk in skips]

    def _is_plain_skip_link(self, link: str, url: str, skip: int) -> bool:
        """True when the server's next link is our own query with ``$skip`` advanced: then pages
        requested by ``$skip`` in parallel are exactly the pages the links would give."""
        try:
            nxt = self.urls.resolve_link(link, url, self.endpoint)
        except ApiError:
            return False
        a, b = urlsplit(nxt), urlsplit(url)
        if a.path.rstrip("/") != b.path.rstrip("/"):
            return False
        qa = {k.lower(): v for k, v in parse_qsl(a.query, keep_blank_values=True)}
        qb = {k.lower(): v for k, v in parse_qsl(b.query, keep_blank_values=True)}
        if "$skiptoken" in qa or qa.get("$skip") != str(skip):
            return False
        for q in (qa, qb):
            q.pop("$skip", None)
            q.pop("$count", None)
        return qa == qb

    def describe(self) -> str:
        order = f", $orderby={self.orderby}" if self.orderby else ""
        return (f"odata ($top={self.page_size}/$skip with $count{order}; remaining pages fetched concurrently "
                "when the count is known; server next links followed)")


def paginator_for(job: Job, urls: ApiUrls, *, split_pages: bool = True) -> Paginator:
    """The paginator the job declares (``Job.paging``; its list source's when it reads that)."""
    if job.fetch_paging == "odata":
        return ODataPaginator(urls, job.fetch_endpoint, page_size=job.page_size, orderby=stable_orderby(job),
                              split_pages=split_pages)
    return Paginator(urls, job.fetch_endpoint)
