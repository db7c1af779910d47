"""Deterministic, lazy Clinical Conductor data: every record is a pure function of
(seed, entity, index), plus the overlay of mutations made through the admin API.

Why lazy and columnar: scale 1.0 is ~6 M records (2.3 M patient visits alone). Materialising them
as Python dicts would take many GiB; instead each entity keeps only numpy columns that queries need
(created/modified timestamps, the per-parent child offsets, a liveness mask once something is
deleted) and builds the JSON records of a page on demand:

* a small pool of *variants* per entity (full records generated once from the spec definition by
  :mod:`simulator.values`) gives realistic field values;
* per record, the id, uid, timestamps, parent references and a few entity-specific fields are
  computed vectorised over the page's indices and laid over a variant chosen by the record's hash.

Child entities are laid out contiguously per parent (``offsets``), so a parent's children are an
index range and a child's parent is one ``searchsorted`` away. Entities and their hooks are
declared in :mod:`simulator.model`.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator.values import EPOCH, ValueFactory

M64 = 0xFFFFFFFFFFFFFFFF
GOLDEN = 0x9E3779B97F4A7C15
#: Variants per entity: enough for varied pages, small enough to build in milliseconds.
VARIANTS = 64
#: The simulated clock starts here; base data lies in the six years before it.
CLOCK_START_MS = int(EPOCH.timestamp() * 1000)
DAY_MS = 86_400_000
_SPAN_MS = 6 * 365 * DAY_MS

_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash (identical to :func:`mix_np`)."""
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def mix_np(x: np.ndarray) -> np.ndarray:
    """Vectorised :func:`mix64` over a uint64 array (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> _S30
    x *= _C1
    x ^= x >> _S27
    x *= _C2
    x ^= x >> _S31
    return x


def key_of(seed: int, *parts: str | int) -> int:
    """A 64-bit stream key for (seed, parts...): independent streams per entity and purpose."""
    k = mix64(seed * GOLDEN + 0x1234567)
    for p in parts:
        k = mix64(k ^ (zlib.crc32(p.encode()) if isinstance(p, str) else p))
    return k


def unit(h: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from hashes."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def fmt_ts(ms: np.ndarray) -> list[str]:
    """Epoch milliseconds -> ISO-8601 UTC strings with milliseconds and ``Z``."""
    if len(ms) == 0:
        return []
    return np.datetime_as_string(ms.astype("datetime64[ms]"), unit="ms", timezone="UTC").tolist()


def uuids(h: np.ndarray) -> list[str]:
    """Deterministic version-4-looking UUIDs from record hashes."""
    hi = h.tolist()
    lo = mix_np(h ^ np.uint64(0x5851F42D4C957F2D)).tolist()
    out = []
    for a, b in zip(hi, lo, strict=True):
        s = f"{a:016x}{b:016x}"
        out.append(f"{s[:8]}-{s[8:12]}-4{s[13:16]}-a{s[17:20]}-{s[20:]}")
    return out


def allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` children over parents proportionally to ``weights`` (exact sum)."""
    counts = np.zeros(len(weights), dtype=np.int64)
    s = float(weights.sum())
    if total <= 0 or s <= 0:
        return counts
    raw = weights * (total / s)
    counts = np.floor(raw).astype(np.int64)
    rest = total - int(counts.sum())
    if rest > 0:
        order = np.argsort(-(raw - counts), kind="stable")[:rest]
        counts[order] += 1
    return counts


Columns = dict[str, list[Any]]
Hook = Callable[["DataModel", "Entity", np.ndarray, np.ndarray, "np.ndarray | None"], Columns]


@dataclass(frozen=True)
class EntityDef:
    """How one CC entity is generated. See simulator/model.py for the catalogue."""

    name: str
    definition: str | None  # spec definition; None for plain-string lists
    count: int = 0  # records at scale 1.0 (top-level, or in total over all parents)
    parent: str | None = None
    zero_frac: float = 0.0  # share of parents that get no children
    parent_mask: Callable[[DataModel], np.ndarray] | None = None  # only these parents get children
    derived: Callable[[DataModel, Entity], np.ndarray] | None = None  # per-parent counts, if not allocated
    id_field: str | None = "id"
    id_base: int = 1
    ts_field: str = "modifiedDate"
    created_field: str | None = "createdDate"
    scalars: Hook | None = None  # cheap per-record fields (also used for previews)
    refs: Hook | None = None  # nested references to other entities (pages only)
    fixed: dict[str, Any] = field(default_factory=dict)
    mutable: str | None = None  # field (dotted for nested) a 'modify' changes
    insertable: bool = True
    strings: tuple[str, ...] | None = None  # vocabulary for plain-string lists
    singleton: bool = False
    min_count: int = 5
    key_fields: tuple[str, ...] = ()  # top-level fields of the primary key (never modified)
    #: adjusts the base created/modified columns in place once the layout exists (records whose
    #: timestamps follow their clinical course, e.g. a subject modified at its last status event)
    timestamps: Callable[[DataModel, Entity], None] | None = None


