"""Reconcile Bronze against a simulator's ground truth: key by key and content by content.

Why: "exactly right data" is only proven by comparing every staging row with what the API serves
*now*. The simulator streams that truth (``GET /_sim/expected?job=N``: every ``{params, record}``
the job's endpoint returns over all its valid parents); this module turns it into source ids with
the same key builders the extractor uses and compares it with every staging table:

* **expected** -- distinct source ids the table must hold (union of its jobs' truth);
* **missing**  -- expected ids with no live row (absent, or soft-deleted);
* **duplicated** -- one source record held by more than one live row: rows whose key, recomputed
  from their own ``data`` (and ``source_params``), collides with another row's. ``UNIQUE
  (source_id)`` cannot catch this (the same record under two ids, e.g. a key or instance change);
* **stale** -- a live row whose ``data`` differs from the current record (canonical JSON: keys
  sorted, no whitespace) of the job that wrote it; ``stale_refs`` counts the stale rows whose own
  timestamp field equals the current record's (only an embedded copy of another record changed,
  which no ``modifiedDate`` filter can see -- an incremental run leaves these for a full one);
* **extra** -- live rows whose source id the API no longer serves (deleted upstream, or never).

Used by the fault suite (``tests/faults``), the fault runner (``python -m bench.faults``) and
``trialsync simulator reconcile`` (to check a demo warehouse by hand).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import psycopg
import requests
from psycopg import sql

from common.db import staging_table
from producers.keys import key_builder
from schemas.jobs import JobCatalog

_SAMPLES = 3


def canonical(obj: Any) -> bytes:
    """Canonical JSON of a record: sorted keys, compact; 1 and 1.0 stay different."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)


def iter_expected(admin_url: str, job_id: int, timeout: float = 600) -> Iterator[dict[str, Any]]:
    """Stream one job's ground truth from a simulator's admin API (NDJSON, constant memory)."""
    with requests.get(f"{admin_url.rstrip('/')}/expected", params={"job": job_id}, stream=True,
                      timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines(chunk_size=1 << 16):
            if line:
                yield orjson.loads(line)


@dataclass
class TableReport:
    table: str
    jobs: list[int]
    expected: int = 0
    loaded: int = 0  # live (not soft-deleted) rows
    missing: int = 0
    duplicated: int = 0
    stale: int = 0
    #: of ``stale``: the row's own timestamp equals the truth's -- only content the record's
    #: timestamp does not cover differs (an embedded preview of another record, e.g. a renamed
    #: arm inside a subject): a ``modifiedDate`` filter cannot see it, a full re-read does
    stale_refs: int = 0
    extra: int = 0
    #: source ids the truth serves with two different contents (ambiguous; informational)
    truth_conflicts: int = 0
    samples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.duplicated or self.stale or self.extra)

    def _sample(self, kind: str, sid: str) -> None:
        s = self.samples.setdefault(kind, [])
        if len(s) < _SAMPLES:
            s.append(sid)


@dataclass
class Reconciliation:
    tables: dict[str, TableReport]

    def total(self, what: str) -> int:
        return sum(getattr(t, what) for t in self.tables.values())

    @property
    def totals(self) -> dict[str, int]:
        return {k: self.total(k) for k in ("expected", "loaded", "missing", "duplicated", "stale", "stale_refs",
                                           "extra")}

    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.tables.values())

    def problems(self) -> dict[str, dict[str, Any]]:
        """Only the tables that are not exact, with their counts and sample ids."""
        return {name: {k: v for k, v in asdict(t).items() if k not in ("table", "jobs")}
                for name, t in self.tables.items() if not t.exact}

    def as_dict(self) -> dict[str, Any]:
        return {"exact": self.exact, "totals": self.totals, "tables": {n: asdict(t) for n, t in self.tables.items()}}


