"""The CC API client, one stream at a time through the fetch core (``producers.fetch.fetch_pages``),
against a real local HTTP server: paging, shapes, retries, errors, secrets."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from producers.cc_client import CCClient
from producers.errors import (
    ApiConnectionError,
    ApiTimeoutError,
    AuthError,
    BadRequestError,
    MalformedResponseError,
    NotFoundError,
    NotImplementedApiError,
    RateLimitedError,
    ServerError,
    UnsafeLinkError,
)
from producers.fetch import fetch_pages
from producers.paging import ODataPaginator, Paginator, Stream, build_query
from producers.rate_limit import RateLimiter
from producers.retry import parse_retry_after
from tests.unit.fake_cc import FakeCC, Reply, json_reply, odata_entity, serving


@pytest.fixture
def fake_cc() -> Iterator[FakeCC]:
    yield from serving()

KEY = "sk-test-Zq9Xw7Vb3Nm1"
TEMPLATE = "/api/v1/things/odata"


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, s: float) -> None:
        self.calls.append(s)


def client(srv: FakeCC, **kw: object) -> CCClient:
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("retry_delay", 0.01)
    return CCClient(srv.url, KEY, key_header=kw.pop("key_header", "CCAPIKey"), **kw)  # type: ignore[arg-type]


def records(n: int) -> list[dict]:
    return [{"id": i, "name": f"r{i}", "modifiedDate": f"2025-01-01T00:00:{i % 60:02d}Z"} for i in range(1, n + 1)]


def pages(c: CCClient, path: str = TEMPLATE, *, odata: bool, page_size: int = 1000, orderby: str | None = None,
          filter_expr: str | None = None, endpoint: str = TEMPLATE) -> list[object]:
    paginator = ODataPaginator(c.urls, endpoint, page_size=page_size, orderby=orderby, split_pages=False) \
        if odata else Paginator(c.urls, endpoint)
    return [p for _, p in fetch_pages(c, paginator, Stream(0, path, filter_expr=filter_expr))]


def all_ids(c: CCClient, path: str = TEMPLATE, **kw: object) -> list[int]:
    return [r["id"] for p in pages(c, path, **kw) for r in p.records]  # type: ignore[arg-type,attr-defined]


# -- paging and shapes --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["odata", "page"])
def test_skip_paging_with_count(fake_cc: FakeCC, shape: str) -> None:
    fake_cc.handler = odata_entity(records(25), shape=shape)
    c = client(fake_cc)
    assert all_ids(c, odata=True, page_size=10) == list(range(1, 26))
    qs = [r.query for r in fake_cc.requests]
    assert [q["$skip"] for q in qs] == ["0", "10", "20"]
    assert qs[0]["$count"] == "true" and "$count" not in qs[1]
    assert all(q["$top"] == "10" for q in qs)
    assert c.api_calls == 3


def test_exact_multiple_stops_on_count_without_extra_request(fake_cc: FakeCC) -> None:
    fake_cc.handler = odata_entity(records(20))
    assert all_ids(client(fake_cc), odata=True, page_size=10) == list(range(1, 21))
    assert len(fake_cc.requests) == 2


def test_without_count_stops_on_short_page(fake_cc: FakeCC) -> None:
    fake_cc.handler = odata_entity(records(25), with_count=False)
    assert all_ids(client(fake_cc), odata=True, page_size=10) == list(range(1, 26))
    assert len(fake_cc.requests) == 3


def test_server_capping_top_below_request_loses_nothing(fake_cc: FakeCC) -> None:
    fake_cc.handler = odata_entity(records(23), cap=5)
    assert all_ids(client(fake_cc), odata=True, page_size=10) == list(range(1, 24))
    assert [r.query["$skip"] for r in fake_cc.requests] == ["0", "5", "10", "15", "20"]


@pytest.mark.parametrize("shape", ["odata", "page"])
def test_next_links_are_preferred(fake_cc: FakeCC, shape: str) -> None:
    fake_cc.handler = odata_entity(records(25), shape=shape, next_links=True)
    assert all_ids(client(fake_cc), odata=True, page_size=10) == list(range(1, 26))
    # the link's own query is used as given (no $count, no $orderby of ours)
    assert [r.query.get("$skip") for r in fake_cc.requests] == ["0", "10", "20"]
    assert "$orderby" not in fake_cc.requests[1].query


def test_bare_array_and_single_object(fake_cc: FakeCC) -> None:
    fake_cc.handler = lambda r: json_reply(records(3))
    c = client(fake_cc)
    assert all_ids(c, "/api/v1/sites", odata=False) == [1, 2, 3]
    assert fake_cc.requests[0].query == {}
    fake_cc.handler = lambda r: json_reply({"id": 7, "name": "details"})
    got = pages(c, "/api/v1/instance/details", endpoint="/x", odata=False)
    assert [p.records for p in got] == [[{"id": 7, "name": "details"}]]  # type: ignore[attr-defined]
    fake_cc.handler = lambda r: json_reply(None)
    assert [p.records for p in pages(c, "/x", endpoint="/x", odata=False)] == [[]]  # type: ignore[attr-defined]
    fake_cc.handler = lambda r: json_reply(["Gender", "Race"])
    assert [p.records for p in pages(c, "/x", endpoint="/x", odata=False)] == [["Gender", "Race"]]  # type: ignore[attr-defined]


def test_orderby_and_filter_are_sent(fake_cc: FakeCC) -> None:
    fake_cc.handler = odata_entity(records(3))
    all_ids(client(fake_cc), odata=True, page_size=10, orderby="id",
            filter_expr="modifiedDate gt 2025-01-01T00:00:00Z")
    q = fake_cc.requests[0]
    assert q.query["$orderby"] == "id"
    assert q.query["$filter"] == "modifiedDate gt 2025-01-01T00:00:00Z"
    assert "$filter=modifiedDate%20gt%202025-01-01T00:00:00Z" in q.raw_path


def test_query_keeps_odata_dollar() -> None:
    assert build_query({"$top": 5, "$filter": "a gt 1"}) == "$top=5&$filter=a%20gt%201"


def test_next_link_to_another_host_is_refused(fake_cc: FakeCC) -> None:
    other = FakeCC()
    try:
        fake_cc.handler = lambda r: json_reply({"value": records(2), "@odata.nextLink": f"{other.url}/steal?$skip=2"})
        with pytest.raises(UnsafeLinkError) as ei:
            all_ids(client(fake_cc), odata=True, page_size=2)
        assert other.requests == []
        assert KEY not in str(ei.value)
    finally:
        other.close()


# -- auth and permanent errors ---------------------------------------------------------------------

def test_key_sent_in_configured_header_only(fake_cc: FakeCC) -> None:
    fake_cc.handler = odata_entity(records(1))
    all_ids(client(fake_cc, key_header="X-ApiKey"), odata=True)
    r = fake_cc.requests[0]
    assert r.headers.get("X-ApiKey") == KEY
    assert KEY not in r.raw_path


@pytest.mark.parametrize("status", [401, 403])
def test_auth_error_fails_fast_with_clear_message(fake_cc: FakeCC, status: int) -> None:
    fake_cc.handler = lambda r: json_reply({"message": "invalid api key"}, status)
    c = client(fake_cc)
    with pytest.raises(AuthError) as ei:
        all_ids(c, odata=True)
    msg = str(ei.value)
    assert "the API key was refused: check CC_API_KEY / CC_API_KEY_HEADER" in msg
    assert f"HTTP {status}" in msg and fake_cc.url in msg
    assert KEY not in msg
    assert len(fake_cc.requests) == 1


@pytest.mark.parametrize(("status", "exc"), [(404, NotFoundError), (501, NotImplementedApiError),
                                             (400, BadRequestError)])
def test_permanent_errors_are_not_retried(fake_cc: FakeCC, status: int, exc: type) -> None:
    fake_cc.handler = lambda r: json_reply({"message": "nope"}, status)
    with pytest.raises(exc) as ei:
        all_ids(client(fake_cc), odata=True)
    assert len(fake_cc.requests) == 1
    assert ei.value.status == status
    assert "/api/v1/things/odata" in str(ei.value)


# -- transient errors and retries --------------------------------------------------------------------

def flaky(failures: list[Reply], then: Reply) -> object:
    seq = list(failures)

    def handler(req: object) -> Reply:
        return seq.pop(0) if seq else then

    return handler


@pytest.mark.parametrize("bad", [
    Reply(500, b'{"message":"boom"}'), Reply(502, b"bad gateway"), Reply(503, b""),
    Reply(200, b'{"value": [{"id": 1}'), Reply(200, b"<html>oops</html>"), Reply(200, b""),
    Reply(200, b'{"value": []}', action="truncate"), Reply(action="reset"),
])
def test_transient_failures_are_retried_then_succeed(fake_cc: FakeCC, bad: Reply) -> None:
    fake_cc.handler = flaky([bad, bad], json_reply({"value": records(2), "@odata.count": 2}))
    sleeps = Sleeps()
    c = client(fake_cc, sleep=sleeps, max_retries=3)
    assert all_ids(c, odata=True) == [1, 2]
    assert c.api_calls == 3
    assert len(sleeps.calls) == 2  # one backoff per retry


@pytest.mark.parametrize(("bad", "exc"), [
    (Reply(500, b"{}"), ServerError), (Reply(200, b"{not json"), MalformedResponseError),
    (Reply(200, b'{"value": [1,2,3]}', action="truncate"), MalformedResponseError),
    (Reply(action="reset"), ApiConnectionError),
])
def test_retries_are_bounded_then_reported(fake_cc: FakeCC, bad: Reply, exc: type) -> None:
    fake_cc.handler = lambda r: bad
    c = client(fake_cc, max_retries=2)
    with pytest.raises(exc) as ei:
        all_ids(c, odata=True)
    assert c.api_calls == 3
    assert ei.value.attempts == 3
    assert "after 3 attempts" in str(ei.value)
    assert KEY not in str(ei.value)


def test_timeout_is_retried_and_reported(fake_cc: FakeCC) -> None:
    fake_cc.handler = lambda r: Reply(200, b"[]", delay=1.0)
    c = client(fake_cc, max_retries=1, timeout=0.2)
    with pytest.raises(ApiTimeoutError):
        all_ids(c, odata=True)
    assert c.api_calls == 2


def test_backoff_is_exponential_with_jitter(fake_cc: FakeCC) -> None:
    fake_cc.handler = lambda r: Reply(500, b"{}")
    sleeps = Sleeps()
    c = client(fake_cc, sleep=sleeps, max_retries=4, retry_delay=1.0, rng=random.Random(1))
    with pytest.raises(ServerError):
        all_ids(c, odata=True)
    assert len(sleeps.calls) == 4
    for i, s in enumerate(sleeps.calls):
        base = 1.0 * 2 ** i
        assert base / 2 - 0.05 <= s <= base  # (less the few µs between the answer and the wait)
    assert len(set(sleeps.calls)) == 4  # jittered, not a fixed ladder


def test_429_honours_retry_after_and_pauses_all_workers(fake_cc: FakeCC) -> None:
    fake_cc.handler = flaky([Reply(429, b'{"message":"slow down"}', {"Retry-After": "2"})] * 3,
                            json_reply({"value": records(1), "@odata.count": 1}))
    sleeps = Sleeps()
    paused: list[float] = []

    class Lim(RateLimiter):
        def pause(self, seconds: float) -> None:
            paused.append(seconds)

    c = client(fake_cc, sleep=sleeps, max_retries=1, limiter=Lim(0))
    # three 429s in a row do not consume the transient budget (max_retries=1)
    assert all_ids(c, odata=True) == [1]
    assert sleeps.calls == pytest.approx([2.0, 2.0, 2.0], abs=0.05)  # waited until the Retry-After elapsed
    assert paused == [2.0, 2.0, 2.0]


def test_429_storm_eventually_fails(fake_cc: FakeCC) -> None:
    fake_cc.handler = lambda r: Reply(429, b"{}", {"Retry-After": "0"})
    c = client(fake_cc, max_rate_limited=5)
    with pytest.raises(RateLimitedError):
        all_ids(c, odata=True)
    assert c.api_calls == 6


def test_retry_after_forms() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:10 GMT", now=lambda: now) == 10.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=lambda: now) == 0.0
    assert parse_retry_after("99999") == 300.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# -- secrets and metrics ------------------------------------------------------------------------------

def test_key_never_in_logs_errors_or_metric_labels(fake_cc: FakeCC, caplog: pytest.LogCaptureFixture) -> None:
    from common.logging import JsonFormatter

    seq = [Reply(500, f'{{"message":"bad key {KEY}"}}'.encode()), json_reply({"message": f"key {KEY} refused"}, 401)]
    fake_cc.handler = lambda r: seq.pop(0)
    logger = logging.getLogger("trialsync")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG, logger="trialsync"):
            with pytest.raises(AuthError) as ei:
                all_ids(client(fake_cc, max_retries=2), odata=True)
    finally:
        logger.setLevel(old)
    assert KEY not in str(ei.value) and KEY not in repr(ei.value.to_dict())
    fmt = JsonFormatter("test")
    lines = [fmt.format(r) for r in caplog.records]
    assert any("api_retry" in line for line in lines)
    assert all(KEY not in line for line in lines)
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            assert all(KEY not in str(v) for v in sample.labels.values())
    labels = {s.labels.get("endpoint") for m in REGISTRY.collect() if m.name == "trialsync_api_requests"
              for s in m.samples}
    assert TEMPLATE in labels
