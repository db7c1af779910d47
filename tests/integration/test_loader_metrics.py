"""The loader's metric families move when their events happen (read from the process registry)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.loader_support import Ctx, Rec, load_once, make_ctx, publish, ts

pytestmark = pytest.mark.integration


@pytest.fixture
def ctx(stack, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    yield from make_ctx(unique, tmp_path, monkeypatch)


def _sample(name: str, **labels: str) -> float:
    v = REGISTRY.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_loader_metric_families(ctx: Ctx) -> None:
    t = ctx.table
    before = {o: _sample("trialsync_records_loaded_total", table=t, outcome=o)
              for o in ("inserted", "updated", "unchanged", "deleted")}
    recs = [Rec(f"cc1:{i}", {"i": i}, 1, extracted_at=ts(i)) for i in range(300)]
    recs += [Rec("cc1:1", {"i": 1, "v": 2}, 1, extracted_at=ts(400)),   # update
             Rec("cc1:2", {"i": 2}, 1, extracted_at=ts(401)),           # unchanged
             Rec("cc1:3", None, 1, extracted_at=ts(402)),               # delete
             Rec("cc1:bad", b"{nope", 1, extracted_at=ts(403))]         # reject
    publish(ctx.settings, t, recs[:300])
    load_once(ctx.settings, ctx.group, [t], batch_size=1000)
    publish(ctx.settings, t, recs[300:])
    stats = load_once(ctx.settings, ctx.group, [t], batch_size=1000)
    assert (stats.updated, stats.unchanged, stats.deleted, stats.rejected) == (1, 1, 1, 1)

    got = {o: _sample("trialsync_records_loaded_total", table=t, outcome=o) - before[o] for o in before}
    assert got == {"inserted": 300, "updated": 1, "unchanged": 1, "deleted": 1}
    assert _sample("trialsync_records_rejected_total", table=t, stage="load", reason="InvalidJson") == 1
    assert _sample("trialsync_loader_batch_size_count", table=t) >= 2
    assert _sample("trialsync_loader_batch_size_sum", table=t) == len(recs)
    assert _sample("trialsync_loader_flush_duration_seconds_count", table=t) >= 2
    assert _sample("trialsync_loader_end_to_end_seconds_count", table=t) >= 2
    # drained: the final lag of every partition is reported, and it is 0
    lags = [_sample("trialsync_consumer_lag_messages", group=ctx.group, topic=ctx.topic, partition=str(p))
            for p in range(3)]
    assert REGISTRY.get_sample_value("trialsync_consumer_lag_messages",
                                     {"group": ctx.group, "topic": ctx.topic, "partition": "0"}) is not None
    assert lags == [0, 0, 0]
    # the connection gauge went back to idle after the last batch
    assert _sample("trialsync_db_pool_connections", pool="loader", state="in_use") == 0