def reconcile(conn: psycopg.Connection, admin_url: str, catalog: JobCatalog, job_ids: Iterable[int],
              instance: str = "cc1", truth: Any = None) -> Reconciliation:
    """Compare every staging table the jobs feed with the simulator's current ground truth.

    ``truth`` (optional) is a callable ``job_id -> iterable of {params, record}``; by default the
    simulator at ``admin_url`` is asked.
    """
    fetch = truth or (lambda j: iter_expected(admin_url, j))
    by_table: dict[str, list[int]] = {}
    for j in sorted(set(job_ids)):
        by_table.setdefault(catalog.get(j).target_table, []).append(j)
    out: dict[str, TableReport] = {}
    for table, jobs in sorted(by_table.items()):
        out[table] = _reconcile_table(conn, table, jobs, catalog, instance, fetch)
    return Reconciliation(out)


def _reconcile_table(conn: psycopg.Connection, table: str, jobs: list[int], catalog: JobCatalog, instance: str,
                     fetch: Any) -> TableReport:
    rep = TableReport(table, jobs)
    keyfns = {j: key_builder(catalog.get(j).primary_key, instance) for j in jobs}
    # truth: source id -> job -> canonical contents (usually one)
    truth: dict[str, dict[int, set[bytes]]] = {}
    for j in jobs:
        fn = keyfns[j]
        for item in fetch(j):
            sid = fn(item["record"], item.get("params"))
            if sid is None:  # the API serves it without a key: the loader must dead-letter it
                continue
            truth.setdefault(sid, {}).setdefault(j, set()).add(canonical(item["record"]))
    rep.expected = len(truth)
    rep.truth_conflicts = sum(1 for per_job in truth.values() if len({c for cs in per_job.values() for c in cs}) > 1)
    seen: set[str] = set()
    record_keys: dict[str, str] = {}  # key recomputed from the row's own data -> the row holding it
    query = sql.SQL("SELECT source_id, etl_job_id, is_deleted, data::text, source_params::text FROM {}").format(
        staging_table(table))
    with conn.transaction(), conn.cursor(name=f"reconcile_{table}") as cur:
        cur.itersize = 5000
        for sid, job_id, deleted, data, params in cur.execute(query):
            if deleted:
                continue
            rep.loaded += 1
            record = orjson.loads(data)
            fn = keyfns.get(job_id) or keyfns[jobs[0]]
            rkey = fn(record, orjson.loads(params) if params else None)
            if rkey is not None:
                if rkey in record_keys:
                    rep.duplicated += 1
                    rep._sample("duplicated", f"{sid} = {record_keys[rkey]}")
                else:
                    record_keys[rkey] = sid
            per_job = truth.get(sid)
            if per_job is None:
                rep.extra += 1
                rep._sample("extra", sid)
                continue
            seen.add(sid)
            wanted = per_job.get(job_id) or {c for cs in per_job.values() for c in cs}
            if canonical(record) not in wanted:
                rep.stale += 1
                rep._sample("stale", sid)
                ts = catalog.get(job_id if job_id in keyfns else jobs[0]).timestamp_field
                if ts and record.get(ts) is not None and any(orjson.loads(c).get(ts) == record.get(ts) for c in wanted):
                    rep.stale_refs += 1
                    rep._sample("stale_refs", sid)
    missing = truth.keys() - seen
    rep.missing = len(missing)
    for sid in sorted(missing)[:_SAMPLES]:
        rep._sample("missing", sid)
    return rep


def format_table(rec: Reconciliation, only_problems: bool = False) -> str:
    """A plain-text table (one line per staging table, then the total)."""
    head = f"{'table':<44} {'expected':>9} {'loaded':>9} {'missing':>8} {'dup':>5} {'stale':>6} {'extra':>6}"
    lines = [head, "-" * len(head)]
    for t in rec.tables.values():
        if only_problems and t.exact:
            continue
        lines.append(f"{t.table:<44} {t.expected:>9} {t.loaded:>9} {t.missing:>8} {t.duplicated:>5} {t.stale:>6} "
                     f"{t.extra:>6}")
    tot = rec.totals
    lines.append(f"{'TOTAL (' + str(len(rec.tables)) + ' tables)':<44} {tot['expected']:>9} {tot['loaded']:>9} "
                 f"{tot['missing']:>8} {tot['duplicated']:>5} {tot['stale']:>6} {tot['extra']:>6}")
    return "\n".join(lines)
