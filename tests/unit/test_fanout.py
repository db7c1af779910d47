"""Concurrent fetching: every page of every stream exactly once, failures per stream, stop."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from producers.cc_client import CCClient
from producers.errors import NotFoundError, ServerError
from producers.fanout import DONE, FAIL, PAGE, Stream, ThreadFanout
from tests.unit.fake_cc import FakeCC, Reply, json_reply, odata_entity, serving


@pytest.fixture
def fake_cc() -> Iterator[FakeCC]:
    yield from serving()


def _client(srv: FakeCC, **kw: object) -> CCClient:
    return CCClient(srv.url, "k", sleep=lambda s: None, retry_delay=0.0, **kw)  # type: ignore[arg-type]


def collect(fan: ThreadFanout) -> tuple[Counter, set[int], dict[int, BaseException], list[tuple[int, int]]]:
    ids: Counter = Counter()
    done: set[int] = set()
    failed: dict[int, BaseException] = {}
    order: list[tuple[int, int]] = []
    for item in fan.results(tick=0.05):
        if item is None:
            continue
        kind, idx, payload = item
        order.append((kind, idx))
        if kind == PAGE:
            assert idx not in done, "a page arrived after its stream's DONE"
            for r in payload[1].records:
                ids[(idx, r["id"])] += 1
        elif kind == DONE:
            done.add(idx)
        elif kind == FAIL:
            failed[idx] = payload
    return ids, done, failed, order


def test_one_big_stream_split_across_workers(fake_cc: FakeCC) -> None:
    recs = [{"id": i} for i in range(1, 1001)]
    fake_cc.handler = odata_entity(recs)
    fan = ThreadFanout(_client(fake_cc), [Stream(0, "/api/v1/things/odata")], endpoint="/t", odata=True,
                       page_size=37, workers=4).start()
    ids, done, failed, _ = collect(fan)
    assert not failed and done == {0}
    assert set(ids) == {(0, i) for i in range(1, 1001)} and set(ids.values()) == {1}
    skips = sorted(int(r.query["$skip"]) for r in fake_cc.requests)
    assert skips == list(range(0, 1000, 37))


def test_split_follows_growth_after_count(fake_cc: FakeCC) -> None:
    recs = [{"id": i} for i in range(1, 101)]
    state = {"calls": 0}

    def handler(req):  # count says 100, but 30 more records appear after the first page
        state["calls"] += 1
        top, skip = int(req.query["$top"]), int(req.query["$skip"])
        data = recs if state["calls"] == 1 else recs + [{"id": i} for i in range(101, 131)]
        doc = {"value": data[skip: skip + top]}
        if "$count" in req.query:
            doc["@odata.count"] = 100
        return json_reply(doc)

    fake_cc.handler = handler
    fan = ThreadFanout(_client(fake_cc), [Stream(0, "/x/odata")], endpoint="/x", odata=True, page_size=20,
                       workers=3).start()
    ids, done, failed, _ = collect(fan)
    assert done == {0} and not failed
    assert {i for (_, i) in ids} == set(range(1, 131))


def test_many_parent_streams_with_next_links_and_failures(fake_cc: FakeCC) -> None:
    def handler(req):
        sid = int(req.path.split("/")[4])
        if sid % 10 == 3:
            return json_reply({"message": "no such study"}, 404)
        recs = [{"id": sid * 100 + i} for i in range(sid % 7)]
        return odata_entity(recs, next_links=True)(req)

    fake_cc.handler = handler
    streams = [Stream(i, f"/api/v1/studies/{i}/subjects/odata", {"studyId": str(i)}) for i in range(40)]
    fan = ThreadFanout(_client(fake_cc), streams, endpoint="/api/v1/studies/{studyId}/subjects/odata", odata=True,
                       page_size=2, workers=5).start()
    ids, done, failed, _ = collect(fan)
    assert set(failed) == {3, 13, 23, 33}
    assert all(isinstance(e, NotFoundError) for e in failed.values())
    assert done == set(range(40)) - set(failed)
    expected = {(i, i * 100 + k) for i in range(40) if i % 10 != 3 for k in range(i % 7)}
    assert set(ids) == expected and set(ids.values()) == {1}


def test_failed_page_fails_its_stream_once(fake_cc: FakeCC) -> None:
    recs = [{"id": i} for i in range(100)]
    ok = odata_entity(recs)

    def handler(req):
        if req.query.get("$skip") in ("40", "60"):
            return Reply(500, b"{}")
        return ok(req)

    fake_cc.handler = handler
    fan = ThreadFanout(_client(fake_cc, max_retries=1), [Stream(0, "/x/odata")], endpoint="/x", odata=True,
                       page_size=20, workers=4).start()
    _, done, failed, order = collect(fan)
    assert done == set() and list(failed) == [0]
    assert isinstance(failed[0], ServerError)
    assert sum(1 for k, _ in order if k == FAIL) == 1


def test_stop_ends_workers_promptly(fake_cc: FakeCC) -> None:
    fake_cc.handler = lambda req: json_reply({"value": [{"id": 1}], "@odata.count": 1}, delay=0)
    stop = threading.Event()
    streams = [Stream(i, f"/s/{i}/odata", {"s": str(i)}) for i in range(10_000)]
    fan = ThreadFanout(_client(fake_cc), streams, endpoint="/s/{s}/odata", odata=True, workers=4, stop=stop).start()
    seen = 0
    for item in fan.results(tick=0.05):
        if item is not None and item[0] == DONE:
            seen += 1
            if seen == 20:
                stop.set()
    assert seen < 200
    assert not fan.alive()
