"""Loaders in one consumer group: partitions split, exact state together, scaling while loading."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers import run_progress
from tests.loader_support import (
    Ctx,
    LoaderProcess,
    Rec,
    expected_state,
    finish_run,
    loaders,
    make_ctx,
    new_run,
    publish,
    run_row,
    ts,
    wait_until,
)

pytestmark = pytest.mark.integration
PARTITIONS = 4


@pytest.fixture
def ctx(stack, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    yield from make_ctx(unique, tmp_path, monkeypatch)


def _recs(run_id: int, n: int, start: int = 0, keys: int = 2000, seed: int = 3) -> list[Rec]:
    rnd = random.Random(seed + start)
    out = []
    for i in range(start, start + n):
        k = rnd.randrange(keys)
        value = None if rnd.random() < 0.05 else {"k": k, "rev": i}
        out.append(Rec(f"cc1:{k}", value, run_id, extracted_at=ts(i)))
    return out


def _partitions(p: LoaderProcess) -> set[str]:
    """Partitions the process holds now, from its assigned/revoked log events."""
    held: set[str] = set()
    events = [(e["ts"], e["event"], e.get("partitions", [])) for e in
              p.events("partitions_assigned") + p.events("partitions_revoked")]
    for _ts, name, parts in sorted(events, key=lambda e: (e[0], e[1] == "partitions_assigned")):
        if name == "partitions_assigned":
            held |= set(parts)
        else:
            held -= set(parts)
    return held


def _start(ctx: Ctx, name: str) -> LoaderProcess:
    return LoaderProcess(ctx.env(), ctx.tmp / f"{name}.log", "--tables", ctx.table, "--group", ctx.group,
                         "--batch-size", "500", "--flush-ms", "100")


def test_two_loaders_split_partitions_and_load_exactly(ctx: Ctx) -> None:
    run_id = new_run(ctx.conn, topic=ctx.topic)
    publish(ctx.settings, ctx.table, [], partitions=PARTITIONS)  # create the topic with 4 partitions
    a, b = _start(ctx, "a"), _start(ctx, "b")
    with loaders(a, b):
        wait_until(lambda: len(_partitions(a)) + len(_partitions(b)) == PARTITIONS
                   and _partitions(a) and _partitions(b), 90, what="both loaders to hold partitions")
        pa, pb = _partitions(a), _partitions(b)
        assert not pa & pb
        recs = _recs(run_id, 12_000)
        ends = publish(ctx.settings, ctx.table, recs, partitions=PARTITIONS)
        finish_run(ctx.conn, run_id, ctx.topic, ends, published=len(recs))
        assert run_progress.wait_for_load([run_id], timeout=120, settings=ctx.settings, raise_on_timeout=True)
        assert ctx.state() == expected_state(recs)
        assert run_row(ctx.conn, run_id)["records_loaded"] == len(recs)
        assert a.stop() == 0 and b.stop() == 0
    # both wrote: each committed positions for its own partitions
    rows = ctx.conn.execute("SELECT count(*) FROM etl.loader_positions WHERE group_id = %s", (ctx.group,)).fetchone()
    assert rows[0] == PARTITIONS


def test_scaling_from_one_to_two_while_loading_loses_nothing(ctx: Ctx) -> None:
    run_id = new_run(ctx.conn, topic=ctx.topic)
    publish(ctx.settings, ctx.table, [], partitions=PARTITIONS)
    all_recs: list[Rec] = []
    ends: dict[int, int] = {}
    done = threading.Event()

    def producer() -> None:
        for step in range(12):
            chunk = _recs(run_id, 1500, start=step * 1500)
            for p, o in publish(ctx.settings, ctx.table, chunk, partitions=PARTITIONS).items():
                ends[p] = max(ends.get(p, -1), o)
            all_recs.extend(chunk)
            time.sleep(0.6)
        done.set()

    a = _start(ctx, "a")
    with loaders(a):
        wait_until(lambda: _partitions(a), 60, what="the first loader to join")
        t = threading.Thread(target=producer)
        t.start()
        wait_until(lambda: ctx.count() > 0, 60, what="the first loader to write")
        b = _start(ctx, "b")
        with loaders(b):
            wait_until(lambda: _partitions(b), 90, what="the second loader to take partitions")
            t.join()
            assert done.is_set()
            finish_run(ctx.conn, run_id, ctx.topic, ends, published=len(all_recs))
            assert run_progress.wait_for_load([run_id], timeout=120, settings=ctx.settings, raise_on_timeout=True)
            assert ctx.state() == expected_state(all_recs)
            # every record counted exactly once although partitions moved mid-load
            assert run_row(ctx.conn, run_id)["records_loaded"] == len(all_recs)
            assert _partitions(a) and not _partitions(a) & _partitions(b)
            assert b.stop() == 0
        assert a.stop() == 0


def test_workers_share_the_group_and_their_metrics_are_served_together(ctx: Ctx) -> None:
    import urllib.request

    from common.stack import free_port

    run_id = new_run(ctx.conn, topic=ctx.topic)
    publish(ctx.settings, ctx.table, [], partitions=PARTITIONS)
    port = free_port()
    p = LoaderProcess(ctx.env(ENABLE_METRICS="true"), ctx.tmp / "workers.log", "--tables", ctx.table,
                      "--group", ctx.group, "--workers", "2", "--metrics-port", str(port), "--batch-size", "500")
    with loaders(p):
        started = wait_until(lambda: len(p.events("worker_started")) == 2 and p.events("worker_started"), 60,
                             what="two workers")
        pids = {e["worker_pid"] for e in started}
        # both workers end up holding partitions (their own log lines, distinct pids)
        wait_until(lambda: {e["pid"] for e in p.events("partitions_assigned")} == pids, 90,
                   what="both workers to be assigned partitions")
        recs = _recs(run_id, 6000, seed=9)
        ends = publish(ctx.settings, ctx.table, recs, partitions=PARTITIONS)
        finish_run(ctx.conn, run_id, ctx.topic, ends, published=len(recs))
        assert run_progress.wait_for_load([run_id], timeout=120, settings=ctx.settings, raise_on_timeout=True)
        assert ctx.state() == expected_state(recs)

        def scraped_total() -> float:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: S310
            return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                       if line.startswith("trialsync_records_loaded_total{") and ctx.table in line)

        assert wait_until(lambda: scraped_total() == len(recs), 30, what="aggregated records_loaded metric")
        assert p.stop() == 0
    # the supervisor stopped its workers
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(pid, 0)


def test_subscription_from_table_names_and_globs(settings) -> None:
    import re

    from consumers.loader import subscription
    from schemas.jobs import CatalogError

    pre = settings.kafka_topic_prefix
    assert subscription(None, settings) == [f"^{re.escape(pre + '.bronze.')}[a-z_][a-z0-9_]*$"]
    assert subscription(["dim_patients_staging,dim_studies_staging"], settings) == [
        f"{pre}.bronze.dim_patients_staging", f"{pre}.bronze.dim_studies_staging"]
    (rx,) = subscription(["dim_patient*", "dim_studies_staging"], settings)
    pattern = re.compile(rx)
    assert pattern.match(f"{pre}.bronze.dim_patient_visits_staging")
    assert pattern.match(f"{pre}.bronze.dim_studies_staging")
    assert not pattern.match(f"{pre}.bronze.dim_subjects_staging")
    assert not pattern.match(f"{pre}x.bronze.dim_patients_staging")
    with pytest.raises(CatalogError):
        subscription(['dim_x"; drop table'], settings)
    with pytest.raises(CatalogError):
        subscription(["dim_(.*)"], settings)
