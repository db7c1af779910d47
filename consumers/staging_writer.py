"""Write one micro-batch of bronze-topic messages into one staging table: COPY + one upsert.

Why it looks like this (the hot path of the whole pipeline):

* **Per-record Python work is the enemy.** :func:`prepare` touches each message once (key, value,
  headers, offset) and builds the COPY text payload for the whole batch with a handful of
  C-level ``bytes`` operations (join, count, replace, decode) instead of escaping field by field:
  fields are joined with tabs and rows with newlines; counting both proves no field contained
  one, so the only escaping COPY text format still needs is doubling backslashes (JSON escapes).
  A batch where some field holds a tab, newline, CR, NUL or invalid UTF-8 takes the per-field
  path, which also rejects what PostgreSQL text cannot store (NUL, invalid UTF-8).
* **A first load is COPYed straight in.** While a table holds none of the batch's keys (it was
  empty when this connection first wrote to it), a batch without tombstones or repeated keys is
  COPYed directly into it (multi-row inserts, no temporary table); the first existing key ends
  that for the table (``StagingWriter._write_direct``).
* **One upsert statement per batch.** Rows are COPYed as text into a reusable temporary table
  (``ON COMMIT DELETE ROWS``) and merged with a single ``INSERT ... SELECT ... ON CONFLICT
  (source_id) DO UPDATE ... WHERE`` (plus one ``UPDATE`` for tombstones, in the same statement).
  Unchanged rows are not rewritten (``data IS DISTINCT FROM``); header values are parsed in SQL.
* **The stale-write fence.** A row is overwritten only when the incoming message's
  ``(extracted_at, kafka_offset)`` is not older than the row's. A consumer that lost its
  partitions (session timeout during a long database stall, rebalance) and commits an old batch
  late therefore cannot undo what the new owner wrote. Offsets alone are not a safe fence: the
  embedded broker loses its topics on restart and offsets begin again at 0, so the extraction
  time comes first and the offset only breaks ties.
* **Last message per key wins** inside a batch, with "last" defined like the fence (latest
  ``extracted_at``, then offset) so the outcome does not depend on where batches are cut.
* **Tombstones** (null value) soft-delete: ``is_deleted = true, deleted_at = now()``, the last
  data is kept; a later non-null record un-deletes. A tombstone for a key the table never had
  is a no-op (nothing to delete).
* **A row the database refuses never poisons the batch**: on a data error the batch is rolled
  back to a savepoint, rows with known defects (invalid JSON/jsonb such as ``\\u0000``, keys
  longer than the column) are found with one diagnostic query, and anything still failing is
  isolated by bisection; refused rows come back as :class:`Reject` for the dead-letter queue.

The caller owns the transaction (see ``consumers.loader``): this module never commits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from itertools import repeat
from operator import itemgetter, methodcaller
from typing import TYPE_CHECKING, Any, cast

import psycopg
from confluent_kafka import Message
from psycopg import sql

from common.kafka import (
    H_EXTRACTED_AT,
    H_INSTANCE,
    H_JOB_ID,
    H_LOAD,
    H_MODIFIED_AT,
    H_PARAMS,
    H_RUN_ID,
    LOAD_FIELDS,
    header_value,
)

if TYPE_CHECKING:
    import numpy as np

TMP_TABLE = "_ts_load_batch"
SOURCE_ID_MAX = 255  # bronze.*.source_id is varchar(255)
_SEP = b"\t"
#: COPY row: key, tombstone flag, value, the seven ts-load-v1 fields, partition, offset, timestamp
_NFIELDS = 13
_META_N = len(LOAD_FIELDS)
_EMPTY: dict[str, bytes] = {}
#: the six named headers the COPY row carries (records without ts-load-v1), in column order
_HEADERS = itemgetter(H_RUN_ID, H_JOB_ID, H_INSTANCE, H_EXTRACTED_AT, H_MODIFIED_AT, H_PARAMS)
_NO_HEADERS = (b"",) * 6
#: one COPY row from (key, value, meta, partition, offset, timestamp) -- formatted in C, no per-field
#: Python work; the flag field is "f" (not a tombstone) or "t" in the second format
_ROW = b"%b\tf\t%b\t%b\t%d\t%d\t%d\n"
_ROW_T = b"%b\t%b\t%b\t%b\t%d\t%d\t%d\n"
_KEY = methodcaller("key")
_VALUE = methodcaller("value")
_HDRS = methodcaller("headers")
_PARTITION = methodcaller("partition")
_OFFSET = methodcaller("offset")
_TS = methodcaller("timestamp")
_FIRST = itemgetter(0)
_SECOND = itemgetter(1)
_RUN_OF_META = methodcaller("partition", b"\t")
#: bytes a key (or, but for tabs, a ts-load-v1 value) must not hold on the unchecked path: our
#: separators, the end-of-line COPY text also accepts (CR), and what PostgreSQL text refuses (NUL)
_KEY_UNSAFE = (b"\t", b"\r", b"\x00")
_META_UNSAFE = (b"\r", b"\x00")


def _unsafe(buf: bytes, needles: tuple[bytes, ...]) -> bool:
    return any(x in buf for x in needles)  # memchr per byte value: ~20x a regex character class
#: the direct path keeps a table's keys (their 64-bit hashes) in memory; past this many it stops
DIRECT_MAX_KEYS = 10_000_000
#: records per slice of prepare's C-level work (see prepare)
PREPARE_SLICE = 1000

#: SQLSTATE classes that mean "this data is refused" (isolate the row) rather than "the database
#: is unavailable or misconfigured" (retry the whole batch later): data exception, integrity
#: constraint violation, program limit exceeded (e.g. index row too large).
ROW_LEVEL_CLASSES = ("22", "23", "54")


@dataclass(frozen=True)
class Reject:
    """A message that cannot be loaded, with the reason (goes to the DLQ and etl.dw_etl_rejects)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    error_class: str
    message: str

    @classmethod
    def of(cls, m: Any, error_class: str, message: str) -> Reject:
        return cls(m.topic(), m.partition(), m.offset(), m.key(), m.value(), list(m.headers() or ()),
                   error_class, message)

    def header(self, name: str) -> bytes | None:
        """A named header's value (also read from the ts-load-v1 header)."""
        return header_value(self.headers, name)


