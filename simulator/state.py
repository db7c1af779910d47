"""Change over time: the simulated clock and the mutation overlay (modify / insert / delete).

Everything is deterministic given the seed and the sequence of admin calls: call number ``seq``
draws its choices from a generator seeded by (seed, "mutation", seq), never from wall time.

Timestamps: the clock starts at 2025-12-01T00:00:00Z and moves only when told to
(``advance``) or by a mutation: a mutation stamps its records inside ``[clock, clock + spread)``
and then moves the clock to ``clock + spread``, so a later mutation is always strictly newer
(an incremental load with ``gt <last watermark>`` sees it) while records changed by one call
may share a millisecond, as bulk updates do in real systems.

Deletes do not cascade: a deleted parent answers 404 on its sub-endpoints, its children stay in
top-level listings (``/patient-visits/odata``), exactly like the ground truth reports them.

``touch_parents``: whether Clinical Conductor moves a parent's ``modifiedDate`` when one of its
children changes is not known (verify on the real API). By default the simulator assumes it does
not -- the worst case for an extractor that only re-asks changed parents. With
``touch_parents=true`` a mutation also stamps every ancestor of the changed records (patient-visit
element -> patient visit -> subject -> study) with the change's time, which is what the
extractor's ``changed`` fan-out policy relies on (docs/extraction.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator.data import CLOCK_START_MS, DataModel, Entity, key_of
from simulator.values import EPOCH, ValueFactory, iso

#: Records returned inline by a mutation answer (ids are always returned in full).
MAX_RETURNED_RECORDS = 10_000


class MutationError(ValueError):
    """A mutation request that cannot be applied (answered with 400)."""


@dataclass
class MutationResult:
    entity: str
    seq: int
    clock: str
    modified: list[Any] = field(default_factory=list)
    inserted: list[Any] = field(default_factory=list)
    deleted: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"entity": self.entity, "seq": self.seq, "clock": self.clock, "modified": self.modified,
                "inserted": self.inserted, "deleted": self.deleted,
                "counts": {"modified": len(self.modified), "inserted": len(self.inserted),
                           "deleted": len(self.deleted)}}


class SimState:
    """The simulated clock and every mutation applied so far."""

    def __init__(self, model: DataModel):
        self.model = model
        self.clock_ms = CLOCK_START_MS
        self.seq = 0
        self.log: list[dict[str, Any]] = []

    @property
    def clock_iso(self) -> str:
        return _iso_ms(self.clock_ms)

    def advance(self, seconds: float) -> str:
        if seconds < 0:
            raise MutationError("the clock only moves forward: seconds must be >= 0")
        self.clock_ms += int(round(seconds * 1000))
        self.log.append({"op": "advance", "seconds": seconds})
        return self.clock_iso

    # -- mutations ----------------------------------------------------------------------------
    def mutate(self, entity: str, *, modify: float = 0.0, insert: float = 0.0, delete: float = 0.0,
               modify_count: int | None = None, insert_count: int | None = None, delete_count: int | None = None,
               modify_ids: list[int] | None = None, delete_ids: list[int] | None = None,
               parent_id: int | None = None, spread_ms: int = 1000, touch_parents: bool = False) -> MutationResult:
        """Delete, then modify, then insert records of ``entity``; return what changed."""
        try:
            e = self.model.entity(entity)
        except KeyError:
            raise MutationError(f"unknown entity {entity!r}: see GET /_sim/entities") from None
        for name, v in (("modify", modify), ("insert", insert), ("delete", delete)):
            if not 0.0 <= v <= 1.0:
                raise MutationError(f"{name} is a fraction of the live records: 0 <= {name} <= 1, got {v}")
        if spread_ms < 1:
            raise MutationError("spread_ms must be >= 1")
        if (modify or modify_count or modify_ids) and e.d.mutable is None:
            raise MutationError(f"entity {entity!r} has no field to modify (plain values): insert or delete instead")
        if (insert or insert_count) and not e.d.insertable:
            raise MutationError(
                f"entity {entity!r} cannot take inserts: its key is made of references to other records "
                "(a new one could collide); modify or delete instead")
        if (modify_ids or delete_ids) and e.d.id_field is None:
            raise MutationError(f"entity {entity!r} has no id field: use fractions or counts")
        self.seq += 1
        rng = np.random.default_rng(key_of(self.model.seed, "mutation", self.seq))
        res = MutationResult(entity=entity, seq=self.seq, clock="")
        start = self.clock_ms
        live = self._live(e)
        # delete
        chosen_del = self._choose(e, rng, live, delete, delete_count, delete_ids, "delete")
        if len(chosen_del):
            res.deleted = self._describe(e, chosen_del)
            if e.alive is None:
                e.alive = np.ones(e.n_total, dtype=bool)
            e.alive[chosen_del] = False
            e.n_deleted += len(chosen_del)
            live = live[e.alive[live]]
        # modify
        chosen_mod = self._choose(e, rng, live, modify, modify_count, modify_ids, "modify")
        if len(chosen_mod):
            stamps = start + np.sort(rng.integers(0, spread_ms, len(chosen_mod)))
            self._modify(e, chosen_mod, stamps)
            res.modified = self._describe(e, chosen_mod)
        # insert
        n_ins = insert_count if insert_count is not None else _fraction_count(insert, len(live))
        if n_ins:
            stamps = start + np.sort(rng.integers(0, spread_ms, n_ins))
            new = self._insert(e, rng, n_ins, parent_id, stamps)
            res.inserted = self._describe(e, new)
        if len(chosen_del) or len(chosen_mod) or n_ins:
            e.version += 1
        if touch_parents and e.parent is not None:
            changed = [chosen_del, chosen_mod] + ([new] if n_ins else [])
            idx = np.concatenate(changed) if changed else np.zeros(0, dtype=np.int64)
            if len(idx):
                self._touch_ancestors(e, idx, start + spread_ms - 1)
        self.clock_ms = start + spread_ms
        res.clock = self.clock_iso
        self.log.append({"op": "mutate", "entity": entity, "seq": self.seq, "modified": len(res.modified),
                         "inserted": len(res.inserted), "deleted": len(res.deleted)})
        return res

    def _touch_ancestors(self, e: Entity, idx: np.ndarray, stamp_ms: int) -> None:
        """Stamp the parents (and their parents, ...) of ``e``'s records ``idx`` with ``stamp_ms``."""
        child = e
        while child.parent is not None and len(idx):
            parent = child.parent
            pidx = self.model.parent_of(child, idx)
            pidx = np.unique(pidx[pidx >= 0])
            if not len(pidx):
                return
            parent.modified[pidx] = np.maximum(parent.modified[pidx], stamp_ms)
            parent.version += 1
            child, idx = parent, pidx

    def _live(self, e: Entity) -> np.ndarray:
        idx = np.arange(e.n_total, dtype=np.int64)
        return idx if e.alive is None else idx[e.alive]

    def _choose(self, e: Entity, rng: np.random.Generator, live: np.ndarray, frac: float, count: int | None,
                ids: list[int] | None, what: str) -> np.ndarray:
        if ids:
            out = []
            for i in ids:
                k = e.index_of_id(int(i))
                if k < 0:
                    raise MutationError(f"cannot {what} {e.name} id {i}: no live record has it")
                out.append(k)
            return np.unique(np.asarray(out, dtype=np.int64))
        n = count if count is not None else _fraction_count(frac, len(live))
        if n < 0:
            raise MutationError(f"{what}_count must be >= 0")
        n = min(n, len(live))
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        return np.sort(rng.choice(live, size=n, replace=False))

    def _describe(self, e: Entity, idx: np.ndarray) -> list[Any]:
        if e.d.id_field:
            return (e.d.id_base + idx).tolist()
        return self.model.build(e, idx[:MAX_RETURNED_RECORDS])

    def _modify(self, e: Entity, idx: np.ndarray, stamps: np.ndarray) -> None:
        d = e.d
        assert d.mutable is not None
        top, _, sub = d.mutable.partition(".")
        if top in d.key_fields:
            raise MutationError(f"entity {e.name!r}: the mutable field {top!r} is part of the key")
        records = self.model.build(e, idx)
        props = self.model.definitions[d.definition]["properties"] if d.definition else {}
        schema = props.get(top, {})
        if sub:
            ref = schema.get("$ref", "").rsplit("/", 1)[-1]
            schema = self.model.definitions.get(ref, {}).get("properties", {}).get(sub, {})
        vf = self.model.values
        for i, rec, stamp in zip(idx.tolist(), records, stamps.tolist(), strict=True):
            rng = random.Random(key_of(self.model.seed, "modify", self.seq, i))
            if sub:
                cur = dict(rec.get(top) or {})
                cur[sub] = _changed(vf, sub, schema, cur.get(sub), rng, self.seq, stamp)
                new: Any = cur
            else:
                new = _changed(vf, top, schema, rec.get(top), rng, self.seq, stamp)
            e.overrides.setdefault(i, {})[top] = new
        e.modified[idx] = stamps

    def _insert(self, e: Entity, rng: np.random.Generator, n: int, parent_id: int | None,
                stamps: np.ndarray) -> np.ndarray:
        parents = None
        if e.parent is not None:
            p = e.parent
            if parent_id is not None:
                pi = p.index_of_id(int(parent_id))
                if pi < 0:
                    raise MutationError(f"parent {p.name} id {parent_id} does not exist")
                parents = np.full(n, pi, dtype=np.int64)
            else:
                plive = self._live(p)
                if len(plive) == 0:
                    raise MutationError(f"no live {p.name} to attach new {e.name} to")
                parents = rng.choice(plive, size=n, replace=True)
        return self.insert_at(e, parents, stamps)

    # -- targeted changes (simulator.activity) ------------------------------------------------
    def insert_at(self, e: Entity, parents: np.ndarray | None, stamps: np.ndarray) -> np.ndarray:
        """Append ``len(stamps)`` records of ``e`` (under ``parents``, indices) created at ``stamps``."""
        n = len(stamps)
        first = e.n_total
        new = np.arange(first, first + n, dtype=np.int64)
        if e.parent is not None:
            assert parents is not None and len(parents) == n
            assert e.counts is not None  # a child entity has its per-parent counts
            for i, pi in zip(new.tolist(), np.asarray(parents, dtype=np.int64).tolist(), strict=True):
                base = int(e.counts[pi]) if pi < len(e.counts) else 0
                lst = e.ins_by_parent.setdefault(pi, [])
                e.ins_pos.append(base + len(lst))
                lst.append(i)
                e.ins_parent.append(pi)
        else:
            e.ins_parent.extend([-1] * n)
            e.ins_pos.extend([0] * n)
        e.created = np.concatenate((e.created, stamps.astype(np.int64)))
        e.modified = np.concatenate((e.modified, stamps.astype(np.int64)))
        if e.alive is not None:
            e.alive = np.concatenate((e.alive, np.ones(n, dtype=bool)))
        if n:
            e.version += 1
        return new

    def set_fields(self, e: Entity, idx: int, values: dict[str, Any], stamp_ms: int) -> None:
        """Give record ``idx`` of ``e`` these field values, changed at ``stamp_ms`` (its timestamp moves)."""
        if values:
            e.overrides.setdefault(int(idx), {}).update(values)
        e.modified[idx] = max(int(e.modified[idx]), int(stamp_ms))
        e.version += 1

    def touch_ancestors(self, e: Entity, idx: np.ndarray, stamp_ms: int) -> None:
        self._touch_ancestors(e, idx, stamp_ms)