class Entity:
    """Runtime state of one entity: base layout, columns and the mutation overlay."""

    def __init__(self, model: DataModel, d: EntityDef):
        self.d = d
        self.name = d.name
        self.model = model
        self.key = key_of(model.seed, "entity", d.name)
        self.parent: Entity | None = model.entity(d.parent) if d.parent else None
        self.n_base: int  # base records (before mutations), set below
        self.counts: np.ndarray | None = None
        self.offsets: np.ndarray | None = None
        if self.parent is not None:
            p = self.parent
            if d.derived is not None:
                counts = d.derived(model, self).astype(np.int64)
            else:
                total = model.scaled(d.count, d.min_count)
                ph = model.hash(p, np.arange(p.n_base, dtype=np.int64))
                u = unit(mix_np(ph ^ np.uint64(self.key)))
                w = 1.0 + 9.0 * unit(mix_np(ph ^ np.uint64(self.key ^ 0xA5A5))) ** 3
                w[u < d.zero_frac] = 0.0
                if d.parent_mask is not None:
                    w = w * d.parent_mask(model)
                if w.sum() == 0:  # tiny scales: make sure someone gets the children
                    w = np.ones(p.n_base)
                counts = allocate(total, w)
            self.counts = counts
            self.offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
            self.n_base = int(self.offsets[-1])
        elif d.singleton:
            self.n_base = 1
        elif d.strings is not None:
            self.n_base = model.scaled(d.count or len(d.strings), d.min_count)
        else:
            self.n_base = model.scaled(d.count, d.min_count)
        self.created, self.modified = self._base_timestamps()
        if d.timestamps is not None:
            d.timestamps(model, self)
        self.alive: np.ndarray | None = None  # None = nothing deleted
        self.n_deleted = 0
        self.ins_parent: list[int] = []
        self.ins_pos: list[int] = []
        self.ins_by_parent: dict[int, list[int]] = {}
        self.overrides: dict[int, dict[str, Any]] = {}
        self.version = 0
        self._variants: list[dict[str, Any]] | None = None
        self.uid_field = self._uid_field()

    # -- layout -----------------------------------------------------------------------------
    @property
    def n_total(self) -> int:
        return self.n_base + len(self.ins_parent)

    @property
    def n_live(self) -> int:
        return self.n_total - self.n_deleted

    def _uid_field(self) -> str | None:
        if not self.d.definition:
            return None
        props = self.model.definitions[self.d.definition].get("properties", {})
        for f in ("uid", "Uid", "UID"):
            if f in props:
                return f
        return None

    def _base_timestamps(self) -> tuple[np.ndarray, np.ndarray]:
        """created/modified epoch ms: created grows with the index (newer records have higher
        ids) with ±15 days of noise; modified lies between created and the clock start, skewed
        towards created (most records change soon after they are made)."""
        n = self.n_base
        i = np.arange(n, dtype=np.int64)
        h = self.model.hash(self, i)
        u1 = unit(mix_np(h ^ np.uint64(0x1111)))
        u2 = unit(mix_np(h ^ np.uint64(0x2222)))
        start = CLOCK_START_MS - _SPAN_MS
        end = CLOCK_START_MS - 3_600_000
        created = start + (i / max(n, 1)) * (_SPAN_MS * 0.97) + (u1 - 0.5) * (30 * DAY_MS)
        created = np.clip(created, start, end - 1000).astype(np.int64)
        modified = (created + (u2 ** 3) * (end - created)).astype(np.int64)
        return created, modified

    @property
    def variants(self) -> list[dict[str, Any]]:
        if self._variants is None:
            self._variants = self.model.make_variants(self)
        return self._variants

    # -- overlay ----------------------------------------------------------------------------
    def is_alive(self, idx: int) -> bool:
        if idx < 0 or idx >= self.n_total:
            return False
        return self.alive is None or bool(self.alive[idx])

    def live_mask(self, idx: np.ndarray) -> np.ndarray:
        if self.alive is None:
            return np.ones(len(idx), dtype=bool)
        return self.alive[idx]

    def index_of_id(self, record_id: int) -> int:
        """The index of the record with this id, or -1 (no id field, unknown or deleted)."""
        if self.d.id_field is None:
            return -1
        i = record_id - self.d.id_base
        return i if self.is_alive(i) else -1

    def ids(self, idx: np.ndarray) -> np.ndarray:
        return self.d.id_base + idx