@dataclass
class PreparedBatch:
    """One table's share of a micro-batch, ready to COPY.

    ``msgs[i]`` is the message of COPY row ``i``; ``rejects`` are messages refused before the
    database saw them (no id, bytes PostgreSQL text cannot hold). ``keys``, ``partitions`` and
    ``offsets`` are per row; ``metas`` the ts-load-v1 field block of each row (run id first).
    """

    msgs: list[Any]
    #: the COPY data, in chunks (see prepare)
    payload: list[bytes]
    rejects: list[Reject]
    has_duplicates: bool
    keys: list[bytes] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    metas: list[bytes] = field(default_factory=list)
    #: False only when the batch surely holds no tombstone (the soft-delete statement is skipped)
    has_tombstones: bool = True
    #: every row carries an extraction time (the direct-COPY path needs no SQL fallback for it)
    all_extracted: bool = False
    #: the values went in unchecked (prepare's fast path): if the database refuses the payload,
    #: the batch is prepared again by prepare_text, which checks every byte
    unchecked: bool = False
    _run_ids: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.msgs)

    def single_run(self) -> bytes | None:
        """The run id every row shares (empty when none has one), or None when rows differ --
        one C-level pass instead of a run id per row."""
        if not self.metas:
            return None
        m0 = self.metas[0]
        run0 = m0[:m0.find(b"\t") + 1]
        if sum(map(bytes.startswith, self.metas, repeat(run0))) == len(self.metas):
            return run0[:-1]
        return None

    @property
    def run_ids(self) -> list[bytes]:
        """The run id of each row (empty when absent) -- the first field of its meta block."""
        if self._run_ids is None:
            self._run_ids = list(map(_FIRST, map(_RUN_OF_META, self.metas)))
        return self._run_ids


@dataclass
class WriteResult:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    rejects: list[Reject] = field(default_factory=list)
    #: number of COPY rows accepted (written, unchanged or superseded within the batch)
    accepted: int = 0
    isolated: bool = False  # the slow path ran
    direct: bool = False  # COPYed straight into the table (new keys only, see StagingWriter._write_direct)

    @property
    def unchanged(self) -> int:
        return max(0, self.accepted - self.inserted - self.updated - self.deleted)


NO_ID = "NoRecordId"
BAD_TEXT = "InvalidText"
UNKNOWN_TABLE = "UnknownTable"


def _no_id_message(m: Any) -> str:
    return (f"record has no id (null or empty message key) at {m.topic()}[{m.partition()}]@{m.offset()}: "
            "the extractor could not find the job's primary key in the record; set primary_key for the "
            "job in config/jobs.yaml and re-run it")


def content_hash(value: bytes) -> bytes:
    """The ts-load-v1 content hash of a value: first 128 bits of SHA-256, hex (as the publisher sends it)."""
    return sha256(value).hexdigest()[:32].encode()


def _legacy_meta(h: list[tuple[str, bytes | None]] | None, v: bytes | None) -> tuple[bytes, bool]:
    """The meta block of a record published without ts-load-v1 (older versions): from its named
    headers, with the content hash computed here; and whether it has an extraction time."""
    if h:
        try:
            run, job, inst, ext, mod, params = _HEADERS(defaultdict(bytes, h))
        except TypeError:  # a header whose value is null: treat as absent
            run, job, inst, ext, mod, params = _HEADERS(defaultdict(bytes, ((n, x) for n, x in h if x is not None)))
    else:
        run, job, inst, ext, mod, params = _NO_HEADERS
    return _SEP.join((run, job, inst, ext, mod, params, content_hash(v) if v is not None else b"")), bool(ext)


def _accessors(msgs: Sequence[Any]) -> tuple[Any, ...]:
    """key, value, headers, partition, offset, timestamp getters: the C method descriptors for real
    confluent-kafka messages (5x cheaper than ``methodcaller``), duck-typed for anything else."""
    if type(msgs[0]) is Message:
        return Message.key, Message.value, Message.headers, Message.partition, Message.offset, Message.timestamp
    return _KEY, _VALUE, _HDRS, _PARTITION, _OFFSET, _TS


def prepare(msgs: Sequence[Any]) -> PreparedBatch:
    """Build the COPY payload for ``msgs`` (all of one table, consume order).

    The common case -- every record carries the ts-load-v1 header (published by this version) --
    is vectorized: the message accessors are mapped over the batch in C, each row is one ``bytes
    %`` format with the header value put in as it is, and the only escaping COPY text needs --
    doubling backslashes (JSON escapes) -- is one ``replace`` per slice. What that path trusts
    without looking -- that values hold no raw tab, newline, CR or NUL and are UTF-8, as
    ``orjson`` guarantees -- the database checks; a batch it refuses is prepared again by
    :func:`prepare_text` (``StagingWriter.write``), which checks every byte. Keys and header values,
    which come from elsewhere, are checked here. Records without the header (older publishers),
    empty values and keyless records take the checked path. (COPY CSV with a quote byte that
    never occurs would skip even the backslash pass, but costs PostgreSQL ~1 us more per row,
    and PostgreSQL is what a first load waits for: bench/RESULTS.md.)

    The work goes in slices of ``PREPARE_SLICE`` records: each step is one C call that holds the
    GIL, and the writer thread needs the GIL between the database's replies (COPY chunks, the
    next statement); whole-batch calls of 10-20 ms each left the database waiting.
    """
    if not msgs:
        return PreparedBatch([], [], [], False)
    acc = _accessors(msgs)
    chunks: list[bytes] = []
    keys: list[bytes] = []
    parts: list[int] = []
    offs: list[int] = []
    metas: list[bytes] = []
    tombs = False
    for i in range(0, len(msgs), PREPARE_SLICE):
        got = _fast_slice(msgs[i:i + PREPARE_SLICE], acc)
        if got is None:
            return prepare_text(msgs)
        chunks.append(got[0])
        keys += got[1]
        parts += got[2]
        offs += got[3]
        metas += got[4]
        tombs = tombs or got[5]
    return PreparedBatch(list(msgs), chunks, [], len(set(keys)) != len(keys), keys, parts, offs, metas,
                         tombs, True, unchecked=True)


