"""Publishing one run's pages: each record keyed, with its headers, through the process's producer.

One class for every place a page is published -- the extracting process and each worker process
of the process engine -- so keys, headers, ``--limit`` and the per-stream bookkeeping that
watermarks are made of cannot drift apart.

Per record (``Publisher.publish_page``): key ``<CC_INSTANCE_ID>:<primary key>`` (null when a key
part is missing: the loader dead-letters it), value the raw record, headers ``ts-job-id``,
``ts-run-id``, ``ts-instance-id``, ``ts-extracted-at``, ``ts-params`` (parameterized jobs) and
``ts-modified-at`` (the record's timestamp field). A record repeated within one page is published
once. Per stream: records published and the largest timestamp seen (the stream's next watermark).

A job that reads its list across parents (``Job.reads_list``) takes each record's parent -- the
``ts-params`` header, stored as the row's ``source_params`` -- from the record itself, so its rows
are the rows the per-parent read would have written.

The evidence for the ``changed`` fan-out policy (:class:`ChangeWatch`): every record newer than its
parent's watermark is a change since the parent was last read; under a parent marked changed it
was *announced*, under one not marked changed it was not (the policy would have missed it but for
the sweep). A job that keeps no watermark (its endpoint takes no filter, or its records carry no
timestamp) has its records compared by content instead -- a record whose key is not in staging,
or whose content hash differs from the stored one, changed since the last read. Both are counted
per run (``announced_changes``, ``missed_changes``) for the planner's assumption state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import md5
from typing import Any

import numpy as np
import orjson

from common import kafka as K
from common.metrics import RECORDS_EXTRACTED
from producers import watermarks as wm_mod
from producers.keys import key_builder, path_getter
from producers.pages import Page
from producers.paging import Stream
from producers.publisher import DeliveryTracker, Publisher, record_headers
from schemas.jobs import Job

#: ``ts-extracted-at`` is rebuilt at most this often (seconds): per-page work adds up on fan-out jobs
HEADER_TICK = 0.25


def fingerprint(text: str) -> int:
    """The first 64 bits of MD5 of ``text`` as a signed big-endian integer -- what PostgreSQL's
    ``('x' || left(md5(text), 16))::bit(64)::bigint`` computes (``producers.planner.staging_content``)."""
    return int.from_bytes(md5(text.encode(), usedforsecurity=False).digest()[:8], "big", signed=True)


def pair_fingerprint(key: str, digest: bytes) -> int:
    """The fingerprint of a record's key and content hash: ``md5(source_id || ':' || hex)`` in SQL."""
    return fingerprint(f"{key}:{digest.hex()}")


@dataclass
class StagingContent:
    """What staging holds of a job's records, compactly (8 bytes a row: 2.3 M patient visits take
    18 MB, not the ~400 MB of a dict): sorted fingerprints of ``source_id:content_hash`` for rows
    this job wrote last with a hash, and of ``source_id`` for rows that cannot be compared (written
    by another job on the same table, or loaded before content hashes were kept)."""

    pairs: np.ndarray
    others: np.ndarray

    def changed(self, keys: list[str], hashes: list[bytes]) -> int:
        """How many of these records staging does not hold with this content (new or changed)."""
        if not keys:
            return 0
        pair = np.fromiter((pair_fingerprint(k, h) for k, h in zip(keys, hashes, strict=True)),
                           dtype=np.int64, count=len(keys))
        other = np.fromiter((fingerprint(k) for k in keys), dtype=np.int64, count=len(keys))
        same = _member(self.pairs, pair) | _member(self.others, other)
        return int(len(keys) - same.sum())


def _member(sorted_values: np.ndarray, probe: np.ndarray) -> np.ndarray:
    if not len(sorted_values):
        return np.zeros(len(probe), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, probe), len(sorted_values) - 1)
    return np.asarray(sorted_values[at] == probe)


@dataclass
class ChangeWatch:
    """What an incremental fan-out run judges its records against: streams ``[0, marked)`` are
    parents marked changed; each parent's previous watermark (parent key -> timestamp); for a job
    that keeps no watermarks, what staging holds of its records (None: not loaded)."""

    marked: int
    watermarks: dict[str, datetime] = field(default_factory=dict)
    content: StagingContent | None = None

    @property
    def can_judge(self) -> bool:
        """Whether a change could be seen at all (a run that cannot see one proves nothing quiet)."""
        return bool(self.watermarks) or self.content is not None


