"""The durable broker's retention plan: age and size bounds, never the newest batch of a partition,
never a bronze batch the loader group has not committed, oldest first across partitions."""

from __future__ import annotations

from common.broker_retention import Policy, parse_batches, plan, topic_kind
from common.embedded_s3 import S3Object

NOW = 1_000_000.0
DAY = 86_400.0


def _objs(topic: str, partition: int, batches: list[tuple[int, int, float]]) -> list[S3Object]:
    """(base offset, size, age in seconds) per batch."""
    return [S3Object(f"clusters/c/topics/{topic}/partitions/{partition:010d}/records/{off:020d}.batch", size, NOW - age)
            for off, size, age in batches]


def test_topic_kinds() -> None:
    assert topic_kind("trialsync.bronze.dim_sites_staging") == ("bronze", "trialsync")
    assert topic_kind("lt1.dlq.x") == ("dlq", "lt1")
    assert topic_kind("trialsync.control.runs") is None
    assert topic_kind("trialsync.state.watermarks") is None


def test_age_bound_keeps_newest_and_unloaded() -> None:
    t = "p.bronze.t"
    parts = parse_batches(_objs(t, 0, [(0, 10, 9 * DAY), (100, 10, 8 * DAY), (200, 10, 7.5 * DAY), (300, 10, 9 * DAY)])
                          + [S3Object("clusters/c/topics/p.bronze.t/partitions/0000000000/watermark.json", 5, NOW)])
    # loader committed up to 250: batches 0 and 100 are fully loaded; 200 holds 200..299 -> not all loaded
    doomed, held = plan(parts, Policy(7 * DAY, 10**9), NOW, lambda _t, _p: 250)
    assert [b.base_offset for b in doomed] == [0, 100]
    assert held == 1  # batch 200 (not fully loaded); 300 is the newest and never a candidate
    # never committed: nothing goes
    assert plan(parts, Policy(7 * DAY, 10**9), NOW, lambda _t, _p: None)[0] == []
    # everything committed: all but the newest
    doomed, _ = plan(parts, Policy(7 * DAY, 10**9), NOW, lambda _t, _p: 10**6)
    assert [b.base_offset for b in doomed] == [0, 100, 200]


def test_size_bound_oldest_first_across_partitions() -> None:
    t = "p.bronze.t"
    parts = parse_batches(_objs(t, 0, [(0, 100, 50), (10, 100, 30), (20, 100, 10)])
                          + _objs(t, 1, [(0, 100, 40), (10, 100, 20), (20, 100, 5)]))
    doomed, _ = plan(parts, Policy(DAY, 350), NOW, lambda _t, _p: 10**6)
    # 600 bytes, bound 350: the three oldest batches go, whatever their partition (ages 50, 40, 30)
    assert [(b.partition, b.base_offset) for b in doomed] == [(0, 0), (1, 0), (0, 10)]


def test_dead_letters_have_no_loader_guard_and_other_topics_are_left_alone() -> None:
    parts = parse_batches(_objs("p.dlq.t", 0, [(0, 10, 9 * DAY), (1, 10, 9 * DAY)])
                          + _objs("p.control.runs", 0, [(0, 10, 9 * DAY), (1, 10, 9 * DAY)]))
    doomed, held = plan(parts, Policy(DAY, 10**9), NOW, lambda _t, _p: None)
    assert [(b.topic, b.base_offset) for b in doomed] == [("p.dlq.t", 0)] and held == 0