def _fraction_count(frac: float, live: int) -> int:
    if frac <= 0 or live == 0:
        return 0
    return max(1, int(round(frac * live)))


def _iso_ms(ms: int) -> str:
    from datetime import UTC, datetime

    return iso(datetime.fromtimestamp(ms / 1000, tz=UTC))


def _changed(vf: ValueFactory, name: str, schema: dict[str, Any], current: Any, rng: random.Random, seq: int,
             stamp_ms: int) -> Any:
    """A new value for a field, guaranteed to differ from the current one."""
    if "enum" in schema and len(schema["enum"]) > 1:
        return rng.choice([v for v in schema["enum"] if v != current])
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 1
    if isinstance(current, float):
        return round(current * 1.1 + 1.0, 2)
    if schema.get("format") == "date-time":
        return _iso_ms(stamp_ms)
    if isinstance(current, str) or schema.get("type") == "string":
        return f"{vf.value(name, schema, rng) if schema else 'value'} (rev {seq})"
    for _ in range(5):
        new = vf.value(name, schema, rng) if schema else None
        if new != current:
            return new
    if isinstance(current, list):
        return [*current, vf.value(name, schema.get("items", {}), rng)] if schema else [*current, None]
    return {"revision": seq, "previous": current}


__all__ = ["EPOCH", "MutationError", "MutationResult", "SimState"]