def _fast_slice(msgs: Sequence[Any], acc: tuple[Any, ...]) -> tuple[bytes, list[bytes], list[int], list[int],
                                                                   list[bytes], bool] | None:
    """One slice of the unchecked payload, or None when the slice needs the checked path."""
    key_of, value_of, headers_of, part_of, off_of, ts_of = acc
    keys = list(map(key_of, msgs))
    if None in keys or b"" in keys:
        return None
    n = len(keys)
    vals = list(map(value_of, msgs))
    maybe = [h[0][1] if h and h[0][0] == H_LOAD else None for h in map(headers_of, msgs)]
    if None in maybe or b"" in vals:
        return None
    metas = cast(list[bytes], maybe)  # no None, checked just above
    kj = b"\n".join(keys)
    mj = b"\n".join(metas)
    if kj.count(b"\n") != n - 1 or mj.count(b"\n") != n - 1 or _unsafe(kj, _KEY_UNSAFE) or _unsafe(mj, _META_UNSAFE) \
            or list(map(bytes.count, metas, repeat(b"\t"))).count(_META_N - 1) != n:
        return None
    parts = list(map(part_of, msgs))
    offs = list(map(off_of, msgs))
    tss = list(map(_SECOND, map(ts_of, msgs)))
    tombs = None in vals
    chunk = _rows(keys, vals, metas, parts, offs, tss, tombs)
    if b"\\" in chunk:
        chunk = chunk.replace(b"\\", b"\\\\")
    return chunk, keys, parts, offs, metas, tombs


def prepare_text(msgs: Sequence[Any]) -> PreparedBatch:
    """The COPY text-format payload (checked and escaped here): records published without the
    ts-load-v1 header, empty values, and batches the database refused unchecked."""
    if not msgs:
        return PreparedBatch([], [], [], False)
    key_of, value_of, headers_of, part_of, off_of, ts_of = _accessors(msgs)
    keys = list(map(key_of, msgs))
    if None in keys or b"" in keys:
        return _without_keyless(msgs, keys, prepare_text)
    n = len(keys)
    vals = list(map(value_of, msgs))
    hdrs = list(map(headers_of, msgs))
    maybe = [h[0][1] if h and h[0][0] == H_LOAD else None for h in hdrs]
    all_extracted = True
    if None in maybe:
        for i, meta in enumerate(maybe):
            if meta is None:
                maybe[i], has_ext = _legacy_meta(hdrs[i], vals[i])
                all_extracted = all_extracted and has_ext
    metas = cast(list[bytes], maybe)  # every None replaced just above
    # each meta block must be exactly seven fields (then any other tab is in a key or value, which
    # the count over the whole payload below catches); a malformed one takes the per-row path
    if list(map(bytes.count, metas, repeat(b"\t"))).count(_META_N - 1) != n:
        return _prepare_slow(list(msgs), [])
    parts = list(map(part_of, msgs))
    offs = list(map(off_of, msgs))
    tss = list(map(_SECOND, map(ts_of, msgs)))
    tombs = None in vals
    body = _rows(keys, vals, metas, parts, offs, tss, tombs)
    # Every tab and newline must be ours, and no byte may be one PostgreSQL text refuses; then the
    # only escaping COPY needs is doubling backslashes (JSON escapes), one pass over the buffer.
    ok = body.count(b"\t") == n * (_NFIELDS - 1) and body.count(b"\n") == n \
        and b"\r" not in body and b"\x00" not in body
    if ok and not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            ok = False
    if not ok:
        return _prepare_slow(list(msgs), [])
    if b"\\" in body:
        body = body.replace(b"\\", b"\\\\")
    return PreparedBatch(list(msgs), [body], [], len(set(keys)) != n, keys, parts, offs, metas, tombs, all_extracted)


def _rows(keys: list[bytes], vals: list[bytes | None], metas: list[bytes], parts: list[int], offs: list[int],
          tss: list[int], tombs: bool) -> bytes:
    """The payload: one ``bytes %`` per row (newline included), one join -- two copies of the data."""
    if not tombs:
        return b"".join(map(_ROW.__mod__, zip(keys, vals, metas, parts, offs, tss, strict=True)))
    flags = [b"t" if v is None else b"f" for v in vals]
    return b"".join(map(_ROW_T.__mod__, zip(keys, flags, [v or b"" for v in vals], metas, parts, offs, tss,
                                            strict=True)))


def _without_keyless(msgs: Sequence[Any], keys: list[bytes | None], then: Any = None) -> PreparedBatch:
    """Dead-letter the records without a key, prepare the others."""
    rejects = [Reject.of(m, NO_ID, _no_id_message(m)) for m, k in zip(msgs, keys, strict=True) if not k]
    rest = [m for m, k in zip(msgs, keys, strict=True) if k]
    pb = (then or prepare)(rest)
    pb.rejects = rejects + pb.rejects
    return pb


