"""The ts-load-v1 header: what the publisher puts in it, how readers expand it, and how the loader's
payload builder chooses between the CSV fast path and the checked text path (no broker, no
database: the integration tests load these payloads for real)."""

from __future__ import annotations

from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

import numpy as np
import orjson
import pytest

from common import kafka as K
from consumers import staging_writer as sw
from producers.publisher import DeliveryTracker, Publisher, load_header_shape, record_headers

EXTRACTED = datetime(2025, 12, 1, 20, 30, 52, 123456, tzinfo=UTC)


class FakeProducer:
    """Records produce() calls (a unit-test stand-in for confluent_kafka.Producer)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Any, list[tuple[str, bytes]]]] = []

    def produce(self, topic: str, value: bytes, key: Any, headers: list[tuple[str, bytes]], on_delivery: Any) -> None:
        self.sent.append((topic, value, key, headers))

    def poll(self, _timeout: float) -> int:
        return 0


def publish(records: list[dict[str, Any]], base: list[tuple[str, bytes]], ts_field: str | None = "modifiedDate"):
    fake = FakeProducer()
    pub = Publisher(settings=None, producer=fake)  # type: ignore[arg-type]
    pub.publish_page("t", records, lambda r, _p: f"cc1:{r['id']}", None, base, DeliveryTracker("t"), ts_field)
    return fake.sent


def test_publisher_sends_one_load_header_with_the_content_hash() -> None:
    base = record_headers(9, 4242, "cc1", EXTRACTED, {"studyId": 12})
    sent = publish([{"id": 1, "modifiedDate": "2025-12-01T20:30:52Z", "n": "a\\b"}, {"id": 2}], base)
    (_, v1, k1, h1), (_, v2, _, h2) = sent
    assert k1 == "cc1:1" and orjson.loads(v1)["n"] == "a\\b"
    assert [n for n, _ in h1] == [K.H_LOAD]
    fields = K.load_header_fields(h1[0][1])
    assert fields == {K.H_RUN_ID: b"4242", K.H_JOB_ID: b"9", K.H_INSTANCE: b"cc1",
                      K.H_EXTRACTED_AT: b"2025-12-01T20:30:52.123456Z", K.H_MODIFIED_AT: b"2025-12-01T20:30:52Z",
                      K.H_PARAMS: b'{"studyId":12}', K.H_CONTENT_HASH: sha256(v1).hexdigest()[:32].encode()}
    # no timestamp field in the record: the field is empty, the rest is there
    assert K.H_MODIFIED_AT not in K.load_header_fields(h2[0][1])  # type: ignore[operator]
    assert sw.content_hash(v2) == K.load_header_fields(h2[0][1])[K.H_CONTENT_HASH]  # type: ignore[index]


def test_values_that_cannot_ride_in_the_load_header_keep_the_named_headers() -> None:
    base = record_headers(9, 1, "cc1", EXTRACTED, None)
    sent = publish([{"id": 1, "modifiedDate": "2025-12-01\t20:30"}], base)
    assert dict(sent[0][3]) == {**dict(base), K.H_MODIFIED_AT: b"2025-12-01\t20:30"}
    odd_instance = record_headers(9, 1, "cc\n1", EXTRACTED, None)
    assert load_header_shape(odd_instance) is None
    no_time = [(n, v) for n, v in base if n != K.H_EXTRACTED_AT]
    assert load_header_shape(no_time) is None  # the loader's direct path needs it
    # headers the loader does not know ride along after ts-load-v1
    extra = [*base, ("x-trace", b"abc")]
    sent = publish([{"id": 3}], extra)
    assert [n for n, _ in sent[0][3]] == [K.H_LOAD, "x-trace"]


def test_readers_expand_the_load_header() -> None:
    base = record_headers(9, 77, "cc1", EXTRACTED, None)
    (_, value, _, headers) = publish([{"id": 5, "modifiedDate": "2025-12-02T00:00:00Z"}], base)[0]
    named = dict(K.named_headers(headers))
    assert named[K.H_RUN_ID] == b"77" and named[K.H_MODIFIED_AT] == b"2025-12-02T00:00:00Z"
    assert K.H_PARAMS not in named and K.header_value(headers, K.H_JOB_ID) == b"9"
    # a record's own named header wins over the same field in ts-load-v1; malformed = ignored
    assert K.header_value([(K.H_RUN_ID, b"1"), *headers], K.H_RUN_ID) == b"1"
    assert K.named_headers([(K.H_LOAD, b"too\tfew")]) == []
    assert sw.Reject("t", 0, 1, b"k", value, headers, "X", "m").header(K.H_RUN_ID) == b"77"


class Msg:
    """The accessors of a confluent-kafka Message that prepare() uses."""

    def __init__(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None,
                 offset: int, partition: int = 0):
        self._k, self._v, self._h, self._o, self._p = key, value, headers, offset, partition

    def key(self) -> bytes | None: return self._k
    def value(self) -> bytes | None: return self._v
    def headers(self) -> list[tuple[str, bytes]] | None: return self._h
    def partition(self) -> int: return self._p
    def offset(self) -> int: return self._o
    def timestamp(self) -> tuple[int, int]: return (1, 1_700_000_000_000 + self._o)
    def topic(self) -> str: return "p.bronze.t"


def v1(i: int, value: bytes | None, run: bytes = b"4242") -> Msg:
    base = record_headers(9, int(run), "cc1", EXTRACTED, None)
    pre, post, _ = load_header_shape(base)  # type: ignore[misc]
    digest = sw.content_hash(value) if value is not None else b""
    return Msg(f"cc1:{i}".encode(), value, [(K.H_LOAD, pre + b"2025-12-01T20:30:52Z" + post + digest)], i, i % 2)


def rows(pb: sw.PreparedBatch) -> list[list[bytes]]:
    return [line.split(b"\t") for line in b"".join(pb.payload).split(b"\n")[:-1]]


def test_v1_batch_is_an_unchecked_payload_of_the_values_as_published() -> None:
    vals = [orjson.dumps({"i": i, "path": "C:\\temp", "q": 'say "hi"'}) for i in range(2500)]
    pb = sw.prepare([v1(i, v) for i, v in enumerate(vals)])
    assert pb.unchecked and pb.all_extracted and not pb.has_tombstones and not pb.has_duplicates
    assert len(pb.payload) == 3  # slices of PREPARE_SLICE records
    got = rows(pb)
    assert len(got) == 2500 and all(len(r) == 13 for r in got)
    # the value as published, backslashes doubled (COPY text); nothing else touched
    assert got[7][0] == b"cc1:7" and got[7][1] == b"f" and got[7][2] == vals[7].replace(b"\\", b"\\\\")
    assert got[7][3:5] == [b"4242", b"9"] and got[7][9] == sw.content_hash(vals[7])
    assert got[7][10:] == [b"1", b"7", b"1700000000007"]
    assert pb.single_run() == b"4242" and pb.run_ids[:2] == [b"4242", b"4242"]


def test_tombstones_and_mixed_runs() -> None:
    msgs = [v1(0, b'{"a":1}'), v1(1, None), v1(2, b'{"a":2}', run=b"5")]
    pb = sw.prepare(msgs)
    assert pb.unchecked and pb.has_tombstones
    assert [r[1] for r in rows(pb)] == [b"f", b"t", b"f"] and rows(pb)[1][2] == b""
    assert pb.single_run() is None and pb.run_ids == [b"4242", b"4242", b"5"]


@pytest.mark.parametrize("odd", ["named headers", "tab in key", "empty value", "malformed header"])
def test_anything_the_unchecked_path_cannot_carry_takes_the_checked_path(odd: str) -> None:
    msgs = [v1(i, orjson.dumps({"i": i})) for i in range(10)]
    if odd == "named headers":  # published by an earlier version
        msgs[3] = Msg(b"cc1:3", b'{"i": 3}', [(K.H_RUN_ID, b"4242"), (K.H_EXTRACTED_AT, b"2025-12-01T00:00:00Z")], 3)
    elif odd == "tab in key":
        msgs[3] = Msg(b"cc1:\t3", b'{"i": 3}', msgs[3].headers(), 3)
    elif odd == "empty value":
        msgs[3] = Msg(b"cc1:3", b"", msgs[3].headers(), 3)
    else:
        msgs[3] = Msg(b"cc1:3", b'{"i": 3}', [(K.H_LOAD, b"4242\t9")], 3)
    pb = sw.prepare(msgs)
    assert not pb.unchecked and len(pb.msgs) == 10
    text = b"".join(pb.payload)
    assert text.count(b"\n") == 10
    if odd == "named headers":  # the loader computes the hash a newer publisher would have sent
        assert sw.content_hash(b'{"i": 3}') in text and pb.all_extracted
    if odd == "tab in key":
        assert b"cc1:\\t3" in text
    if odd == "malformed header":
        assert not pb.all_extracted  # loads with its header values blank (the message timestamp)


def test_keyless_records_are_rejected_and_the_rest_prepared() -> None:
    msgs = [v1(0, b'{"a":0}'), Msg(None, b'{"a":1}', None, 1), Msg(b"", b"{}", None, 2), v1(3, b'{"a":3}')]
    pb = sw.prepare(msgs)
    assert [r.offset for r in pb.rejects] == [1, 2] and {r.error_class for r in pb.rejects} == {sw.NO_ID}
    assert pb.keys == [b"cc1:0", b"cc1:3"] and pb.offsets == [0, 3]


def test_known_keys_answer_membership_across_merges() -> None:
    known = sw._KnownKeys()
    batches = [[f"k{i}".encode() for i in range(start, start + 700)] for start in range(0, 7000, 700)]
    for b in batches:
        known.add(sw._KnownKeys.hashes(b))
    assert known.count == 7000 and len(known.levels) <= 4  # merged like a binary counter
    assert all(np.all(np.diff(level) > 0) for level in known.levels)
    assert known.any_of(sw._KnownKeys.hashes([b"nope", b"k6999"]))
    assert not known.any_of(sw._KnownKeys.hashes([b"nope", b"k7000", b"k-1"]))
    assert len(sw._KnownKeys.hashes([b"a", b"b", b"a"])) == 2
