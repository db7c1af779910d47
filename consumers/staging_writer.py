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
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql

from common.kafka import H_EXTRACTED_AT, H_INSTANCE, H_JOB_ID, H_MODIFIED_AT, H_PARAMS, H_RUN_ID

TMP_TABLE = "_ts_load_batch"
SOURCE_ID_MAX = 255  # bronze.*.source_id is varchar(255)
_SEP = b"\t"
_NFIELDS = 12
_EMPTY: dict[str, bytes] = {}
_PART = [str(i).encode() for i in range(1024)]
#: the six headers the COPY row carries, in column order
_HEADERS = itemgetter(H_RUN_ID, H_JOB_ID, H_INSTANCE, H_EXTRACTED_AT, H_MODIFIED_AT, H_PARAMS)
_NO_HEADERS = (b"",) * 6

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
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass
class PreparedBatch:
    """One table's share of a micro-batch, ready to COPY.

    ``msgs[i]`` is the message of COPY row ``i``; ``rejects`` are messages refused before the
    database saw them (no id, bytes PostgreSQL text cannot hold).
    """

    msgs: list[Any]
    payload: bytes
    rejects: list[Reject]
    has_duplicates: bool
    run_ids: list[bytes | None]
    #: False only when the batch surely holds no tombstone (the soft-delete statement is skipped)
    has_tombstones: bool = True
    #: every row carries an extraction time (the direct-COPY path needs no SQL fallback for it)
    all_extracted: bool = False

    def __len__(self) -> int:
        return len(self.msgs)


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


def prepare(msgs: Sequence[Any]) -> PreparedBatch:
    """Build the COPY payload for ``msgs`` (all of one table, consume order)."""
    rows: list[bytes] = []
    acc: list[Any] = []
    keys: list[bytes] = []
    runs: list[bytes | None] = []
    rejects: list[Reject] = []
    join = _SEP.join
    part = _PART
    headers_of = _HEADERS
    missing = _NO_HEADERS
    no_ext = 0
    for m in msgs:
        k = m.key()
        if not k:
            rejects.append(Reject.of(m, NO_ID, _no_id_message(m)))
            continue
        v = m.value()
        h = m.headers()
        # a defaultdict answers b"" for a header that is absent (one C-level lookup for all six)
        run, job, inst, ext, mod, params = headers_of(defaultdict(bytes, h)) if h else missing
        p = m.partition()
        try:
            rows.append(join((k, b"f" if v is not None else b"t", v or b"", run, job, inst, ext, mod, params,
                              part[p] if p < 1024 else str(p).encode(), b"%d" % m.offset(),
                              b"%d" % m.timestamp()[1])))
        except TypeError:  # a header whose value is null: treat as absent
            hd = {n: x for n, x in h if x is not None}
            run, job, inst, ext, mod, params = headers_of(defaultdict(bytes, hd))
            rows.append(join((k, b"f" if v is not None else b"t", v or b"", run, job, inst, ext, mod, params,
                              str(p).encode(), b"%d" % m.offset(), b"%d" % m.timestamp()[1])))
        acc.append(m)
        keys.append(k)
        runs.append(run or None)
        if not ext:
            no_ext += 1
    if not rows:
        return PreparedBatch([], b"", rejects, False, [])
    body = b"\n".join(rows)
    n = len(rows)
    # Every tab and newline must be ours, and no byte may be one PostgreSQL text refuses; then the
    # only escaping COPY needs is doubling backslashes (JSON escapes), one pass over the buffer.
    ok = body.count(b"\t") == n * (_NFIELDS - 1) and body.count(b"\n") == n - 1 \
        and b"\r" not in body and b"\x00" not in body
    if ok and not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            ok = False
    if not ok:
        return _prepare_slow(acc, keys, runs, rejects)
    if b"\\" in body:
        body = body.replace(b"\\", b"\\\\")
    # fast path: the only tabs are separators, so a tombstone row contains "\tt\t" (another field
    # that is exactly "t" only costs the skipped soft-delete statement)
    return PreparedBatch(acc, body + b"\n", rejects, len(set(keys)) != n, runs, b"\tt\t" in body, no_ext == 0)