def _escape_field(f: bytes) -> bytes:
    return f.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def _prepare_slow(acc: list[Any], rejects: list[Reject]) -> PreparedBatch:
    """Per-row path for batches holding bytes PostgreSQL text cannot take (or our separators)."""
    out: list[bytes] = []
    msgs: list[Any] = []
    okeys: list[bytes] = []
    metas: list[bytes] = []
    all_extracted = True
    tombs = False
    for m in acc:
        fields = _fields_of(m)
        problem = None
        for name, f in fields:
            if b"\x00" in f:
                problem = f"{name} contains NUL bytes, which PostgreSQL text cannot store"
                break
            try:
                f.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"{name} is not valid UTF-8 ({e.reason} at byte {e.start})"
                break
        if problem:
            rejects.append(Reject.of(m, BAD_TEXT, f"{problem}: the producer must publish UTF-8 JSON"))
            continue
        out.append(b"\t".join(_escape_field(f) for _, f in fields))
        msgs.append(m)
        okeys.append(m.key())
        metas.append(_SEP.join(f for _, f in fields[3:3 + _META_N]))  # run id first (accounting)
        all_extracted = all_extracted and bool(fields[6][1])
        tombs = tombs or m.value() is None
    if not out:
        return PreparedBatch([], [], rejects, False)
    return PreparedBatch(msgs, [b"\n".join(out) + b"\n"], rejects, len(set(okeys)) != len(okeys), okeys,
                         [m.partition() for m in msgs], [m.offset() for m in msgs], metas, tombs, all_extracted)


def _fields_of(m: Any) -> list[tuple[str, bytes]]:
    """The thirteen COPY fields of one message, unescaped, named for error messages."""
    v = m.value()
    h = m.headers()
    meta: list[bytes] | None = None
    if h and h[0][0] == H_LOAD and h[0][1] is not None:
        meta = h[0][1].split(b"\t")
        if len(meta) != _META_N:
            meta = [b""] * _META_N
    if meta is None:
        hd = {n: x for n, x in h if x is not None} if h else _EMPTY
        meta = [hd.get(name) or b"" for name in LOAD_FIELDS]
    if not meta[-1] and v is not None:
        meta[-1] = content_hash(v)
    return [
        ("key", m.key()),
        ("tombstone", b"f" if v is not None else b"t"),
        ("value", v or b""),
        *zip(LOAD_FIELDS, meta, strict=True),
        ("partition", str(m.partition()).encode()),
        ("offset", b"%d" % m.offset()),
        ("timestamp", b"%d" % m.timestamp()[1]),
    ]


# -- SQL ---------------------------------------------------------------------------------------

_TMP = sql.Identifier(TMP_TABLE)
_CREATE_TMP = sql.SQL("""CREATE TEMP TABLE IF NOT EXISTS {} (
    source_id text, tomb boolean, data text, run_id text, job_id text, instance_id text,
    extracted text, modified text, params text, hash text, part integer, off bigint, ts_ms text
) ON COMMIT DELETE ROWS""").format(_TMP)
_COPY = sql.SQL("COPY {} (source_id, tomb, data, run_id, job_id, instance_id, extracted, modified, params, "
                "hash, part, off, ts_ms) FROM STDIN").format(_TMP)

# The direct path: the payload's thirteen fields are exactly thirteen columns of the staging table
# (empty = NULL, as NULLIF does in the upsert); defaults fill id, is_deleted's siblings and times.
_COPY_DIRECT = ("COPY {} (source_id, is_deleted, data, etl_run_id, etl_job_id, source_instance_id, extracted_at, "
                "source_modified_at, source_params, content_hash, kafka_partition, kafka_offset, kafka_timestamp_ms) "
                "FROM STDIN (NULL '')")
UNIQUE_VIOLATION = "23505"

# Header values are cast directly (the hot path); a malformed header makes the statement fail,
# and the slow path then blanks the malformed values (_SANITIZE) and carries on: a bad header
# becomes NULL (the extraction time falls back to the message timestamp, the content hash is
# computed here from the value), never a lost record.
_SRC_COLUMNS = sql.SQL("""
    t.part, t.off, t.tomb, t.source_id, t.data,
    NULLIF(t.run_id, '')::bigint AS run_id,
    NULLIF(t.job_id, '')::integer AS job_id,
    NULLIF(left(t.instance_id, 64), '') AS instance_id,
    coalesce(NULLIF(t.extracted, '')::timestamptz, to_timestamp(NULLIF(t.ts_ms, '')::bigint / 1000.0),
             now()) AS extracted_at,
    NULLIF(t.modified, '')::timestamptz AS modified_at,
    NULLIF(t.params, '')::jsonb AS params,
    CASE WHEN t.hash <> '' THEN t.hash::uuid
         WHEN NOT t.tomb THEN encode(substr(sha256(convert_to(t.data, 'UTF8')), 1, 16), 'hex')::uuid END AS hash,
    NULLIF(t.ts_ms, '')::bigint AS ts_ms""")

_SANITIZE = sql.SQL("""
UPDATE {tmp} SET
    run_id = CASE WHEN run_id ~ '^[0-9]{{1,18}}$' THEN run_id ELSE '' END,
    job_id = CASE WHEN job_id ~ '^[0-9]{{1,9}}$' THEN job_id ELSE '' END,
    extracted = CASE WHEN pg_input_is_valid(extracted, 'timestamptz') THEN extracted ELSE '' END,
    modified = CASE WHEN pg_input_is_valid(modified, 'timestamptz') THEN modified ELSE '' END,
    params = CASE WHEN pg_input_is_valid(params, 'jsonb') THEN params ELSE '' END,
    hash = CASE WHEN hash ~ '^[0-9a-f]{{32}}$' THEN hash ELSE '' END,
    ts_ms = CASE WHEN ts_ms ~ '^-?[0-9]{{1,15}}$' THEN ts_ms ELSE '' END
WHERE run_id !~ '^[0-9]{{0,18}}$' OR job_id !~ '^[0-9]{{0,9}}$'
   OR (extracted <> '' AND NOT pg_input_is_valid(extracted, 'timestamptz'))
   OR (modified <> '' AND NOT pg_input_is_valid(modified, 'timestamptz'))
   OR (params <> '' AND NOT pg_input_is_valid(params, 'jsonb'))
   OR hash !~ '^([0-9a-f]{{32}})?$'
   OR ts_ms !~ '^-?[0-9]{{0,15}}$'""").format(tmp=sql.Identifier(TMP_TABLE))

