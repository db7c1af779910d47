"""Publishing records to the broker: one idempotent, batched producer per process, and per-run
delivery bookkeeping.

Why per-run trackers on a shared producer: librdkafka batches best with one producer per process
(the design card: "the idempotent producer is per process"), but several runs may share a process
(the orchestrator runs jobs in threads). Every produced message carries its run's
:class:`DeliveryTracker` as the delivery callback, so each run knows, from the broker's own
acknowledgements, how many records landed in each partition and the offset of the last one --
the ``end_offsets`` of ``run_finished``, which the loader compares with its committed offsets.

The hot path (:meth:`Publisher.publish_page`) does per record only what cannot be batched: key
lookup, ``orjson.dumps`` of the record (the value is the raw record), its content hash, the
loader's header, produce.

Record headers: one ``ts-load-v1`` header (``common.kafka.H_LOAD``) holds, tab-separated, what the
loader writes next to the value -- run, job, instance, extraction time, the record's
``modifiedDate``, the parent parameters and a content hash (first 128 bits of SHA-256 of the value
bytes, hex) -- so the loader copies it into its COPY stream without parsing anything and skips
unchanged records by hash. Why one header and not six named ones: the consumer pays per header
(see common/kafka.py). A page whose run-wide values would break the tab-separated form (a tab or
newline in the instance id, say) is published with the named headers instead, which the loader
also reads (as it reads records published by older versions).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from binascii import hexlify
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from hashlib import sha256
from typing import Any, Protocol

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from common import kafka as K
from common.config import Settings
from common.logging import get_logger
from producers.keys import KeyFn

log = get_logger("publisher")


class Tracker(Protocol):
    """What a produced record reports its delivery to: the run's :class:`DeliveryTracker`, or a
    wrapper around it (``producers.page_publisher``'s per-page acknowledgement)."""

    produced: int

    def __call__(self, err: KafkaError | None, msg: Any) -> None: ...


class PublishError(RuntimeError):
    """The broker did not acknowledge records (or refused a topic); the run cannot be complete."""


class DeliveryTracker:
    """Delivery reports of one run: per-partition counts and last offsets, and failures."""

    __slots__ = ("topic", "produced", "delivered", "failed", "first_error", "per_partition", "last_offset",
                 "_lock")

    def __init__(self, topic: str):
        self.topic = topic
        self.produced = 0          # only the run's publishing thread increments this
        self.delivered = 0
        self.failed = 0
        self.first_error: str | None = None
        self.per_partition: dict[int, int] = {}
        self.last_offset: dict[int, int] = {}
        self._lock = threading.Lock()

    def __call__(self, err: KafkaError | None, msg: Any) -> None:
        # librdkafka calls back on whichever thread polls; several threads may poll one producer
        with self._lock:
            if err is not None:
                self.failed += 1
                if self.first_error is None:
                    self.first_error = f"{err.name()}: {err.str()}"
                return
            p = msg.partition()
            off = msg.offset()
            self.delivered += 1
            self.per_partition[p] = self.per_partition.get(p, 0) + 1
            if off > self.last_offset.get(p, -1):
                self.last_offset[p] = off

    @property
    def pending(self) -> int:
        return self.produced - self.delivered - self.failed

    def merge(self, per_partition: Mapping[int, int], last_offset: Mapping[int, int], delivered: int,
              failed: int, first_error: str | None) -> None:
        """Fold in the bookkeeping of a worker process that published part of the run."""
        with self._lock:
            self.produced += delivered + failed
            self.delivered += delivered
            self.failed += failed
            if first_error and self.first_error is None:
                self.first_error = first_error
            for p, n in per_partition.items():
                self.per_partition[int(p)] = self.per_partition.get(int(p), 0) + n
            for p, off in last_offset.items():
                if off > self.last_offset.get(int(p), -1):
                    self.last_offset[int(p)] = off

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"delivered": self.delivered, "failed": self.failed, "first_error": self.first_error,
                    "per_partition": dict(self.per_partition), "last_offset": dict(self.last_offset)}


