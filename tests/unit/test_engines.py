"""Both fetch engines (asyncio/uvloop and threads/requests) driving the one fetch core against a real
local HTTP server: same paging, same retries, same error classes, same guarantees."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from producers.cc_client import CCClient
from producers.engines import run_async, run_threads
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
from producers.fetch import Fetch
from producers.paging import ODataPaginator, Paginator, Stream
from producers.rate_limit import RateLimiter
from tests.unit.fake_cc import FakeCC, Reply, json_reply, odata_entity, serving

KEY = "sk-engine-Qw8Er5Ty2"
PATH = "/api/v1/things/odata"
ENGINES = ["async", "threads"]


@pytest.fixture
def fake_cc() -> Iterator[FakeCC]:
    yield from serving()


@dataclass
class Outcome:
    client: CCClient
    pages: list[tuple[int, object]] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    failed: dict[int, BaseException] = field(default_factory=dict)
    retries: int = 0

    @property
    def records(self) -> list[dict]:
        return [r for _, p in self.pages for r in p.records]  # type: ignore[attr-defined]

    @property
    def ids(self) -> list[int]:
        return sorted(r["id"] for r in self.records)


def fetch(engine: str, srv: FakeCC, streams: list[Stream] | None = None, *, odata: bool = True,
          page_size: int = 1000, workers: int = 4, stop: threading.Event | None = None,
          on_page: object = None, **kw: object) -> Outcome:
    kw.setdefault("retry_delay", 0.0)
    client = CCClient(srv.url, KEY, key_header="CCAPIKey", sleep=lambda s: None, **kw)  # type: ignore[arg-type]
    out = Outcome(client)
    streams = streams or [Stream(0, PATH)]
    stop = stop or threading.Event()

    def on_fail(i: int, e: BaseException) -> None:
        out.failed[i] = e

    def page(i: int, u: str, p: object) -> None:
        out.pages.append((i, p))
        if on_page is not None:
            on_page(i, u, p)  # type: ignore[operator]

    paginator = ODataPaginator(client.urls, PATH, page_size=page_size) if odata else Paginator(client.urls, PATH)
    core = Fetch(streams, paginator, policy=client.policy, limiter=client.limiter, stop=stop, on_page=page,
                 on_done=out.done.add, on_fail=on_fail)
    (run_async if engine == "async" else run_threads)(core, client, concurrency=workers, stop=stop)
    out.retries = core.retries
    return out


def recs(n: int) -> list[dict]:
    return [{"id": i, "modifiedDate": "2025-01-01T00:00:00Z"} for i in range(1, n + 1)]


# -- paging -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", ["odata", "page"])
@pytest.mark.parametrize("links", [False, True])
def test_every_record_exactly_once(fake_cc: FakeCC, engine: str, shape: str, links: bool) -> None:
    fake_cc.handler = odata_entity(recs(257), shape=shape, next_links=links)
    out = fetch(engine, fake_cc, page_size=20)
    assert out.ids == list(range(1, 258)) and out.done == {0} and not out.failed
    assert out.client.api_calls == 13


@pytest.mark.parametrize("engine", ENGINES)
def test_skiptoken_links_are_followed_not_split(fake_cc: FakeCC, engine: str) -> None:
    data = recs(50)

    def handler(req):
        tok = int(req.query.get("$skiptoken", "0"))
        chunk = data[tok: tok + 10]
        doc = {"value": chunk, "@odata.count": 50}
        if tok + 10 < 50:
            doc["@odata.nextLink"] = f"{req.path}?$skiptoken={tok + 10}"
        return json_reply(doc)

    fake_cc.handler = handler
    out = fetch(engine, fake_cc, page_size=10)
    assert out.ids == list(range(1, 51))
    assert [r.query.get("$skiptoken") for r in fake_cc.requests] == [None, "10", "20", "30", "40"]


@pytest.mark.parametrize("engine", ENGINES)
def test_array_endpoint_paged_by_skip_until_short_page(fake_cc: FakeCC, engine: str) -> None:
    data = recs(45)
    fake_cc.handler = lambda r: json_reply(data[int(r.query["$skip"]): int(r.query["$skip"]) + int(r.query["$top"])])
    out = fetch(engine, fake_cc, page_size=10)
    assert out.ids == list(range(1, 46))
    assert len(fake_cc.requests) == 5


@pytest.mark.parametrize("engine", ENGINES)
def test_plain_endpoint_single_request(fake_cc: FakeCC, engine: str) -> None:
    fake_cc.handler = lambda r: json_reply(recs(3))
    out = fetch(engine, fake_cc, [Stream(0, "/api/v1/sites")], odata=False)
    assert out.ids == [1, 2, 3] and fake_cc.requests[0].query == {}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("action", ["chunked", "gzip", "close"])
def test_body_framings(fake_cc: FakeCC, engine: str, action: str) -> None:
    data = recs(30)

    def handler(req):
        skip, top = int(req.query["$skip"]), int(req.query["$top"])
        return Reply(200, {"value": data[skip: skip + top], "@odata.count": 30}, {"Content-Type": "application/json"},
                     action=action)

    fake_cc.handler = handler
    out = fetch(engine, fake_cc, page_size=7)
    assert out.ids == list(range(1, 31)) and not out.failed
    assert out.retries == 0


# -- failures -----------------------------------------------------------------------------------------

def flaky(failures: list[Reply], then_records: int = 2):
    seq = list(failures)
    lock = threading.Lock()
    ok = odata_entity(recs(then_records))

    def handler(req):
        with lock:
            if seq:
                return seq.pop(0)
        return ok(req)

    return handler


TRANSIENT = [
    Reply(500, b'{"message":"boom"}'), Reply(502, b"bad gateway"), Reply(503, b""), Reply(504, b""),
    Reply(200, b'{"value": [{"id": 1}'), Reply(200, b"<html>oops</html>"), Reply(200, b""),
    Reply(200, b'{"value": []}', action="truncate"), Reply(action="reset"),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bad", TRANSIENT)
def test_transient_failures_are_retried(fake_cc: FakeCC, engine: str, bad: Reply) -> None:
    fake_cc.handler = flaky([bad, bad])
    out = fetch(engine, fake_cc, max_retries=3)
    assert out.ids == [1, 2] and out.done == {0}
    assert out.retries == 2


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("bad", "exc"), [
    (Reply(500, b"{}"), ServerError), (Reply(200, b"{not json"), MalformedResponseError),
    (Reply(200, b'{"value": [1,2,3]}', action="truncate"), MalformedResponseError),
    (Reply(action="reset"), ApiConnectionError),
])
def test_retries_are_bounded_then_reported(fake_cc: FakeCC, engine: str, bad: Reply, exc: type) -> None:
    fake_cc.handler = lambda r: bad
    out = fetch(engine, fake_cc, max_retries=2)
    assert list(out.failed) == [0] and isinstance(out.failed[0], exc)
    assert out.failed[0].attempts == 3 and out.client.api_calls == 3
    assert KEY not in str(out.failed[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_timeout(fake_cc: FakeCC, engine: str) -> None:
    fake_cc.handler = lambda r: Reply(200, b"[]", delay=1.0)
    out = fetch(engine, fake_cc, max_retries=1, timeout=0.2)
    assert isinstance(out.failed[0], ApiTimeoutError) and out.client.api_calls == 2


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("status", "exc"), [(401, AuthError), (403, AuthError), (404, NotFoundError),
                                             (501, NotImplementedApiError), (400, BadRequestError)])
def test_permanent_errors_fail_at_once(fake_cc: FakeCC, engine: str, status: int, exc: type) -> None:
    fake_cc.handler = lambda r: json_reply({"message": "no"}, status)
    out = fetch(engine, fake_cc)
    assert isinstance(out.failed[0], exc) and out.failed[0].status == status
    assert len(fake_cc.requests) == 1
    if exc is AuthError:
        assert "the API key was refused: check CC_API_KEY / CC_API_KEY_HEADER" in str(out.failed[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_429_waits_retry_after_and_pauses_the_limiter(fake_cc: FakeCC, engine: str) -> None:
    fake_cc.handler = flaky([Reply(429, b"{}", {"Retry-After": "0.05"})] * 3)
    paused: list[float] = []

    class Lim(RateLimiter):
        def pause(self, seconds: float) -> None:
            paused.append(seconds)

    out = fetch(engine, fake_cc, max_retries=0, limiter=Lim(0))
    assert out.ids == [1, 2] and paused == [0.05, 0.05, 0.05]


@pytest.mark.parametrize("engine", ENGINES)
def test_429_storm_has_a_bound(fake_cc: FakeCC, engine: str) -> None:
    fake_cc.handler = lambda r: Reply(429, b"{}", {"Retry-After": "0"})
    out = fetch(engine, fake_cc, max_rate_limited=4)
    assert isinstance(out.failed[0], RateLimitedError) and out.client.api_calls == 5


@pytest.mark.parametrize("engine", ENGINES)
def test_next_link_to_other_host_refused(fake_cc: FakeCC, engine: str) -> None:
    fake_cc.handler = lambda r: json_reply({"value": recs(2), "@odata.nextLink": "http://evil.example:1/x?$skiptoken=2"})
    out = fetch(engine, fake_cc, page_size=2)
    assert isinstance(out.failed[0], UnsafeLinkError)
    assert len(fake_cc.requests) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_key_header_sent_and_not_in_urls(fake_cc: FakeCC, engine: str) -> None:
    fake_cc.handler = odata_entity(recs(3))
    fetch(engine, fake_cc)
    assert fake_cc.requests[0].headers.get("CCAPIKey") == KEY
    assert all(KEY not in r.raw_path for r in fake_cc.requests)


# -- many streams -----------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_parent_streams_each_complete_or_fail(fake_cc: FakeCC, engine: str) -> None:
    def handler(req):
        sid = int(req.path.split("/")[4])
        if sid % 10 == 3:
            return json_reply({"message": "no such study"}, 404)
        return odata_entity([{"id": sid * 100 + i} for i in range(sid % 7)], next_links=True)(req)

    fake_cc.handler = handler
    streams = [Stream(i, f"/api/v1/studies/{i}/subjects/odata", {"studyId": str(i)}) for i in range(60)]
    out = fetch(engine, fake_cc, streams, page_size=2, workers=6)
    assert set(out.failed) == {3, 13, 23, 33, 43, 53}
    assert out.done == set(range(60)) - set(out.failed)
    got = Counter((i, r["id"]) for i, p in out.pages for r in p.records)  # type: ignore[attr-defined]
    assert set(got) == {(i, i * 100 + k) for i in range(60) if i % 10 != 3 for k in range(i % 7)}
    assert set(got.values()) == {1}


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_means_no_new_requests_and_incomplete_streams_not_done(fake_cc: FakeCC, engine: str) -> None:
    fake_cc.handler = odata_entity(recs(500))
    stop = threading.Event()
    seen = [0]

    def on_page(i: int, u: str, p: object) -> None:
        seen[0] += 1
        if seen[0] == 3:
            stop.set()

    out = fetch(engine, fake_cc, page_size=10, workers=2, stop=stop, on_page=on_page)
    assert out.done == set()
    assert len(fake_cc.requests) < 10


@pytest.mark.parametrize("engine", ENGINES)
def test_split_plan_follows_growth_after_the_count(fake_cc: FakeCC, engine: str) -> None:
    base = [{"id": i} for i in range(1, 101)]
    grown = base + [{"id": i} for i in range(101, 131)]
    lock = threading.Lock()
    calls = [0]

    def handler(req):  # the count says 100, then 30 records appear
        with lock:
            calls[0] += 1
            first = calls[0] == 1
        top, skip = int(req.query["$top"]), int(req.query["$skip"])
        data = base if first else grown
        doc = {"value": data[skip: skip + top]}
        if "$count" in req.query:
            doc["@odata.count"] = 100
        return json_reply(doc)

    fake_cc.handler = handler
    out = fetch(engine, fake_cc, page_size=20, workers=3)
    assert out.done == {0} and not out.failed
    assert out.ids == list(range(1, 131))


@pytest.mark.parametrize("engine", ENGINES)
def test_big_stream_is_split_across_workers(fake_cc: FakeCC, engine: str) -> None:
    fake_cc.handler = odata_entity([{"id": i} for i in range(1, 1001)])
    out = fetch(engine, fake_cc, page_size=37, workers=4)
    assert out.ids == list(range(1, 1001))
    assert sorted(int(r.query["$skip"]) for r in fake_cc.requests) == list(range(0, 1000, 37))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("links", [False, True])
def test_page_with_a_repeated_record_does_not_shift_skip(fake_cc: FakeCC, engine: str, links: bool) -> None:
    data = recs(95)
    inner = odata_entity(data, next_links=links)

    def handler(req):  # every page repeats its first record: $top + 1 records
        rep = inner(req)
        import orjson

        doc = orjson.loads(rep.body)
        doc["value"] = doc["value"][:1] + doc["value"]
        return json_reply(doc)

    fake_cc.handler = handler
    out = fetch(engine, fake_cc, page_size=10)
    assert sorted(set(out.ids)) == list(range(1, 96))
    assert sorted(int(r.query["$skip"]) for r in fake_cc.requests) == list(range(0, 95, 10))