# The upsert, as one statement over the batch's rows ({src}): each row is first matched with the
# stored row of its key (one index probe: LATERAL ... LIMIT 1, so the planner never hashes the
# whole table), and only then is anything parsed or written --
#   * a new key is inserted;
#   * an existing key whose content hash differs (or that is soft-deleted) is updated, if the
#     stale-write fence allows: (extracted_at, kafka_offset) must not go backwards -- both through
#     INSERT ... ON CONFLICT, which also settles a key a concurrent writer inserted meanwhile;
#   * an existing key with the same hash is left alone: no JSON parse, no row lock, no WAL -- what
#     makes a re-load of unchanged records cheap (bench/RESULTS.md);
#   * a different hash is not yet a change: the same record serialized otherwise (another endpoint
#     of the same model, e.g. jobs 2 and 164 both writing studies, with keys in another order) is
#     compared by its data and only gets the new hash (``fill``), so ``updated_at`` -- what the
#     fan-out planner reads as "this parent changed" -- moves only when the content does;
#   * a stored row without a hash (loaded before migration 0610) is compared by its data once and
#     gets its hash (``fill``: no other column changes, not counted as an update); so is every row
#     when the writer verifies data ({verify}: replays, which must also undo hand edits that left
#     the hash as it was);
#   * a tombstone soft-deletes a live row (fence as above).
# The UPDATEs find their rows by primary key through ``= ANY(ARRAY(...))`` (an index scan) for the
# same reason.
_MATCH = sql.SQL("""src AS ({src}),
cur AS (
    SELECT src.*, s.sid, s.old_hash, s.old_deleted, s.old_ext, s.old_off, s.data_changed
    FROM src LEFT JOIN LATERAL (
        SELECT s.id AS sid, s.content_hash AS old_hash, s.is_deleted AS old_deleted, s.extracted_at AS old_ext,
               s.kafka_offset AS old_off,
               CASE WHEN (s.content_hash IS NULL OR s.content_hash IS DISTINCT FROM src.hash OR {verify})
                         AND NOT src.tomb
                    THEN s.data IS DISTINCT FROM src.data::jsonb END AS data_changed
        FROM {target} s WHERE s.source_id = src.source_id LIMIT 1) s ON true),
todo AS (
    -- the rows that may change something; only these get their header values parsed
    SELECT c.*, (c.old_ext IS NULL OR (c.extracted_at, c.off) >= (c.old_ext, coalesce(c.old_off, -1))) AS fresh
    FROM cur c
    WHERE (c.sid IS NULL AND NOT c.tomb)
       OR (c.sid IS NOT NULL AND (CASE WHEN c.tomb THEN NOT c.old_deleted
                                       ELSE c.old_deleted OR c.old_hash IS DISTINCT FROM c.hash
                                            OR coalesce(c.data_changed, false) END)))""")
# data_changed is NULL where only the hashes were compared (todo holds such a row only if they differ)
_CHANGED = sql.SQL("""NOT c.tomb AND (c.sid IS NULL OR (c.fresh AND (c.old_deleted OR coalesce(c.data_changed, true))))""")
_FILL = sql.SQL("""c.sid IS NOT NULL AND NOT c.tomb AND c.data_changed IS FALSE
    AND c.old_hash IS DISTINCT FROM c.hash AND NOT (c.old_deleted AND c.fresh)""")
_DELETES = sql.SQL("c.sid IS NOT NULL AND c.tomb AND NOT c.old_deleted AND c.fresh")
_UPSERT = sql.SQL("""
ups AS (
    INSERT INTO {target} AS s (data, source_id, source_instance_id, etl_job_id, etl_run_id, source_modified_at,
                               extracted_at, source_params, content_hash, kafka_partition, kafka_offset,
                               kafka_timestamp_ms, is_deleted, deleted_at, loaded_at, created_at, updated_at)
    SELECT c.data::jsonb, c.source_id, c.instance_id, c.job_id, c.run_id, c.modified_at, c.extracted_at,
           c.params, c.hash, c.part, c.off, c.ts_ms, false, NULL, now(), now(), now()
    FROM todo c WHERE {changed}
    ON CONFLICT (source_id) DO UPDATE SET
        data = EXCLUDED.data, source_instance_id = EXCLUDED.source_instance_id,
        etl_job_id = EXCLUDED.etl_job_id, etl_run_id = EXCLUDED.etl_run_id,
        source_modified_at = EXCLUDED.source_modified_at, extracted_at = EXCLUDED.extracted_at,
        source_params = EXCLUDED.source_params, content_hash = EXCLUDED.content_hash,
        kafka_partition = EXCLUDED.kafka_partition, kafka_offset = EXCLUDED.kafka_offset,
        kafka_timestamp_ms = EXCLUDED.kafka_timestamp_ms, is_deleted = false, deleted_at = NULL,
        loaded_at = now(), updated_at = now()
    WHERE (s.content_hash IS DISTINCT FROM EXCLUDED.content_hash OR s.is_deleted
           OR ({verify} AND s.data IS DISTINCT FROM EXCLUDED.data))
      AND (s.extracted_at IS NULL
           OR (EXCLUDED.extracted_at, EXCLUDED.kafka_offset) >= (s.extracted_at, coalesce(s.kafka_offset, -1)))
    RETURNING (s.xmax = 0) AS ins),
fill AS (
    UPDATE {target} AS s SET content_hash = c.hash FROM (SELECT * FROM todo c WHERE {fill}) c
    WHERE s.id = ANY(ARRAY(SELECT c.sid FROM todo c WHERE {fill})) AND s.id = c.sid
    RETURNING 1)""")