class DataModel:
    """All entities for one (seed, scale): lazily initialised, then queried by the server."""

    def __init__(self, seed: int, scale: float, definitions: dict[str, Any], defs: list[EntityDef]):
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.seed = seed
        self.scale = scale
        self.definitions = definitions
        self.defs = {d.name: d for d in defs}
        self.values = ValueFactory(definitions)
        self._entities: dict[str, Entity] = {}
        self._initialising: set[str] = set()
        self._plans: dict[tuple[str, str], list[tuple[str, str | None, Any]]] = {}
        #: derived per-model data shared by several entities (simulator.clinical's plans)
        self.cache: dict[str, Any] = {}

    # -- entities ---------------------------------------------------------------------------
    def entity(self, name: str) -> Entity:
        e = self._entities.get(name)
        if e is not None:
            return e
        if name not in self.defs:
            raise KeyError(f"unknown entity {name!r}")
        if name in self._initialising:
            raise RuntimeError(f"entity {name!r} depends on itself")
        self._initialising.add(name)
        try:
            e = Entity(self, self.defs[name])
        finally:
            self._initialising.discard(name)
        self._entities[name] = e
        return e

    def warm(self) -> None:
        """Initialise every entity and its variants (the server does this before it is ready)."""
        for name in self.defs:
            _ = self.entity(name).variants

    def scaled(self, count: int, min_count: int) -> int:
        return max(min(count, min_count), int(round(count * self.scale)))

    # -- hashing ----------------------------------------------------------------------------
    def hash(self, e: Entity, idx: np.ndarray) -> np.ndarray:
        return mix_np(np.uint64(e.key) + idx.astype(np.uint64) * np.uint64(GOLDEN))

    @staticmethod
    def sub(h: np.ndarray, salt: int) -> np.ndarray:
        """An independent hash stream derived from record hashes."""
        return mix_np(h ^ np.uint64(mix64(salt)))

    def pick(self, target: str, h: np.ndarray, salt: int) -> np.ndarray:
        """A hash-chosen base record of ``target`` per hash (uniform)."""
        t = self.entity(target)
        return (self.sub(h, salt) % np.uint64(max(t.n_base, 1))).astype(np.int64)

    # -- parent/child -----------------------------------------------------------------------
    def parent_of(self, e: Entity, idx: np.ndarray) -> np.ndarray:
        assert e.offsets is not None
        base = idx < e.n_base
        out = np.searchsorted(e.offsets, idx, side="right").astype(np.int64) - 1
        if not base.all():
            ins = np.asarray(e.ins_parent, dtype=np.int64)
            out[~base] = ins[idx[~base] - e.n_base]
        return out

    def position(self, e: Entity, idx: np.ndarray, parent: np.ndarray) -> np.ndarray:
        """Position of each child within its parent's children (0-based)."""
        assert e.offsets is not None
        base = idx < e.n_base
        safe_parent = np.where(base, parent, 0)
        out = idx - e.offsets[safe_parent]
        if not base.all():
            pos = np.asarray(e.ins_pos, dtype=np.int64)
            out[~base] = pos[idx[~base] - e.n_base]
        return out

    def child_count(self, child: str, pidx: np.ndarray) -> np.ndarray:
        """Base children per parent index (0 for -1 or inserted parents)."""
        c = self.entity(child)
        assert c.counts is not None
        ok = (pidx >= 0) & (pidx < len(c.counts))
        return np.where(ok, c.counts[np.where(ok, pidx, 0)], 0)

    def child_at(self, child: str, pidx: np.ndarray, j: np.ndarray) -> np.ndarray:
        """The j-th base child of each parent, or -1 when it has fewer than j+1."""
        c = self.entity(child)
        assert c.offsets is not None and c.counts is not None
        n = self.child_count(child, pidx)
        ok = (j >= 0) & (j < n)
        return np.where(ok, c.offsets[np.where(pidx >= 0, np.minimum(pidx, len(c.counts)), 0)] + j, -1)

    def child_pick(self, child: str, pidx: np.ndarray, h: np.ndarray, salt: int) -> np.ndarray:
        """A hash-chosen base child of each parent, or -1 when it has none."""
        n = self.child_count(child, pidx)
        j = (self.sub(h, salt) % np.maximum(n, 1).astype(np.uint64)).astype(np.int64)
        return np.where(n > 0, self.child_at(child, pidx, j), -1)

    # -- records ----------------------------------------------------------------------------
    def make_variants(self, e: Entity) -> list[dict[str, Any]]:
        d = e.d
        if d.definition is None:
            return []
        out = []
        for v in range(VARIANTS):
            rng = random.Random(key_of(self.seed, "variant", d.name, v))
            rec = self.values.record(d.definition, rng)
            rec.update(d.fixed)
            if d.created_field:
                rec[d.created_field] = None
            rec[d.ts_field] = None
            out.append(rec)
        return out

    def build(self, e: Entity, idx: np.ndarray, refs: bool = True) -> list[Any]:
        """The JSON-ready records at these indices (current state, overlay applied)."""
        n = len(idx)
        if n == 0:
            return []
        idx = idx.astype(np.int64, copy=False)
        d = e.d
        if d.strings is not None:
            return [self.string_value(e, i) for i in idx.tolist()]
        h = self.hash(e, idx)
        vi = (h % np.uint64(VARIANTS)).tolist()
        cols: Columns = {}
        if d.id_field:
            cols[d.id_field] = (d.id_base + idx).tolist()
        if e.uid_field:
            cols[e.uid_field] = uuids(h)
        if d.created_field:
            cols[d.created_field] = fmt_ts(e.created[idx])
        cols[d.ts_field] = fmt_ts(e.modified[idx])
        parent = self.parent_of(e, idx) if e.parent is not None else None
        if d.scalars is not None:
            cols.update(d.scalars(self, e, idx, h, parent))
        if refs and d.refs is not None:
            cols.update(d.refs(self, e, idx, h, parent))
        variants = e.variants
        keys = list(cols)
        out = []
        for j, row in enumerate(zip(*cols.values(), strict=True)):
            r = variants[vi[j]].copy()
            r.update(zip(keys, row, strict=True))
            out.append(r)
        if e.overrides:
            ov = e.overrides
            for j, i in enumerate(idx.tolist()):
                o = ov.get(i)
                if o:
                    out[j].update(o)
        return out

    def string_value(self, e: Entity, i: int) -> str:
        vocab = e.d.strings or ()
        if i < len(vocab):
            return vocab[i]
        return f"CustomList{i + 1}"

    def previews(self, target: str, tidx: np.ndarray, definition: str) -> list[dict[str, Any] | None]:
        """Preview objects (``StudyPreviewModel`` ...) of target records, None where tidx is -1."""
        t = self.entity(target)
        out: list[dict[str, Any] | None] = [None] * len(tidx)
        valid = tidx >= 0
        if not valid.any():
            return out
        uniq, inv = np.unique(tidx[valid], return_inverse=True)
        plan = self._plan(t, definition)
        proj = []
        for rec in self.build(t, uniq, refs=False):
            proj.append({k: (rec.get(src) if src is not None else const) for k, src, const in plan})
        for p, k in zip(np.nonzero(valid)[0].tolist(), inv.tolist(), strict=True):
            out[p] = proj[k]
        return out

    def _plan(self, t: Entity, definition: str) -> list[tuple[str, str | None, Any]]:
        """How to fill each field of a preview definition from the target's full record."""
        key = (t.name, definition)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        sample = t.variants[0] if t.variants else {}
        fields = set(sample) | {t.d.id_field, t.uid_field, t.d.ts_field, t.d.created_field} - {None}
        lower = {f.lower(): f for f in fields if f}
        rng = random.Random(key_of(self.seed, "preview", t.name, definition))
        const = self.values.record(definition, rng, depth=1)
        plan = []
        props = self.definitions[definition].get("properties", {})
        for k in props:
            src = k if k in fields else lower.get(k.lower())
            if src is None and k.lower() == "name":
                src = next((f for f in NAME_FALLBACKS if f in fields), None)
            plan.append((k, src, const.get(k)))
        for k, src in PREVIEW_EXTRA.get(definition, {}).items():
            plan.append((k, src if src in fields else lower.get(src.lower()), None))
        self._plans[key] = plan
        return plan


#: Where a preview's ``name`` comes from when the full record has none.
NAME_FALLBACKS = ("name", "Name", "displayName", "providerName", "title", "TypeName", "visitName",
                  "screeningNumber", "invoiceName", "fullName")
#: Fields added to previews beyond the spec: the catalog keys subject statuses by ``subject.id``,
#: while the spec's SubjectPreviewModel spells it ``Id``; both are served.
PREVIEW_EXTRA: dict[str, dict[str, str]] = {"SubjectPreviewModel": {"id": "id"}}
