"""OData query options as the CC API implements them: ``$top``, ``$skip``, ``$orderby``,
``$count`` and ``$filter`` (``gt ge lt le eq ne`` on the timestamp field, the created field and the
id, joined with ``and``).

Limits (documented in simulator/README.md): ``$top`` defaults to 50; a ``$top`` above 1000 is
*rejected* with 400, like ASP.NET's ``MaxTop=1000`` -- never silently capped, so a client that
asks for more than the API allows finds out at once. Ordering is always total: every sort ends
with the record index, which follows the id, so ``$skip`` paging neither skips nor repeats.

Queries run vectorised over the entity's numpy columns; results over whole large entities are
cached per (entity version, filter, order) so paging through 2.3 M records costs one scan.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from simulator.data import DataModel, Entity

DEFAULT_TOP = 50
MAX_TOP = 1000
#: Sorting on fields without a column materialises the records: allowed up to this many.
MAX_MATERIALISED_SORT = 50_000
_CACHE_MIN = 5_000

_OPS = ("eq", "ne", "gt", "ge", "lt", "le")
_COND_RE = re.compile(r"^\(?\s*([A-Za-z_][A-Za-z0-9_]*)\s+(eq|ne|gt|ge|lt|le)\s+(.+?)\s*\)?$", re.IGNORECASE)
_AND_RE = re.compile(r"\s+and\s+", re.IGNORECASE)
_TS_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?\s*(Z|[+-]\d{2}:?\d{2})?$",
    re.IGNORECASE,
)


class ODataError(ValueError):
    """A bad query option: answered with 400 and this message."""


@dataclass(frozen=True)
class Cond:
    column: str  # 'modified' | 'created' | 'id'
    op: str
    value: int  # microseconds since the epoch for timestamps, the id otherwise


@dataclass
class Query:
    top: int | None = DEFAULT_TOP  # None = everything (plain list endpoints)
    skip: int = 0
    count: bool = False
    filters: list[Cond] = field(default_factory=list)
    orderby: list[tuple[str, bool]] = field(default_factory=list)  # (field or column, descending)
    filter_text: str = ""
    orderby_text: str = ""

    @property
    def default_order(self) -> bool:
        return not self.orderby or self.orderby == [("id", False)]


def parse_timestamp(text: str) -> int:
    """An OData datetime literal -> microseconds since the epoch (UTC).

    Accepts ``2025-12-01T20:30:52Z``, fractional seconds (up to 9 digits), offsets (``+02:00``,
    ``-0500``; a ``+`` that arrived as a space is repaired), no zone (= UTC), a bare date, and the
    wrappers ``datetime'…'``, ``datetimeoffset'…'`` or plain quotes.
    """
    s = text.strip()
    m = re.fullmatch(r"(?:datetime|datetimeoffset)?'(.*)'", s, re.IGNORECASE)
    if m:
        s = m.group(1).strip()
    s = re.sub(r" (\d{2}:?\d{2})$", r"+\1", s)  # '+02:00' decoded from a query string as ' 02:00'
    m = _TS_RE.match(s)
    if not m:
        raise ODataError(f"cannot read {text!r} as a date-time: use ISO-8601 like 2025-12-01T20:30:52Z")
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    try:
        dt = datetime(int(y), int(mo), int(d), int(hh or 0), int(mi or 0), int(ss or 0), tzinfo=UTC)
    except ValueError as e:
        raise ODataError(f"cannot read {text!r} as a date-time: {e}") from None
    micros = int((frac or "0")[:6].ljust(6, "0"))
    if tz and tz.upper() != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        dt -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return int(dt.timestamp()) * 1_000_000 + micros


def columns_of(e: Entity) -> dict[str, str]:
    """Record field name -> column for the fields this entity can filter and sort on cheaply."""
    d = e.d
    cols = {d.ts_field: "modified"}
    if d.created_field:
        cols[d.created_field] = "created"
    if d.id_field:
        cols[d.id_field] = "id"
        cols["id"] = "id"
        cols["Id"] = "id"
    return cols


def parse_query(params: dict[str, str], e: Entity, odata: bool = True) -> Query:
    """Read the ``$`` options of a request (non-OData endpoints ignore them, as the API does)."""
    if not odata:
        return Query(top=None)
    q = Query()
    cols = columns_of(e)
    if "$top" in params:
        q.top = _int_option("$top", params["$top"])
        if q.top > MAX_TOP:
            raise ODataError(f"$top={q.top} exceeds the maximum of {MAX_TOP}: page with $top<={MAX_TOP} and $skip")
    if "$skip" in params:
        q.skip = _int_option("$skip", params["$skip"])
    if "$count" in params:
        v = params["$count"].strip().lower()
        if v not in ("true", "false"):
            raise ODataError(f"$count must be true or false, got {params['$count']!r}")
        q.count = v == "true"
    if params.get("$inlinecount", "").strip().lower() == "allpages":  # OData v3 spelling
        q.count = True
    text = params.get("$filter", "").strip()
    if text:
        q.filter_text = text
        for part in _AND_RE.split(text):
            m = _COND_RE.match(part.strip())
            if not m:
                raise ODataError(
                    f"cannot parse $filter clause {part.strip()!r}: use '<field> <gt|ge|lt|le|eq|ne> <value>' "
                    "joined with 'and'")
            name, op, lit = m.group(1), m.group(2).lower(), m.group(3)
            col = cols.get(name)
            if col is None:
                raise ODataError(
                    f"$filter on {name!r} is not supported for this endpoint: filter on "
                    + ", ".join(sorted(k for k in cols if k != "Id" or e.d.id_field == "Id")))
            if col == "id":
                try:
                    value = int(lit.strip().strip("'"))
                except ValueError:
                    raise ODataError(f"$filter value {lit!r} for {name} is not an integer") from None
            else:
                value = parse_timestamp(lit)
            q.filters.append(Cond(col, op, value))
    text = params.get("$orderby", "").strip()
    if text:
        q.orderby_text = text
        for part in text.split(","):
            bits = part.split()
            if not bits or len(bits) > 2 or (len(bits) == 2 and bits[1].lower() not in ("asc", "desc")):
                raise ODataError(f"cannot parse $orderby {part.strip()!r}: use '<field> [asc|desc]'")
            name = bits[0]
            desc = len(bits) == 2 and bits[1].lower() == "desc"
            q.orderby.append((cols.get(name, name), desc))
    return q


def _int_option(name: str, value: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ODataError(f"{name} must be a non-negative integer, got {value!r}") from None
    if n < 0:
        raise ODataError(f"{name} must be a non-negative integer, got {value!r}")
    return n


class QueryEngine:
    """Evaluates queries over an entity scope (all records, or one parent's children)."""

    def __init__(self, model: DataModel, cache_size: int = 8):
        self.model = model
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.cache_size = cache_size

    def scope(self, e: Entity, parent: int | None) -> np.ndarray:
        """Indices of the live records in scope, in default (id) order."""
        if parent is None:
            idx = np.arange(e.n_total, dtype=np.int64)
        else:
            assert e.offsets is not None and e.counts is not None
            if parent < len(e.counts):
                lo, hi = int(e.offsets[parent]), int(e.offsets[parent + 1])
            else:
                lo = hi = 0
            ins = e.ins_by_parent.get(parent)
            idx = np.arange(lo, hi, dtype=np.int64)
            if ins:
                idx = np.concatenate((idx, np.asarray(ins, dtype=np.int64)))
        if e.alive is not None:
            idx = idx[e.alive[idx]]
        return idx

    def run(self, e: Entity, parent: int | None, q: Query) -> tuple[int, np.ndarray]:
        """(total matching, indices of the requested page)."""
        if not q.filters and q.default_order and e.alive is None:
            total, page = self._fast(e, parent, q)
            if page is not None:
                return total, page
        key = (e.name, parent, e.version, q.filter_text, q.orderby_text)
        idx = self._cache.get(key)
        if idx is None:
            idx = self._evaluate(e, parent, q)
            if len(idx) >= _CACHE_MIN:
                self._cache[key] = idx
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        end = len(idx) if q.top is None else q.skip + q.top
        return len(idx), idx[q.skip:end]

    def _fast(self, e: Entity, parent: int | None, q: Query) -> tuple[int, np.ndarray | None]:
        """Default order, no filter, nothing deleted: the page is an index range (no scan)."""
        if parent is None:
            total = e.n_total
            lo, n_base_scope, ins = 0, total, None
        else:
            assert e.offsets is not None and e.counts is not None
            if parent < len(e.counts):
                lo, hi = int(e.offsets[parent]), int(e.offsets[parent + 1])
            else:
                lo = hi = 0
            ins = e.ins_by_parent.get(parent)
            n_base_scope = hi - lo
            total = n_base_scope + (len(ins) if ins else 0)
        start = min(q.skip, total)
        end = total if q.top is None else min(total, q.skip + q.top)
        if end <= n_base_scope:
            return total, np.arange(lo + start, lo + end, dtype=np.int64)
        if ins is None:
            return total, np.arange(lo + start, lo + end, dtype=np.int64)
        return total, None

    def _evaluate(self, e: Entity, parent: int | None, q: Query) -> np.ndarray:
        idx = self.scope(e, parent)
        for c in q.filters:
            col = self._column(e, c.column, idx)
            if c.column != "id":
                col = col * 1000  # ms -> µs, the literal's unit
            idx = idx[_compare(col, c.op, c.value)]
        if not q.default_order:
            idx = self._order(e, idx, q.orderby)
        return idx

    def _column(self, e: Entity, column: str, idx: np.ndarray) -> np.ndarray:
        if column == "modified":
            return e.modified[idx]
        if column == "created":
            return e.created[idx]
        return e.d.id_base + idx

    def _order(self, e: Entity, idx: np.ndarray, orderby: list[tuple[str, bool]]) -> np.ndarray:
        if all(f in ("modified", "created", "id") for f, _ in orderby):
            keys = [idx]  # last resort key: the index (= id order)
            for f, desc in reversed(orderby):
                col = self._column(e, f, idx)
                keys.append(-col if desc else col)
            order = np.lexsort(tuple(keys))  # the last key is the primary one
            return idx[order]
        if len(idx) > MAX_MATERIALISED_SORT:
            raise ODataError(
                f"$orderby on {', '.join(f for f, _ in orderby)} is only supported for up to "
                f"{MAX_MATERIALISED_SORT} records; order by the id or the timestamp fields instead")
        records = self.model.build(e, idx, refs=False)
        positions = list(range(len(idx)))
        for f, desc in reversed(orderby):
            vals = [_sort_value(r.get(f) if isinstance(r, dict) else r) for r in records]
            positions.sort(key=vals.__getitem__, reverse=desc)
        return idx[np.asarray(positions, dtype=np.int64)]


def _sort_value(v: object) -> tuple[int, object]:
    if v is None:
        return (0, 0)
    if isinstance(v, bool | int | float):
        return (1, v)
    return (2, str(v))


def _compare(col: np.ndarray, op: str, value: int) -> np.ndarray:
    if op == "gt":
        return col > value
    if op == "ge":
        return col >= value
    if op == "lt":
        return col < value
    if op == "le":
        return col <= value
    if op == "eq":
        return col == value
    return col != value