_SOFT_DELETE = sql.SQL("""
del AS (
    UPDATE {target} AS s SET is_deleted = true, deleted_at = now(), loaded_at = now(), updated_at = now(),
        etl_job_id = c.job_id, etl_run_id = c.run_id, extracted_at = c.extracted_at,
        kafka_partition = c.part, kafka_offset = c.off
    FROM (SELECT * FROM todo c WHERE {deletes}) c
    WHERE s.id = ANY(ARRAY(SELECT c.sid FROM todo c WHERE {deletes})) AND s.id = c.sid
    RETURNING 1)""")
_COUNT_UPSERT = sql.SQL("(SELECT count(*) FROM ups WHERE ins), (SELECT count(*) FROM ups WHERE NOT ins)")
#: kind -> the statement: "all" (no key twice in the batch: upserts and soft deletes at once),
#: "data" / "tomb" (keys repeat: first the latest data per key, then the tombstones newer than it,
#: so a tombstone keeps the data that preceded it even inside one batch, and the result does not
#: depend on where batches are cut)
_STATEMENTS = {
    "all": sql.SQL("WITH {m}, {u}, {d} SELECT {c}, (SELECT count(*) FROM del)"),
    "data": sql.SQL("WITH {m}, {u} SELECT {c}, 0"),
    "tomb": sql.SQL("WITH {m}, {d} SELECT 0, 0, (SELECT count(*) FROM del)"),
}


def _statement(kind: str, src: sql.Composable, target: sql.Composable, verify: bool = False) -> sql.Composed:
    v = sql.SQL("true" if verify else "false")
    return _STATEMENTS[kind].format(
        m=_MATCH.format(src=src, target=target, verify=v),
        u=_UPSERT.format(target=target, changed=_CHANGED, fill=_FILL, verify=v),
        d=_SOFT_DELETE.format(target=target, deletes=_DELETES), c=_COUNT_UPSERT)

_PARSED = sql.SQL("SELECT {cols} FROM {tmp} t").format(cols=_SRC_COLUMNS, tmp=_TMP)
_DATA_WINNERS = sql.SQL("""SELECT DISTINCT ON (x.source_id) x.* FROM ({p}) x WHERE NOT x.tomb
    ORDER BY x.source_id, x.extracted_at DESC, x.off DESC""").format(p=_PARSED)
_TOMB_WINNERS = sql.SQL("""SELECT w.* FROM (
        SELECT DISTINCT ON (x.source_id) x.* FROM ({p}) x WHERE x.tomb
        ORDER BY x.source_id, x.extracted_at DESC, x.off DESC) w
    LEFT JOIN ({d}) d ON d.source_id = w.source_id
    WHERE d.source_id IS NULL OR (w.extracted_at, w.off) > (d.extracted_at, d.off)""").format(
    p=_PARSED, d=_DATA_WINNERS)
# the rows of some keys -- used while isolating a refused row
_SRC_KEYS = sql.SQL("""SELECT {cols} FROM {tmp} t WHERE t.source_id = ANY(%(keys)s::text[])""").format(
    cols=_SRC_COLUMNS, tmp=_TMP)
_SRC_ROW = sql.SQL("""SELECT {cols} FROM {tmp} t WHERE t.part = %(part)s AND t.off = %(off)s""").format(
    cols=_SRC_COLUMNS, tmp=_TMP)

_DIAGNOSE = sql.SQL("""
SELECT t.part, t.off,
       CASE WHEN char_length(t.source_id) > %(maxlen)s THEN 'KeyTooLong'
            ELSE 'InvalidJson' END,
       CASE WHEN char_length(t.source_id) > %(maxlen)s
            THEN 'record id is ' || char_length(t.source_id) || ' characters long; source_id holds at most '
                 || %(maxlen)s
            ELSE 'value is not valid JSON for PostgreSQL jsonb: ' || (pg_input_error_info(t.data, 'jsonb')).message
       END
FROM {tmp} t
WHERE char_length(t.source_id) > %(maxlen)s OR (NOT t.tomb AND NOT pg_input_is_valid(t.data, 'jsonb'))
""").format(tmp=_TMP)

_DELETE_SUBSET = sql.SQL("""DELETE FROM {tmp} t USING unnest(%(parts)s::integer[], %(offs)s::bigint[]) AS k(part, off)
    WHERE k.part = t.part AND k.off = t.off""").format(tmp=_TMP)
# keep only what the batch applies: the latest data per key and a newer tombstone
_DEDUP_DELETE = sql.SQL("""DELETE FROM {tmp} t WHERE (t.part, t.off) NOT IN (
    SELECT part, off FROM ({dw}) a UNION ALL SELECT part, off FROM ({tw}) b)""").format(
    tmp=_TMP, dw=_DATA_WINNERS, tw=_TOMB_WINNERS)


def is_row_level(e: psycopg.Error) -> bool:
    """True when the error is about the data of some row(s), not about the database's health."""
    state = getattr(e, "sqlstate", None) or ""
    return state[:2] in ROW_LEVEL_CLASSES


class _Reprepare(Exception):
    """The database refused an unchecked payload as a whole: prepare the batch checked instead."""


