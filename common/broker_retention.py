"""Retention for the durable embedded broker: keeps its disk bounded while leaving history to replay.

Why TrialSync does this and not the broker: tansu 0.6.0 stores topic configs such as
``retention.ms`` but enforces none, and its object-store engine panics on DeleteRecords
(``dynostore.rs``), so every full run would only add to the topics. Its durable storage keeps one
S3 object per record batch, named by the batch's base offset
(``clusters/<cluster>/topics/<topic>/partitions/<p>/records/<offset>.batch``), and its fetch skips
batches that are gone (checked: reading partition 0 from offset 0 after deleting batch 0..99
returns 100 onwards). So the keeper deletes whole batches from the oldest end of each partition:

* bronze topics (``<prefix>.bronze.<table>``) and dead-letter topics (``<prefix>.dlq.<table>``) only;
  control and the compacted watermark topics are small and left alone;
* a batch goes when it is older than ``TRIALSYNC_BROKER_RETENTION_HOURS``, or while its topic is
  larger than ``TRIALSYNC_BROKER_RETENTION_MB`` (oldest first);
* never a partition's newest batch, and on a bronze topic never a batch holding a record at or past
  the loader group's (``<prefix>-loader``) committed offset: retention must not lose data that
  is not in the warehouse yet. A partition the group never committed keeps everything.

``trialsync stack up`` starts the keeper (``python -m common.broker_retention``) beside a durable
broker; ``trialsync stack retention`` runs one sweep and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from common import embedded_s3

_BATCH = re.compile(r"^clusters/([^/]+)/topics/([^/]+)/partitions/(\d+)/records/(\d+)\.batch$")


@dataclass(frozen=True)
class Batch:
    key: str
    topic: str
    partition: int
    base_offset: int
    size: int
    modified: float


@dataclass(frozen=True)
class Policy:
    max_age_seconds: float
    max_topic_bytes: int


@dataclass
class SweepReport:
    deleted_batches: int = 0
    deleted_bytes: int = 0
    kept_bytes: int = 0
    per_topic: dict[str, dict[str, int]] = field(default_factory=dict)
    held_unloaded: int = 0  # bronze batches not fully committed by the loader group: never deleted

    def as_dict(self) -> dict[str, object]:
        return {"deleted_batches": self.deleted_batches, "deleted_bytes": self.deleted_bytes,
                "kept_bytes": self.kept_bytes, "held_unloaded": self.held_unloaded, "topics": self.per_topic}


def topic_kind(topic: str) -> tuple[str, str] | None:
    """``("bronze"|"dlq", prefix)`` for topics retention applies to, else None."""
    for kind in ("bronze", "dlq"):
        marker = f".{kind}."
        if marker in topic:
            return kind, topic.split(marker, 1)[0]
    return None


def parse_batches(objects: Iterable[embedded_s3.S3Object]) -> dict[tuple[str, int], list[Batch]]:
    """Record batches per (topic, partition), oldest offset first."""
    out: dict[tuple[str, int], list[Batch]] = defaultdict(list)
    for o in objects:
        m = _BATCH.match(o.key)
        if m:
            out[(m.group(2), int(m.group(3)))].append(
                Batch(o.key, m.group(2), int(m.group(3)), int(m.group(4)), o.size, o.modified))
    for v in out.values():
        v.sort(key=lambda b: b.base_offset)
    return dict(out)


def plan(partitions: dict[tuple[str, int], list[Batch]], policy: Policy, now: float,
         committed: Callable[[str, int], int | None]) -> tuple[list[Batch], int]:
    """The batches to delete, and how many bronze batches are kept because not yet fully loaded.

    ``committed(topic, partition)`` is the loader group's next offset to read (None: never
    committed); only bronze topics are guarded by it.
    """
    by_topic: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for tp in partitions:
        if topic_kind(tp[0]):
            by_topic[tp[0]].append(tp)
    doomed: list[Batch] = []
    held = 0
    for topic, tps in by_topic.items():
        kind, _ = topic_kind(topic) or ("", "")
        # deletable prefix per partition: never the newest batch; bronze: only fully committed batches
        queues: dict[tuple[str, int], list[Batch]] = {}
        for tp in tps:
            batches = partitions[tp]
            limit = committed(*tp) if kind == "bronze" else None
            q = []
            for i, b in enumerate(batches[:-1]):
                next_base = batches[i + 1].base_offset
                if kind == "bronze" and (limit is None or next_base > limit):
                    held += len(batches) - 1 - i
                    break
                q.append(b)
            queues[tp] = q
        total = sum(b.size for tp in tps for b in partitions[tp])
        # oldest first across the topic's partitions
        heads = {tp: 0 for tp in tps}
        while True:
            cands = [(queues[tp][heads[tp]], tp) for tp in tps if heads[tp] < len(queues[tp])]
            if not cands:
                break
            b, tp = min(cands, key=lambda c: (c[0].modified, c[0].base_offset))
            if now - b.modified > policy.max_age_seconds or total > policy.max_topic_bytes:
                doomed.append(b)
                total -= b.size
                heads[tp] += 1
            else:
                break
    return doomed, held


def committed_offsets(bootstrap: str, groups_topics: dict[str, set[tuple[str, int]]]) -> dict[tuple[str, int], int | None]:
    """The committed next offsets of each loader group for its bronze partitions (Kafka API)."""
    from confluent_kafka import Consumer, TopicPartition

    out: dict[tuple[str, int], int | None] = {}
    for group, tps in groups_topics.items():
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                      "log_level": 3})
        try:
            for tp in c.committed([TopicPartition(t, p) for t, p in sorted(tps)], timeout=20):
                out[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 and not tp.error else None
        finally:
            c.close()
    return out


def sweep(s3_port: int, bootstrap: str, policy: Policy, now: float | None = None,
          dry_run: bool = False) -> SweepReport:
    """One pass over the durable storage: plan, delete, report."""
    now = time.time() if now is None else now
    parts = parse_batches(embedded_s3.list_objects(s3_port, "clusters/"))
    groups: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for tp in parts:
        kind = topic_kind(tp[0])
        if kind and kind[0] == "bronze":
            groups[f"{kind[1]}-loader"].add(tp)
    offsets = committed_offsets(bootstrap, groups) if groups else {}
    doomed, held = plan(parts, policy, now, lambda t, p: offsets.get((t, p)))
    rep = SweepReport(held_unloaded=held)
    gone = {b.key for b in doomed}
    for b in doomed:
        if not dry_run:
            with contextlib.suppress(OSError):  # already gone: fine
                embedded_s3.delete_object(s3_port, b.key)
        rep.deleted_batches += 1
        rep.deleted_bytes += b.size
        t = rep.per_topic.setdefault(b.topic, {"deleted_batches": 0, "deleted_bytes": 0, "kept_bytes": 0})
        t["deleted_batches"] += 1
        t["deleted_bytes"] += b.size
    for (topic, _), batches in parts.items():
        if not topic_kind(topic):
            continue
        kept = sum(b.size for b in batches if b.key not in gone)
        rep.kept_bytes += kept
        rep.per_topic.setdefault(topic, {"deleted_batches": 0, "deleted_bytes": 0, "kept_bytes": 0})["kept_bytes"] += kept
    return rep


def policy_from_settings(settings=None) -> Policy:  # noqa: ANN001 - Settings, imported lazily
    from common.config import get_settings

    s = settings or get_settings()
    return Policy(max_age_seconds=s.trialsync_broker_retention_hours * 3600,
                  max_topic_bytes=s.trialsync_broker_retention_mb * 1024 * 1024)


def main(argv: list[str] | None = None) -> int:
    """The keeper loop ``stack up`` starts: sweep every interval until SIGTERM."""
    from common import stack
    from common.config import get_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--once", action="store_true")
    args = ap.parse_args(argv)
    s = get_settings()
    # a sweep is a series of idempotent deletes: stopping in the middle loses nothing, so SIGTERM
    # ends the keeper at once (a sweep waiting on a broker that is gone must not hold `stack down`)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        st = stack.read_state(s)
        t0 = time.monotonic()
        try:
            if st.s3_port and st.kafka_port:
                rep = sweep(st.s3_port, f"127.0.0.1:{st.kafka_port}", policy_from_settings(s))
                if rep.deleted_batches or args.once:
                    print(json.dumps({"event": "broker_retention_sweep", "duration_s": round(time.monotonic() - t0, 3),
                                      **{k: v for k, v in rep.as_dict().items() if k != "topics"}}), flush=True)
        except Exception as e:  # noqa: BLE001 - a keeper must outlive a broker restart; it says why and retries
            print(json.dumps({"event": "broker_retention_failed", "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
        if args.once:
            return 0
        time.sleep(s.trialsync_broker_retention_interval_seconds)


if __name__ == "__main__":
    sys.exit(main())
