"""`trialsync load --once`: alone it takes every partition without a group join (issue 17: the join
cost seconds); beside a running loader service it joins the group; offsets move only after the
database commit either way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consumers.loader import BatchSink, DatabaseUnavailable
from tests.loader_support import (
    Ctx,
    LoaderProcess,
    Rec,
    expected_state,
    group_committed,
    load_once,
    loaders,
    make_ctx,
    publish,
    ts,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def ctx(stack, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    yield from make_ctx(unique, tmp_path, monkeypatch)


def _once(ctx: Ctx, name: str) -> LoaderProcess:
    return LoaderProcess(ctx.env(), ctx.tmp / f"{name}.log", "--once", "--tables", ctx.table)


def test_once_alone_takes_every_partition_and_commits(ctx: Ctx) -> None:
    recs = [Rec(f"cc1:{i}", {"i": i}, 7, extracted_at=ts(i)) for i in range(60)]
    ends = publish(ctx.settings, ctx.table, recs, fmt="v1")
    p = _once(ctx, "first")
    assert p.wait(60) == 0, p.log_text()[-2000:]
    started = p.events("loader_started")
    assert started and started[0]["membership"] == "assigned"
    assert "loaded 60 records" in p.log_text()
    assert ctx.state() == expected_state(recs)
    assert group_committed(ctx.settings, ctx.group, ctx.topic) == {q: o + 1 for q, o in ends.items()}
    # the next one-shot load starts where the last one committed
    more = [Rec("cc1:x", {"x": 1}, 8, extracted_at=ts(100))]
    publish(ctx.settings, ctx.table, more, fmt="v1")
    p = _once(ctx, "second")
    assert p.wait(60) == 0 and "loaded 1 records" in p.log_text()


def test_once_beside_a_running_service_joins_its_group(ctx: Ctx) -> None:
    service = LoaderProcess(ctx.env(), ctx.tmp / "service.log", "--tables", ctx.table, "--flush-ms", "100")
    with loaders(service):
        publish(ctx.settings, ctx.table, [], fmt="v1")
        wait_until(lambda: service.events("partitions_assigned"), 60, what="the service to join")
        recs = [Rec(f"cc1:{i}", {"i": i}, 7, extracted_at=ts(i)) for i in range(40)]
        publish(ctx.settings, ctx.table, recs, fmt="v1")
        p = _once(ctx, "once")
        assert p.wait(120) == 0, p.log_text()[-2000:]
        assert p.events("loader_started")[0]["membership"] == "group"
        wait_until(lambda: ctx.state() == expected_state(recs), 60, what="both to have loaded")
        assert service.stop() == 0


def test_assigned_once_commits_offsets_only_after_the_database(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = [Rec(f"cc1:{i}", {"i": i}, 7, extracted_at=ts(i)) for i in range(30)]
    ends = publish(ctx.settings, ctx.table, recs, fmt="v1")
    real_write = BatchSink.write
    seen: list[dict[int, int]] = []

    def flaky(self: BatchSink, batch: Any, prepared: Any = None) -> Any:
        seen.append(group_committed(ctx.settings, ctx.group, ctx.topic))  # before this write commits
        if len(seen) == 1:
            raise DatabaseUnavailable("simulated: the database went away")
        return real_write(self, batch, prepared)

    monkeypatch.setattr(BatchSink, "write", flaky)
    stats = load_once(ctx.settings, ctx.group, [ctx.table])
    assert stats.backoffs == 1 and stats.records == 30
    assert all(off < 0 for off in seen[0].values()) and all(off < 0 for off in seen[1].values())
    assert ctx.state() == expected_state(recs)
    assert group_committed(ctx.settings, ctx.group, ctx.topic) == {q: o + 1 for q, o in ends.items()}