class _KnownKeys:
    """The keys a direct-path table holds, as 64-bit hashes in sorted numpy arrays.

    Why: a direct COPY of a key the table already has fails with a unique violation -- an ERROR
    line in the server log and a rolled-back COPY -- and a first load meets such keys as a matter
    of course (two jobs feed one table; a topic replayed into an empty table holds several runs'
    copies). Checking a batch's keys here costs ~0.1 us per key and no round trip. A hash
    collision only sends a batch to the upsert (correct either way); a key that is in the table
    but not here (another writer inserted it) is what the unique-violation fallback is for.
    Arrays merge like a binary counter, so adding n keys costs O(n log n) overall.
    """

    def __init__(self) -> None:
        self.levels: list[np.ndarray] = []
        self.count = 0

    @staticmethod
    def hashes(keys: Sequence[bytes]) -> np.ndarray:
        """Sorted, distinct 64-bit hashes of ``keys`` (Python's own ``hash``: one per process)."""
        import numpy as np  # only first loads need it; a one-shot load starts ~0.1 s faster without

        h = np.sort(np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)))
        if len(h) > 1:
            h = h[np.concatenate(([True], h[1:] != h[:-1]))]
        return h

    def any_of(self, h: np.ndarray) -> bool:
        import numpy as np

        for level in self.levels:
            idx = np.searchsorted(level, h)
            idx[idx == len(level)] = 0
            if bool((level[idx] == h).any()):
                return True
        return False

    def add(self, h: np.ndarray) -> None:
        import numpy as np

        self.count += len(h)
        while self.levels and len(self.levels[-1]) <= len(h):
            h = np.concatenate((self.levels.pop(), h))
            h.sort(kind="stable")  # two sorted runs: a merge (radix/timsort), not a full sort
            h = h[np.concatenate(([True], h[1:] != h[:-1]))]
        self.levels.append(h)