def _escape_field(f: bytes) -> bytes:
    return f.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def _prepare_slow(acc: list[Any], keys: list[bytes], runs: list[bytes | None],
                  rejects: list[Reject]) -> PreparedBatch:
    """Per-row path for batches holding bytes PostgreSQL text cannot take (or our separators)."""
    out: list[bytes] = []
    msgs: list[Any] = []
    okeys: list[bytes] = []
    oruns: list[bytes | None] = []
    for m, k, run in zip(acc, keys, runs, strict=True):
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
        okeys.append(k)
        oruns.append(run)
    if not out:
        return PreparedBatch([], b"", rejects, False, [])
    return PreparedBatch(msgs, b"\n".join(out) + b"\n", rejects, len(set(okeys)) != len(okeys), oruns)


def _fields_of(m: Any) -> list[tuple[str, bytes]]:
    v = m.value()
    h = m.headers()
    hd = {n: x for n, x in h if x is not None} if h else _EMPTY
    return [
        ("key", m.key()),
        ("tombstone", b"f" if v is not None else b"t"),
        ("value", v or b""),
        (H_RUN_ID, hd.get(H_RUN_ID) or b""),
        (H_JOB_ID, hd.get(H_JOB_ID) or b""),
        (H_INSTANCE, hd.get(H_INSTANCE) or b""),
        (H_EXTRACTED_AT, hd.get(H_EXTRACTED_AT) or b""),
        (H_MODIFIED_AT, hd.get(H_MODIFIED_AT) or b""),
        (H_PARAMS, hd.get(H_PARAMS) or b""),
        ("partition", str(m.partition()).encode()),
        ("offset", b"%d" % m.offset()),
        ("timestamp", b"%d" % m.timestamp()[1]),
    ]


# -- SQL ---------------------------------------------------------------------------------------

_TMP = sql.Identifier(TMP_TABLE)
_CREATE_TMP = sql.SQL("""CREATE TEMP TABLE IF NOT EXISTS {} (
    source_id text, tomb boolean, data text, run_id text, job_id text, instance_id text,
    extracted text, modified text, params text, part integer, off bigint, ts_ms text
) ON COMMIT DELETE ROWS""").format(_TMP)
_COPY = sql.SQL("COPY {} (source_id, tomb, data, run_id, job_id, instance_id, extracted, modified, params, "
                "part, off, ts_ms) FROM STDIN").format(_TMP)

# The direct path: the payload's twelve fields are exactly twelve columns of the staging table
# (empty = NULL, as NULLIF does in the upsert); defaults fill id, is_deleted's siblings and times.
_COPY_DIRECT = ("COPY {} (source_id, is_deleted, data, etl_run_id, etl_job_id, source_instance_id, extracted_at, "
                "source_modified_at, source_params, kafka_partition, kafka_offset, kafka_timestamp_ms) "
                "FROM STDIN (NULL '')")
UNIQUE_VIOLATION = "23505"

# Header values are cast directly (the hot path); a malformed header makes the statement fail,
# and the slow path then blanks the malformed values (_SANITIZE) and carries on: a bad header
# becomes NULL (the extraction time falls back to the message timestamp), never a lost record.
_SRC_COLUMNS = sql.SQL("""
    t.part, t.off, t.tomb, t.source_id, t.data,
    NULLIF(t.run_id, '')::bigint AS run_id,
    NULLIF(t.job_id, '')::integer AS job_id,
    NULLIF(left(t.instance_id, 64), '') AS instance_id,
    coalesce(NULLIF(t.extracted, '')::timestamptz, to_timestamp(NULLIF(t.ts_ms, '')::bigint / 1000.0),
             now()) AS extracted_at,
    NULLIF(t.modified, '')::timestamptz AS modified_at,
    NULLIF(t.params, '')::jsonb AS params,
    NULLIF(t.ts_ms, '')::bigint AS ts_ms""")