@dataclass
class ChangeTally:
    """What a run saw of its changes: announced (under parents marked changed) and not."""

    announced: int = 0
    missed: int = 0
    missed_parents: list[dict[str, str]] = field(default_factory=list)

    def add(self, other: ChangeTally) -> None:
        self.announced += other.announced
        self.missed += other.missed
        self.missed_parents.extend(other.missed_parents[:max(0, 10 - len(self.missed_parents))])


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
        #: the policy's evidence: what records are judged against (None: not judged), and the tally
        self.watch: ChangeWatch | None = None
        self.changes = ChangeTally()
        #: resumable runs (a plain OData stream ordered by its key): how far every page is acknowledged
        self.resume: ResumePoint | None = None
        #: list sources: each record's parent comes from the record
        self._parent_of = _parent_getter(job) if job.reads_list else None
        self.records_missing_parent = 0
        #: records without the job's timestamp field (all of them: no watermark, every run reads all)
        self.records_without_timestamp = 0
        self._metric = RECORDS_EXTRACTED.labels(job.target_table)
        self._base: list[tuple[str, bytes]] | None = None
        self._base_time = 0.0

    def publish(self, stream: Stream, page: Page, url: str = "") -> int:
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
        ack: DeliveryTracker | _PageAck = self.tracker
        if self.resume is not None:
            ack = self.resume.page(self.tracker, url, recs)
        # a run judged by content: the publisher hands out the hashes it computes anyway
        digests: list[tuple[str, bytes]] | None = [] if self.watch is not None and self.watch.content else None
        if self._parent_of is not None:
            n, missing, stamps, repeats = self._publish_by_parent(recs, ack)
        else:
            n, missing, stamps, repeats = self.publisher.publish_page(
                self.topic, recs, self.keyfn, stream.params, self._headers(stream.params), ack, self.ts_field,
                digests)
        if self.track_timestamps:
            self.records_without_timestamp += n - len(stamps)
        if isinstance(ack, _PageAck):
            ack.published(n, wm_mod.max_timestamp(stamps) if stamps else None)
        if self.watch is not None:
            self._judge(self.watch, stream, stamps, digests)
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

    def _publish_by_parent(self, recs: list[Any], ack: Any) -> tuple[int, int, list[Any], int]:
        """A page of a list across parents: published in groups of one parent each."""
        assert self._parent_of is not None and self.publisher is not None
        groups: dict[tuple[tuple[str, str], ...], list[Any]] = {}
        for rec in recs:
            params = self._parent_of(rec)
            if len(params) < len(self.job.parameters):
                self.records_missing_parent += 1
            groups.setdefault(tuple(params.items()), []).append(rec)
        n = missing = repeats = 0
        stamps: list[Any] = []
        for items, group in groups.items():
            params = dict(items)
            g = self.publisher.publish_page(self.topic, group, self.keyfn, params, self._headers(params or None),
                                            ack, self.ts_field)
            n, missing, repeats = n + g[0], missing + g[1], repeats + g[3]
            stamps.extend(g[2])
        return n, missing, stamps, repeats

    def _judge(self, watch: ChangeWatch, stream: Stream, stamps: list[Any],
               digests: list[tuple[str, bytes]] | None) -> None:
        """Records changed since the parent was last read -- newer than its watermark, or (no
        watermark kept) not in staging with this content -- under a parent marked changed
        (announced) or not (missed but for this read)."""
        wm = watch.watermarks.get(stream.parent_key)
        if wm is not None:
            newer = sum(1 for ts in stamps if (t := wm_mod.parse_timestamp(ts)) is not None and t > wm)
        elif watch.content is not None and digests is not None:
            newer = watch.content.changed([k for k, _ in digests], [h for _, h in digests])
        else:
            return  # never read before: nothing to compare with
        tally = self.changes
        if stream.idx < watch.marked:
            tally.announced += newer
        elif newer:
            tally.missed += newer
            if len(tally.missed_parents) < 10 and stream.params:
                tally.missed_parents.append(dict(stream.params))

    def _headers(self, params: dict[str, str] | None) -> list[tuple[str, bytes]]:
        """The run-wide headers, rebuilt once per tick (``ts-extracted-at`` to 0.25 s), plus the
        parent's parameters."""
        now = time.monotonic()
        if self._base is None or now - self._base_time > HEADER_TICK:
            self._base_time = now
            self._base = record_headers(self.job.id, self.run_id, self.instance_id, datetime.now(UTC), None)
        if params is None:
            return self._base
        return [*self._base, (K.H_PARAMS, orjson.dumps(params))]