class StagingWriter:
    """COPY + upsert of prepared batches on one connection; the caller commits.

    Keeps the temporary table (created once per connection), a cache of which staging tables exist
    and carry the loader columns, and the direct path's key sets.
    """

    def __init__(self, conn: psycopg.Connection, verify_data: bool = False):
        self.conn = conn
        #: compare stored data with the record's, not only the content hashes (replays: a row
        #: edited by hand keeps its hash, and a replay must restore it)
        self.verify_data = verify_data
        self._tmp_ready = False
        self._tmp_dirty = False
        self._tables: dict[str, bool] = {}
        #: target -> the keys it holds while batches of new keys may be COPYed straight in
        #: (see _write_direct); None = not (or no longer) on the direct path
        self._direct: dict[str, _KnownKeys | None] = {}
        #: keys written in the open transaction, added to ``_direct`` when it commits
        self._uncommitted: list[tuple[str, np.ndarray]] = []

    # -- table checks ------------------------------------------------------------------------
    def table_ready(self, schema: str, table: str) -> bool:
        """True when ``schema.table`` exists and is a staging table; adds the loader columns if missing."""
        key = f"{schema}.{table}"
        if self._tables.get(key):
            return True
        row = self.conn.execute(
            """SELECT count(*) FILTER (WHERE column_name = 'source_id'),
                      count(*) FILTER (WHERE column_name IN ('extracted_at', 'source_params', 'kafka_timestamp_ms',
                                                             'content_hash'))
               FROM information_schema.columns WHERE table_schema = %s AND table_name = %s""",
            (schema, table)).fetchone()
        if not row or not row[0]:
            return False
        if row[1] < 4:
            if schema != "bronze":
                return False
            self.conn.execute("SELECT etl.add_loader_columns(%s)", (table,))
        self._tables[key] = True
        return True

    # -- writing -----------------------------------------------------------------------------
    def _ensure_tmp(self) -> None:
        if not self._tmp_ready:
            # room for a whole batch in local buffers (default 8MB would spill a 20k-row batch to
            # disk); must precede the session's first use of a temp table, re-setting it is a no-op
            self.conn.execute("SET temp_buffers = '64MB'")
            self.conn.execute(_CREATE_TMP)
            # session setting of this dedicated connection: dedup sorts and hash joins of a batch
            # stay in memory instead of spilling to temp files
            self.conn.execute("SET work_mem = '64MB'")
            self._tmp_ready = True

    def reset_connection_state(self) -> None:
        """Call after a rollback: the temp table and loader columns may have been rolled back.

        The direct path's key sets stay: they hold committed keys only."""
        self._tmp_ready = False
        self._tmp_dirty = False
        self._tables.clear()
        self._uncommitted.clear()

    def after_commit(self) -> None:
        self._tmp_dirty = False  # ON COMMIT DELETE ROWS emptied it
        for key, h in self._uncommitted:
            known = self._direct.get(key)
            if known is not None:
                known.add(h)
                if known.count > DIRECT_MAX_KEYS:
                    self._direct[key] = None  # memory bound: the upsert from here on
        self._uncommitted.clear()

    def write(self, target: sql.Composable, batch: PreparedBatch) -> WriteResult:
        """Upsert ``batch`` into ``target`` inside the caller's transaction."""
        try:
            return self._write(target, batch)
        except _Reprepare:
            # the database refused the unchecked payload (a value it cannot take as it is): the checked,
            # escaped text payload -- whose pre-database rejects are this batch's rejects too
            text = prepare_text(batch.msgs)
            res = self._write(target, text)
            res.rejects = text.rejects + res.rejects
            return res

    def _write(self, target: sql.Composable, batch: PreparedBatch) -> WriteResult:
        res = WriteResult()
        if not batch.msgs:
            return res
        cur = self.conn.cursor()
        key = target.as_string(self.conn)
        if key not in self._direct:  # the table's state when this connection first writes to it
            q = sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(target)
            row = cur.execute(q).fetchone()
            self._direct[key] = _KnownKeys() if row is not None and row[0] else None
        known = self._direct[key]
        if known is not None:
            h = _KnownKeys.hashes(batch.keys)
            self._uncommitted.append((key, h))  # whichever path writes them, the table holds them then
            if batch.all_extracted and not batch.has_duplicates and not batch.has_tombstones \
                    and not known.any_of(h) and self._write_direct(cur, key, target, batch, res):
                return res
        self._ensure_tmp()
        if self._tmp_dirty:
            cur.execute(sql.SQL("DELETE FROM {}").format(_TMP))
        self._tmp_dirty = True
        # a plain savepoint (not released: one round trip less per batch; the commit ends it)
        cur.execute("SAVEPOINT ts_upsert")
        try:
            self._copy_tmp(cur, batch)
        except psycopg.Error as e:
            if not (batch.unchecked and is_row_level(e)):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT ts_upsert")
            raise _Reprepare from None
        try:
            if batch.has_duplicates:
                self._apply(cur, "data", _DATA_WINNERS, target, res)
                if batch.has_tombstones:
                    self._apply(cur, "tomb", _TOMB_WINNERS, target, res)
            else:
                self._apply(cur, "all" if batch.has_tombstones else "data", _PARSED, target, res)
        except psycopg.Error as e:
            if not is_row_level(e):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT ts_upsert")
            self._copy_tmp(cur, batch)
            return self._isolate(cur, target, batch)
        res.accepted = len(batch.msgs)
        return res

    @staticmethod
    def _copy_tmp(cur: psycopg.Cursor, batch: PreparedBatch) -> None:
        with cur.copy(_COPY) as cp:
            for chunk in batch.payload:
                cp.write(chunk)

    def _write_direct(self, cur: psycopg.Cursor, key: str, target: sql.Composable, batch: PreparedBatch,
                      res: WriteResult) -> bool:
        """COPY a batch of new keys straight into the staging table; False = take the upsert path.

        Why: ``INSERT ... SELECT`` inserts row by row; COPY into the table uses multi-row inserts
        and skips the temporary table -- about 1.2x less PostgreSQL CPU per row than the upsert's
        insert (bench/RESULTS.md). It is tried only for a table that was empty when this connection
        first wrote to it (a first load), only for batches with no tombstone and no repeated key,
        where an insert is exactly what the upsert would do, and only when none of the batch's keys
        is among those this connection wrote to it before (``_KnownKeys``) -- so an ordinary first
        load or replay never makes the server log a unique violation. If one happens anyway (another
        writer inserted a key meanwhile), the batch rolls back to its savepoint, takes the upsert
        path, and the table leaves the direct path for good. Any other refused row (bad JSON, a key
        too long) also falls back, so the upsert path's isolation names it.
        """
        cur.execute("SAVEPOINT ts_direct")
        try:
            with cur.copy(sql.SQL(_COPY_DIRECT).format(target)) as cp:
                for chunk in batch.payload:
                    cp.write(chunk)
        except psycopg.Error as e:
            if not is_row_level(e):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT ts_direct")
            if getattr(e, "sqlstate", None) == UNIQUE_VIOLATION:
                self._direct[key] = None
            return False
        res.inserted = res.accepted = len(batch.msgs)
        res.direct = True
        return True

    def _apply(self, cur: psycopg.Cursor, kind: str, src: sql.Composable, target: sql.Composable,
               res: WriteResult, params: dict[str, Any] | None = None) -> None:
        q = _statement(kind, src, target, self.verify_data)
        row = cur.execute(q, params).fetchone()
        assert row is not None  # the statement's final SELECT answers one row of counts
        ins, upd, dele = row
        res.inserted += ins
        res.updated += upd
        res.deleted += dele

    def _isolate(self, cur: psycopg.Cursor, target: sql.Composable, batch: PreparedBatch) -> WriteResult:
        """Slow path after a data error: find the rows the database refuses, write all the others.

        Known defects (invalid JSON/jsonb, over-long keys) are found with one query; anything else
        is isolated by bisecting over keys (a key's rows stay together, so a tombstone still
        follows its data), each step under its own savepoint.
        """
        res = WriteResult(isolated=True)
        by_pos = {(m.partition(), m.offset()): m for m in batch.msgs}
        cur.execute(_SANITIZE)
        refused: dict[tuple[int, int], Reject] = {}
        for part, off, cls, msg in cur.execute(_DIAGNOSE, {"maxlen": SOURCE_ID_MAX}).fetchall():
            refused[(part, off)] = Reject.of(by_pos[(part, off)], cls, msg)
        if refused:
            parts, offs = zip(*refused, strict=True)
            cur.execute(_DELETE_SUBSET, {"parts": list(parts), "offs": list(offs)})
        if batch.has_duplicates:
            cur.execute(_DEDUP_DELETE)
        rows = cur.execute(sql.SQL("SELECT source_id, part, off FROM {} ORDER BY source_id, part, off")
                           .format(_TMP)).fetchall()
        key_rows: dict[str, list[tuple[int, int]]] = {}
        for sid, part, off in rows:
            key_rows.setdefault(sid, []).append((part, off))
        stack = [list(key_rows)]
        while stack:
            keys = stack.pop()
            if not keys:
                continue
            try:
                with self.conn.transaction():
                    self._apply(cur, "data", _SRC_KEYS, target, res, {"keys": keys})
                    self._apply(cur, "tomb", _SRC_KEYS, target, res, {"keys": keys})
                continue
            except psycopg.Error as e:
                if not is_row_level(e):
                    raise
                if len(keys) > 1:
                    mid = len(keys) // 2
                    stack.append(keys[mid:])
                    stack.append(keys[:mid])
                    continue
            # one key: its data row, then its tombstone, each on its own
            for part, off in key_rows[keys[0]]:
                try:
                    with self.conn.transaction():
                        self._apply(cur, "data", _SRC_ROW, target, res, {"part": part, "off": off})
                        self._apply(cur, "tomb", _SRC_ROW, target, res, {"part": part, "off": off})
                except psycopg.Error as e:
                    if not is_row_level(e):
                        raise
                    refused[(part, off)] = Reject.of(by_pos[(part, off)], f"Db{type(e).__name__}", _db_message(e))
        res.rejects = list(refused.values())
        res.accepted = len(batch.msgs) - len(refused)
        return res


def _db_message(e: psycopg.Error) -> str:
    diag = e.diag
    text = (diag.message_primary or str(e).strip().splitlines()[0] or type(e).__name__)
    if diag.message_detail:
        text += f" ({diag.message_detail[:300]})"
    return f"the database refused the row: {text}"