_SANITIZE = sql.SQL("""
UPDATE {tmp} SET
    run_id = CASE WHEN run_id ~ '^[0-9]{{1,18}}$' THEN run_id ELSE '' END,
    job_id = CASE WHEN job_id ~ '^[0-9]{{1,9}}$' THEN job_id ELSE '' END,
    extracted = CASE WHEN pg_input_is_valid(extracted, 'timestamptz') THEN extracted ELSE '' END,
    modified = CASE WHEN pg_input_is_valid(modified, 'timestamptz') THEN modified ELSE '' END,
    params = CASE WHEN pg_input_is_valid(params, 'jsonb') THEN params ELSE '' END,
    ts_ms = CASE WHEN ts_ms ~ '^-?[0-9]{{1,15}}$' THEN ts_ms ELSE '' END
WHERE run_id !~ '^[0-9]{{0,18}}$' OR job_id !~ '^[0-9]{{0,9}}$'
   OR (extracted <> '' AND NOT pg_input_is_valid(extracted, 'timestamptz'))
   OR (modified <> '' AND NOT pg_input_is_valid(modified, 'timestamptz'))
   OR (params <> '' AND NOT pg_input_is_valid(params, 'jsonb'))
   OR ts_ms !~ '^-?[0-9]{{0,15}}$'""").format(tmp=sql.Identifier(TMP_TABLE))

_INSERT = sql.SQL("""
    INSERT INTO {target} AS s (data, source_id, source_instance_id, etl_job_id, etl_run_id, source_modified_at,
                               extracted_at, source_params, kafka_partition, kafka_offset, kafka_timestamp_ms,
                               is_deleted, deleted_at, loaded_at, created_at, updated_at)
    SELECT src.data::jsonb, src.source_id, src.instance_id, src.job_id, src.run_id, src.modified_at,
           src.extracted_at, src.params, src.part, src.off, src.ts_ms, false, NULL, now(), now(), now()
    FROM {src} WHERE NOT src.tomb
    ON CONFLICT (source_id) DO UPDATE SET
        data = EXCLUDED.data, source_instance_id = EXCLUDED.source_instance_id,
        etl_job_id = EXCLUDED.etl_job_id, etl_run_id = EXCLUDED.etl_run_id,
        source_modified_at = EXCLUDED.source_modified_at, extracted_at = EXCLUDED.extracted_at,
        source_params = EXCLUDED.source_params, kafka_partition = EXCLUDED.kafka_partition,
        kafka_offset = EXCLUDED.kafka_offset, kafka_timestamp_ms = EXCLUDED.kafka_timestamp_ms,
        is_deleted = false, deleted_at = NULL,
        loaded_at = now(), updated_at = now()
    WHERE (s.data IS DISTINCT FROM EXCLUDED.data OR s.is_deleted)
      AND (s.extracted_at IS NULL
           OR (EXCLUDED.extracted_at, EXCLUDED.kafka_offset) >= (s.extracted_at, coalesce(s.kafka_offset, -1)))
    RETURNING (s.xmax = 0) AS ins""")

_DELETE = sql.SQL("""
    UPDATE {target} AS s SET is_deleted = true, deleted_at = now(), loaded_at = now(), updated_at = now(),
        etl_job_id = src.job_id, etl_run_id = src.run_id, extracted_at = src.extracted_at,
        kafka_partition = src.part, kafka_offset = src.off
    FROM {src}
    WHERE src.tomb AND s.source_id = src.source_id AND NOT s.is_deleted
      AND (s.extracted_at IS NULL
           OR (src.extracted_at, src.off) >= (s.extracted_at, coalesce(s.kafka_offset, -1)))
    RETURNING 1""")