def _parent_getter(job: Job) -> Callable[[Any], dict[str, str]]:
    """Record -> its parent's parameters (as text, like parameters read from Bronze), for a list
    source; a parameter whose path is missing in the record is left out."""
    assert job.list_source is not None
    getters = [(name, path_getter(path)) for name, path in job.list_source.parameters.items()
               if name in job.parameters]

    def parent_of(rec: Any) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, get in getters:
            v = get(rec, None)
            if v is not None:
                out[name] = v
        return out

    return parent_of


class ResumePoint:
    """How far a paged stream is safely delivered: the key of the last record of the longest run of
    pages, from the first, whose every record the broker acknowledged.

    For a plain OData stream ordered by its key (``$orderby=id``) that is a place to continue from:
    a retry of the run asks ``<filter> and id gt <after>`` instead of starting at page 1 (what it
    skips is in the topic already). Pages are chained by ``$skip`` (the next page starts where the
    previous one's records end); a page fetched by a server link has no ``$skip`` and stops the
    chain (the run then resumes from the last chained page). ``max_ts`` (the largest timestamp in
    the chain) caps the watermark a resumed run may commit: a record changed after this run read
    it must still be newer than the watermark.
    """

    def __init__(self, key: str, page_size: int, after: Any = None):
        self.key = key
        self.page_size = page_size
        self.after = after
        self.records = 0
        self.max_ts: datetime | None = None
        self._get = path_getter(key)
        self._raw_key = key
        self._next_skip = 0
        self._done: dict[int, _PageAck] = {}

    def page(self, tracker: DeliveryTracker, url: str, records: list[Any]) -> _PageAck:
        skip = _skip_of(url)
        last = None
        for rec in reversed(records):
            if type(rec) is dict and rec.get(self._raw_key) is not None:
                last = rec[self._raw_key]
                break
        return _PageAck(self, tracker, skip, min(len(records), self.page_size), last)

    def _acked(self, ack: _PageAck) -> None:
        if ack.skip is None or ack.failed:
            return
        self._done[ack.skip] = ack
        while self._next_skip in self._done:
            a = self._done.pop(self._next_skip)
            if a.last_key is not None:
                self.after = a.last_key
            self.records += a.expected or 0
            if a.max_ts is not None and (self.max_ts is None or a.max_ts > self.max_ts):
                self.max_ts = a.max_ts
            if a.advance == 0:
                break
            self._next_skip += a.advance

    def snapshot(self) -> dict[str, Any] | None:
        if self.after is None:
            return None
        return {"key": self.key, "after": self.after, "records": self.records,
                "max_ts": self.max_ts.isoformat() if self.max_ts else None}


class _PageAck:
    """The delivery callback of one page's records: forwards to the run's tracker and tells the
    resume point when the whole page is acknowledged."""

    __slots__ = ("point", "run", "skip", "advance", "last_key", "expected", "delivered", "failed", "max_ts")

    def __init__(self, point: ResumePoint, run: DeliveryTracker, skip: int | None, advance: int, last_key: Any):
        self.point, self.run, self.skip, self.advance, self.last_key = point, run, skip, advance, last_key
        self.expected: int | None = None
        self.delivered = 0
        self.failed = False
        self.max_ts: datetime | None = None

    def __call__(self, err: Any, msg: Any) -> None:
        self.run(err, msg)
        if err is not None:
            self.failed = True
        self.delivered += 1
        if self.delivered == self.expected:
            self.point._acked(self)

    @property
    def produced(self) -> int:  # publish_page counts what it produced on the run's tracker
        return self.run.produced

    @produced.setter
    def produced(self, value: int) -> None:
        self.run.produced = value

    def published(self, n: int, max_ts: datetime | None) -> None:
        self.expected, self.max_ts = n, max_ts
        if self.delivered == n:
            self.point._acked(self)


def _skip_of(url: str) -> int | None:
    i = url.find("$skip=")
    if i < 0:
        return None
    j = i + 6
    k = j
    while k < len(url) and url[k].isdigit():
        k += 1
    return int(url[j:k]) if k > j else None
