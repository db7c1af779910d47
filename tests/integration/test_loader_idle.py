"""An idle loader stops fetching (issue 17: ten fetches a second over every partition kept the
embedded broker at ~17 % of a core with nothing to do) and still picks up what arrives later."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.loader import Loader, LoaderOptions
from tests.loader_support import Ctx, Rec, expected_state, make_ctx, publish, ts, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def ctx(stack, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    yield from make_ctx(unique, tmp_path, monkeypatch)


def test_idle_loader_sleeps_and_wakes_for_new_records(ctx: Ctx) -> None:
    opts = LoaderOptions(group=ctx.group, tables=[ctx.table], batch_size=500, flush_ms=100,
                         install_signal_handlers=False, idle_after_s=1.0, idle_probe_s=1.0)
    loader = Loader(opts, ctx.settings)
    states: list[str] = []
    tick = loader._idle_tick

    def spy() -> None:
        tick()
        if not states or states[-1] != loader._idle_state:
            states.append(loader._idle_state)

    loader._idle_tick = spy  # type: ignore[method-assign]
    first = [Rec(f"cc1:{i}", {"i": i}, 1, extracted_at=ts(i)) for i in range(100)]
    publish(ctx.settings, ctx.table, first, fmt="v1")
    t = threading.Thread(target=loader.run, name="loader-under-test")
    t.start()
    try:
        wait_until(lambda: ctx.state() == expected_state(first), 60, what="the first records")
        wait_until(lambda: "asleep" in states and "probing" in states, 30, what="the loader to fall asleep and probe")
        later = [Rec(f"cc1:{i}", {"i": i, "v": 2}, 2, extracted_at=ts(1000 + i)) for i in range(50)]
        publish(ctx.settings, ctx.table, later, fmt="v1")
        wait_until(lambda: ctx.state() == expected_state(first + later), 30, what="records published while asleep")
        assert states.count("awake") >= 2  # woke up again
    finally:
        loader.stop()
        t.join(60)
    assert not t.is_alive()


def test_a_run_announced_on_the_control_topic_wakes_an_idle_loader(ctx: Ctx) -> None:
    """Probes so rare they never come: only the control-topic watcher can wake the loader."""
    from confluent_kafka import Producer

    from common.kafka import control_topic, producer_config
    from schemas.messages import RunStarted

    opts = LoaderOptions(group=ctx.group, tables=[ctx.table], batch_size=500, flush_ms=100,
                         install_signal_handlers=False, idle_after_s=0.5, idle_probe_s=600.0)
    loader = Loader(opts, ctx.settings)
    publish(ctx.settings, ctx.table, [], fmt="v1")  # the topic exists: the loader gets its partitions
    t = threading.Thread(target=loader.run, name="loader-under-test")
    t.start()
    try:
        wait_until(lambda: loader.assigned and loader._idle_state == "asleep", 60, what="the loader to fall asleep")
        assert loader._wakeup is not None
        recs = [Rec(f"cc1:{i}", {"i": i}, 5, extracted_at=ts(i)) for i in range(30)]
        p = Producer(producer_config(ctx.settings))
        p.produce(control_topic(ctx.settings), RunStarted(run_id=5, job_id=9, target_table=ctx.table, topic=ctx.topic,
                                                           instance_id="cc1").to_bytes(), b"5")
        assert p.flush(10) == 0
        publish(ctx.settings, ctx.table, recs, fmt="v1")
        wait_until(lambda: ctx.state() == expected_state(recs), 20, what="the run's records (woken by run_started)")
    finally:
        loader.stop()
        t.join(60)
    assert not t.is_alive()