# No key twice in the batch: one statement does the upserts and the soft deletes.
_COMBINED = sql.SQL("""WITH up AS ({ins}), del AS ({dele})
SELECT (SELECT count(*) FROM up WHERE ins), (SELECT count(*) FROM up WHERE NOT ins), (SELECT count(*) FROM del)""")
# Keys repeat: first the latest data per key, then the tombstones that are newer than it -- so a
# tombstone keeps the data that preceded it even inside one batch, and the result does not depend
# on where batches are cut.
_DATA_ONLY = sql.SQL("""WITH up AS ({ins})
SELECT (SELECT count(*) FROM up WHERE ins), (SELECT count(*) FROM up WHERE NOT ins), 0""")
_TOMB_ONLY = sql.SQL("""WITH del AS ({dele}) SELECT 0, 0, (SELECT count(*) FROM del)""")

_PARSED = sql.SQL("SELECT {cols} FROM {tmp} t").format(cols=_SRC_COLUMNS, tmp=_TMP)
_SRC_ALL = sql.SQL("({p}) src").format(p=_PARSED)
_DATA_WINNERS = sql.SQL("""SELECT DISTINCT ON (x.source_id) x.* FROM ({p}) x WHERE NOT x.tomb
    ORDER BY x.source_id, x.extracted_at DESC, x.off DESC""").format(p=_PARSED)
_TOMB_WINNERS = sql.SQL("""SELECT w.* FROM (
        SELECT DISTINCT ON (x.source_id) x.* FROM ({p}) x WHERE x.tomb
        ORDER BY x.source_id, x.extracted_at DESC, x.off DESC) w
    LEFT JOIN ({d}) d ON d.source_id = w.source_id
    WHERE d.source_id IS NULL OR (w.extracted_at, w.off) > (d.extracted_at, d.off)""").format(
    p=_PARSED, d=_DATA_WINNERS)
_SRC_DATA_WINNERS = sql.SQL("({}) src").format(_DATA_WINNERS)
_SRC_TOMB_WINNERS = sql.SQL("({}) src").format(_TOMB_WINNERS)
# the rows of some keys -- used while isolating a refused row
_SRC_KEYS = sql.SQL("""(SELECT {cols} FROM {tmp} t WHERE t.source_id = ANY(%(keys)s::text[])) src""").format(
    cols=_SRC_COLUMNS, tmp=_TMP)
