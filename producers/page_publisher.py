"""Publishing one run's pages: each record keyed, with its headers, through the process's producer.

One class for every place a page is published -- the extracting process and each worker process
of the process engine -- so keys, headers, ``--limit`` and the per-stream bookkeeping that
watermarks are made of cannot drift apart.

Per record (``Publisher.publish_page``): key ``<CC_INSTANCE_ID>:<primary key>`` (null when a key
part is missing: the loader dead-letters it), value the raw record, headers ``ts-job-id``,
``ts-run-id``, ``ts-instance-id``, ``ts-extracted-at``, ``ts-params`` (parameterized jobs) and
``ts-modified-at`` (the record's timestamp field). A record repeated within one page is published
once. Per stream: records published and the largest timestamp seen (the stream's next watermark).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import orjson

from common import kafka as K
from common.metrics import RECORDS_EXTRACTED
from producers import watermarks as wm_mod
from producers.keys import key_builder
from producers.pages import Page
from producers.paging import Stream
from producers.publisher import DeliveryTracker, Publisher, record_headers
from schemas.jobs import Job

#: ``ts-extracted-at`` is rebuilt at most this often (seconds): per-page work adds up on fan-out jobs
HEADER_TICK = 0.25


class PagePublisher:
    """Publishes pages of one run and counts them. Used by one thread (the engine's)."""

    def __init__(self, job: Job, *, run_id: int, instance_id: str, publisher: Publisher | None, tracker: DeliveryTracker,
                 topic: str, track_timestamps: bool, limit: int | None = None,
                 stop: threading.Event | None = None):
        self.job = job
        self.run_id = run_id
        self.instance_id = instance_id
        #: None until the run has its producer (the extractor builds this before connecting)
        self.publisher = publisher
        self.tracker = tracker
        self.topic = topic
        self.keyfn = key_builder(job.primary_key, instance_id)
        self.ts_field = job.timestamp_field or None
        self.track_timestamps = track_timestamps
        self.limit = limit
        #: set when ``limit`` is reached: the run stops issuing requests
        self.stop = stop or threading.Event()
        self.records = 0
        self.records_missing_key = 0
        self.records_repeated = 0
        self.pages = 0
        #: stream index -> records published / largest record timestamp
        self.stream_records: dict[int, int] = {}
        self.stream_max: dict[int, datetime] = {}
        self._metric = RECORDS_EXTRACTED.labels(job.target_table)
        self._base: list[tuple[str, bytes]] | None = None
        self._base_time = 0.0

    def publish(self, stream: Stream, page: Page) -> int:
        """Produce ``page``'s records (up to the run's limit); return how many were read."""
        recs = page.records
        self.pages += 1
        if self.limit is not None:
            room = self.limit - self.records
            if room <= 0:
                self.stop.set()
                return 0
            if len(recs) >= room:
                recs = recs[:room]
                self.stop.set()
        assert self.publisher is not None, "publish() before the run has a producer"
        n, missing, stamps, repeats = self.publisher.publish_page(
            self.topic, recs, self.keyfn, stream.params, self._headers(stream), self.tracker, self.ts_field)
        read = n + repeats
        self.records += read
        self.records_missing_key += missing
        self.records_repeated += repeats
        self.stream_records[stream.idx] = self.stream_records.get(stream.idx, 0) + n
        if stamps and self.track_timestamps:
            mt = wm_mod.max_timestamp(stamps)
            if mt is not None:
                cur = self.stream_max.get(stream.idx)
                if cur is None or mt > cur:
                    self.stream_max[stream.idx] = mt
        self._metric.inc(read)
        return read

    def _headers(self, stream: Stream) -> list[tuple[str, bytes]]:
        """The run-wide headers, rebuilt once per tick (``ts-extracted-at`` to 0.25 s), plus the
        stream's parameters."""
        now = time.monotonic()
        if self._base is None or now - self._base_time > HEADER_TICK:
            self._base_time = now
            self._base = record_headers(self.job.id, self.run_id, self.instance_id, datetime.now(UTC), None)
        if stream.params is None:
            return self._base
        return [*self._base, (K.H_PARAMS, orjson.dumps(stream.params))]