class Publisher:
    """Wraps the process's producer: topic creation on first use, batched produce, run flush."""

    def __init__(self, settings: Settings, producer: Producer | None = None):
        self.settings = settings
        #: set when librdkafka reports a fatal error (e.g. the idempotent producer's sequence got out
        #: of step with the broker's after a broker restart): this producer can never send again
        self.fatal: str | None = None
        self.producer = producer or Producer(K.producer_config(
            settings, **{"client.id": "trialsync-extractor", "error_cb": self._on_error}))
        self._topics: set[str] = set()
        #: partition count of each cached topic when first checked (a change = topic recreated)
        self._partitions: dict[str, int] = {}
        self._topics_lock = threading.Lock()
        #: a full local queue: since when, its depth then, and the last time we found it full
        self._full_since: float | None = None
        self._full_depth = 0
        self._full_last = 0.0

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = err.str()
            log.error("producer_fatal_error", error=err.str(),
                      note="this producer is replaced for the next run (get_publisher)")

    def _unreachable(self, e: KafkaException) -> PublishError:
        """The broker did not answer: this producer is done (the run's control messages fail at
        once instead of waiting 60 s each; the next run gets a new producer and tries again)."""
        msg = K.describe_broker_error(e, self.settings)
        self.fatal = msg
        return PublishError(msg)

    # -- topics ----------------------------------------------------------------------------------
    def ensure_topic(self, topic: str) -> None:
        if topic in self._topics:
            return
        with self._topics_lock:
            if topic in self._topics:
                return
            try:
                K.ensure_topics([topic], self.settings)
            except KafkaException as e:
                raise self._unreachable(e) from None
            self._topics.add(topic)

    def refresh_topics(self, timeout: float = 5.0) -> bool:
        """Check the cached topics against the broker; False when it lost them (then replace me).

        Why: a pooled worker keeps its publisher between runs. When the broker lost its topics
        meanwhile (the embedded broker restarted with memory storage), they are gone -- or
        auto-created again with another partition count -- and this producer's idempotence
        state (producer id, sequence numbers) means nothing to the new broker: records were never
        acknowledged and every later run of the worker failed after a 60 s wait (found by the
        fault suite). One metadata request on the producer's connection per run."""
        if not self._topics:
            return True
        try:
            md = self.producer.list_topics(timeout=timeout)
        except KafkaException:
            return True  # broker unreachable: producing will say so
        with self._topics_lock:
            changed = []
            for t in sorted(self._topics):
                meta = md.topics.get(t)
                n = len(meta.partitions) if meta is not None and not meta.error else None
                if n is None or self._partitions.setdefault(t, n) != n:
                    changed.append(t)
            if not changed:
                return True
            log.warning("broker_lost_topics", topics=changed[:10], count=len(changed),
                        note="the broker restarted without its data: new producer, topics created again")
            self._topics.clear()
            self._partitions.clear()
            self.fatal = f"the broker lost {len(changed)} topic(s) (restarted without its data)"
            return False

    def ensure_system_topics(self) -> None:
        if K.control_topic(self.settings) in self._topics:
            return
        try:
            K.ensure_system_topics(self.settings)
        except KafkaException as e:
            raise self._unreachable(e) from None
        self._topics.update({K.control_topic(self.settings), K.watermark_topic(self.settings)})

    # -- records ---------------------------------------------------------------------------------
    def publish_page(self, topic: str, records: list[Any], keyfn: KeyFn, params: Mapping[str, Any] | None,
                     base_headers: list[tuple[str, bytes]], tracker: Tracker,
                     ts_field: str | None = None,
                     digests: list[tuple[str, bytes]] | None = None) -> tuple[int, int, list[Any], int]:
        """Produce one page of records in a single pass; return (produced, without key, timestamps,
        repeats skipped).

        A record whose key already appeared on the same page is not published again (APIs
        occasionally repeat a record across a page boundary or within a page; the loader would
        collapse it anyway, and "each record exactly once per run" is easier to check this way).

        Value = ``orjson.dumps(record)`` (the raw record); key = ``keyfn(record, params)`` (None =
        null key, the loader dead-letters it); the record's ``ts_field`` value, when present,
        becomes the ``ts-modified-at`` header and is returned for the watermark. ``digests``, when
        given, receives (key, content hash) of each keyed record -- the hash the header carries,
        computed once. Blocks (polling) while the local queue is full.
        """
        produce: Any = self.producer.produce  # (librdkafka types a header list invariantly)
        poll = self.producer.poll
        dumps = orjson.dumps
        h_mod = K.H_MODIFIED_AT
        h_load = K.H_LOAD
        shape = load_header_shape(base_headers)
        stamps: list[Any] = []
        seen: set[str] = set()
        missing = repeats = 0
        n = 0
        try:
            for rec in records:
                key = keyfn(rec, params)
                if key is None:
                    missing += 1
                elif key in seen:
                    repeats += 1
                    continue
                else:
                    seen.add(key)
                mod = b""
                if ts_field is not None and type(rec) is dict:
                    ts = rec.get(ts_field)
                    if ts is not None:
                        stamps.append(ts)
                        mod = ts.encode() if type(ts) is str else str(ts).encode()
                value = dumps(rec)
                digest = None
                if shape is not None and (not mod or (b"\t" not in mod and b"\n" not in mod and b"\r" not in mod)):
                    pre, post, extra = shape
                    digest = sha256(value).digest()[:16]
                    headers = [(h_load, pre + mod + post + hexlify(digest)), *extra]
                elif mod:
                    headers = [*base_headers, (h_mod, mod)]
                else:
                    headers = base_headers
                if digests is not None and key is not None:
                    digests.append((key, digest if digest is not None else sha256(value).digest()[:16]))
                while True:
                    try:
                        produce(topic, value, key, headers=headers, on_delivery=tracker)
                        break
                    except BufferError:
                        self._queue_full()
                n += 1
        finally:
            tracker.produced += n
        poll(0)
        return n, missing, stamps, repeats

    def publish_values(self, topic: str, items: Iterable[tuple[bytes | str | None, bytes | None]],
                       headers: list[tuple[str, bytes]] | None, tracker: DeliveryTracker) -> int:
        """Produce pre-serialized (key, value) pairs (control and watermark messages)."""
        n = 0
        for key, value in items:
            while True:
                try:
                    self.producer.produce(topic, value, key, headers=headers,  # type: ignore[arg-type]  # a list is invariant: list[tuple[str, bytes]] is a valid header list
                                          on_delivery=tracker)
                    break
                except BufferError:
                    self._queue_full()
            n += 1
        tracker.produced += n
        return n

    def _queue_full(self) -> None:
        """The local queue is full: wait for the broker, but never silently forever -- a fatal
        producer, or a queue that does not shrink for ``ETL_STALL_SECONDS``, fails the run with the
        reason (the next run gets a new producer)."""
        if self.fatal is not None:
            raise PublishError(f"the producer is unusable ({self.fatal}): the run fails now and is retried "
                               "with a new producer")
        now, depth = time.monotonic(), len(self.producer)
        if self._full_since is None or now - self._full_last > 1.0 or depth < self._full_depth:
            self._full_since, self._full_depth = now, depth  # a new wait, or the broker takes records
        self._full_last = now
        if now - self._full_since > self.settings.etl_stall_seconds:
            self.fatal = f"the broker took no records for {self.settings.etl_stall_seconds:.0f} s"
            raise PublishError(f"the broker took no records for {self.settings.etl_stall_seconds:.0f} s "
                               "(ETL_STALL_SECONDS; the producer's queue is full): is it down or restarting? "
                               "The run fails now and is retried with a new producer")
        self.producer.poll(0.05)

    def wait(self, tracker: DeliveryTracker, timeout: float | None = None,
             progress: Callable[[], None] | None = None) -> None:
        """Block until every message of ``tracker`` has a delivery report (success or failure).

        Polls instead of ``flush()``: flush would also wait for other runs sharing the producer.
        The producer's ``message.timeout.ms`` bounds the wait (undeliverable messages fail).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        stall = self.settings.etl_stall_seconds
        last_change, last_done = time.monotonic(), tracker.delivered + tracker.failed
        while tracker.pending > 0:
            self.producer.poll(0.05)
            if progress is not None:
                progress()
            now = time.monotonic()
            if self.fatal is not None:
                raise PublishError(f"{tracker.pending} records unacknowledged: the producer is unusable "
                                   f"({self.fatal}); the run fails now and is retried with a new producer")
            done = tracker.delivered + tracker.failed
            if done != last_done:
                last_change, last_done = now, done
            elif now - last_change > stall:
                self.fatal = f"no acknowledgement from the broker for {stall:.0f} s"
                raise PublishError(f"{tracker.pending} records unacknowledged and the broker answered nothing for "
                                   f"{stall:.0f} s (ETL_STALL_SECONDS): is it down or restarting? The run fails and "
                                   "is retried with a new producer")
            if deadline is not None and now > deadline:
                # the broker may have lost its state: the next run gets a new producer and topics
                self.fatal = f"{tracker.pending} records unacknowledged after {timeout:.0f} s"
                raise PublishError(f"{tracker.pending} records still unacknowledged by the broker after {timeout:.0f} s")

    def flush(self, timeout: float = 60.0) -> int:
        return self.producer.flush(timeout)


_PUBLISHERS: dict[tuple[str, str], Publisher] = {}
_PUBLISHERS_LOCK = threading.Lock()


def get_publisher(settings: Settings) -> Publisher:
    """The process-wide publisher for the configured broker (one idempotent producer per process)."""
    from common.stack import bootstrap_servers

    key = (bootstrap_servers(settings), settings.kafka_topic_prefix)
    with _PUBLISHERS_LOCK:
        pub = _PUBLISHERS.get(key)
        if pub is not None and (pub.fatal is not None or not pub.refresh_topics()):
            # a pooled worker keeps its publisher between runs: without this, one fatal error or a
            # broker that lost its data (found by the fault suite) failed every later run of the worker
            with contextlib.suppress(Exception):
                pub.producer.purge()
                pub.producer.flush(0)
            pub = None
        if pub is None:
            pub = Publisher(settings)
            _PUBLISHERS[key] = pub
        return pub


def reset_publishers() -> None:
    """Flush and forget the process's publishers (tests, and worker processes after fork)."""
    with _PUBLISHERS_LOCK:
        for p in _PUBLISHERS.values():
            try:
                p.flush(10)
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        _PUBLISHERS.clear()