_SRC_ROW = sql.SQL("""(SELECT {cols} FROM {tmp} t WHERE t.part = %(part)s AND t.off = %(off)s) src""").format(
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


class StagingWriter:
    """COPY + upsert of prepared batches on one connection; the caller commits.

    Keeps the temporary table (created once per connection) and a cache of which staging tables
    exist and carry the loader columns.
    """

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self._tmp_ready = False
        self._tmp_dirty = False
        self._tables: dict[str, bool] = {}
        #: target -> whether batches of new keys may be COPYed straight in (see _write_direct)
        self._direct: dict[str, bool] = {}

    # -- table checks ------------------------------------------------------------------------
    def table_ready(self, schema: str, table: str) -> bool:
        """True when ``schema.table`` exists and is a staging table; adds the loader columns if missing."""
        key = f"{schema}.{table}"
        if self._tables.get(key):
            return True
        row = self.conn.execute(
            """SELECT count(*) FILTER (WHERE column_name = 'source_id'),
                      count(*) FILTER (WHERE column_name IN ('extracted_at', 'source_params', 'kafka_timestamp_ms'))
               FROM information_schema.columns WHERE table_schema = %s AND table_name = %s""",
            (schema, table)).fetchone()
        if not row or not row[0]:
            return False
        if row[1] < 3:
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
        """Call after a rollback: the temp table and loader columns may have been rolled back."""
        self._tmp_ready = False
        self._tmp_dirty = False
        self._tables.clear()
        self._direct.clear()

    def after_commit(self) -> None:
        self._tmp_dirty = False  # ON COMMIT DELETE ROWS emptied it

    def write(self, target: sql.Composable, batch: PreparedBatch) -> WriteResult:
        """Upsert ``batch`` into ``target`` inside the caller's transaction."""
        res = WriteResult()
        if not batch.msgs:
            return res
        cur = self.conn.cursor()
        key = target.as_string(self.conn)
        if key not in self._direct:  # the table's state when this connection first writes to it
            q = sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(target)
            self._direct[key] = bool(cur.execute(q).fetchone()[0])  # type: ignore[index]
        if self._direct[key] and batch.all_extracted and not batch.has_duplicates and not batch.has_tombstones \
                and self._write_direct(cur, key, target, batch, res):
            return res
        self._ensure_tmp()
        if self._tmp_dirty:
            cur.execute(sql.SQL("DELETE FROM {}").format(_TMP))
        self._tmp_dirty = True
        with cur.copy(_COPY) as cp:
            cp.write(batch.payload)
        # a plain savepoint (not released: one round trip less per batch; the commit ends it)
        cur.execute("SAVEPOINT ts_upsert")
        try:
            if batch.has_duplicates:
                self._apply(cur, _DATA_ONLY, _SRC_DATA_WINNERS, target, res)
                if batch.has_tombstones:
                    self._apply(cur, _TOMB_ONLY, _SRC_TOMB_WINNERS, target, res)
            elif batch.has_tombstones:
                self._apply(cur, _COMBINED, _SRC_ALL, target, res)
            else:
                self._apply(cur, _DATA_ONLY, _SRC_ALL, target, res)
        except psycopg.Error as e:
            if not is_row_level(e):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT ts_upsert")
            return self._isolate(cur, target, batch)
        res.accepted = len(batch.msgs)
        return res

    def _write_direct(self, cur: psycopg.Cursor, key: str, target: sql.Composable, batch: PreparedBatch,
                      res: WriteResult) -> bool:
        """COPY a batch of new keys straight into the staging table; False = take the upsert path.

        Why: ``INSERT ... SELECT ... ON CONFLICT`` inserts row by row; COPY into the table uses
        multi-row inserts and skips the temporary table -- about 1.8x less PostgreSQL CPU per row
        (bench/README.md). It is tried only for a table that was empty when this connection first
        wrote to it (a first load), and only for batches with no tombstone and no repeated key,
        where an insert is exactly what the upsert would do. The first key that already exists
        raises a unique violation: the batch rolls back to its savepoint, takes the upsert path,
        and the table leaves the direct path for good. Any other refused row (bad JSON, a key too
        long) also falls back, so the upsert path's isolation names it.
        """
        cur.execute("SAVEPOINT ts_direct")
        try:
            with cur.copy(sql.SQL(_COPY_DIRECT).format(target)) as cp:
                cp.write(batch.payload)
        except psycopg.Error as e:
            if not is_row_level(e):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT ts_direct")
            if getattr(e, "sqlstate", None) == UNIQUE_VIOLATION:
                self._direct[key] = False
            return False
        res.inserted = res.accepted = len(batch.msgs)
        res.direct = True
        return True

    @staticmethod
    def _apply(cur: psycopg.Cursor, stmt: sql.SQL, src: sql.Composable, target: sql.Composable,
               res: WriteResult, params: dict[str, Any] | None = None) -> None:
        q = stmt.format(ins=_INSERT.format(src=src, target=target), dele=_DELETE.format(src=src, target=target))
        ins, upd, dele = cur.execute(q, params).fetchone()  # type: ignore[misc]
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
                    self._apply(cur, _DATA_ONLY, _SRC_KEYS, target, res, {"keys": keys})
                    self._apply(cur, _TOMB_ONLY, _SRC_KEYS, target, res, {"keys": keys})
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
                        self._apply(cur, _DATA_ONLY, _SRC_ROW, target, res, {"part": part, "off": off})
                        self._apply(cur, _TOMB_ONLY, _SRC_ROW, target, res, {"part": part, "off": off})
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