#: bytes that would break the tab-separated ts-load-v1 value (the loader's COPY text rows)
_UNSAFE = re.compile(rb"[\t\n\r]")
#: the named headers ts-load-v1 replaces (ts-modified-at and the content hash are per record)
_PAGE_FIELDS = (K.H_RUN_ID, K.H_JOB_ID, K.H_INSTANCE, K.H_EXTRACTED_AT)


def load_header_shape(base_headers: list[tuple[str, bytes]]) -> tuple[bytes, bytes, list[tuple[str, bytes]]] | None:
    """The page-wide parts of the ``ts-load-v1`` value: (before the modified-at field, between it and
    the hash, other headers to keep); None when a value cannot be carried that way.

    Built once per page from the named headers the caller passes (``record_headers`` plus, for
    parameterized jobs, ``ts-params``), so callers keep building headers as before."""
    named: dict[str, bytes] = {}
    extra: list[tuple[str, bytes]] = []
    for k, v in base_headers:
        if k in _PAGE_FIELDS or k == K.H_PARAMS:
            named[k] = v
        elif k not in (K.H_LOAD, K.H_MODIFIED_AT, K.H_CONTENT_HASH):
            extra.append((k, v))
    page = [named.get(k, b"") for k in _PAGE_FIELDS]
    params = named.get(K.H_PARAMS, b"")
    if not named.get(K.H_EXTRACTED_AT) or any(_UNSAFE.search(v) for v in (*page, params)):
        return None  # the loader's direct path needs the extraction time; the named headers say it is absent
    return b"\t".join(page) + b"\t", b"\t" + params + b"\t", extra


def record_headers(job_id: int, run_id: int, instance_id: str, extracted_at: datetime,
                   params: Mapping[str, Any] | None) -> list[tuple[str, bytes]]:
    """The named headers every record of one page shares; ``publish_page`` folds them into the
    ``ts-load-v1`` header (with the record's modified-at and content hash)."""
    h = [
        (K.H_JOB_ID, str(job_id).encode()),
        (K.H_RUN_ID, str(run_id).encode()),
        (K.H_INSTANCE, instance_id.encode()),
        (K.H_EXTRACTED_AT, extracted_at.isoformat().replace("+00:00", "Z").encode()),
    ]
    if params:
        h.append((K.H_PARAMS, orjson.dumps(dict(params))))
    return h
