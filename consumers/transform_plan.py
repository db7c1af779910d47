"""Which Silver/Gold procedures a finished Bronze table triggers, and in which order.

The registry lives in the database (``etl.dw_transform_procedures``, written by migration 0304)
so SQL entry points and this consumer agree on one dependency graph. A procedure is triggered when
one of its ``source_tables`` finished a run, or when a procedure it ``depends_on`` runs in the same
batch (dims before facts, facts before the gold refresh: a changed dimension can resolve facts that
were waiting for it, and a changed fact must reach the materialized view). Order is ``run_order``.

Pure Python apart from :meth:`TransformPlan.load`; unit-tested without a database.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

PROCEDURE_RE = re.compile(r"^(silver|gold)\.[a-z_][a-z0-9_]{0,62}$")


class UnknownProcedure(ValueError):
    """A procedure name that is not in the registry; the message lists the known ones."""


@dataclass(frozen=True)
class Procedure:
    name: str  # schema-qualified, e.g. silver.load_dim_studies
    target_table: str
    layer: str
    run_order: int
    source_tables: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    is_active: bool = True

    def __post_init__(self) -> None:
        if not PROCEDURE_RE.match(self.name):
            raise ValueError(f"procedure name {self.name!r} is not schema.name in silver/gold")

    @property
    def schema(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def short_name(self) -> str:
        return self.name.split(".", 1)[1]

    def call_sql(self) -> sql.Composed:
        """``CALL schema.name()`` with both parts quoted: the name came from a table, not from code."""
        return sql.SQL("CALL {}.{}()").format(sql.Identifier(self.schema), sql.Identifier(self.short_name))


class TransformPlan:
    """The registry as a dependency graph."""

    def __init__(self, procedures: Iterable[Procedure]):
        procs = [p for p in procedures if p.is_active]
        self._by_name = {p.name: p for p in procs}
        self.procedures = sorted(procs, key=lambda p: (p.run_order, p.name))
        for p in self.procedures:
            for d in p.depends_on:
                if d not in self._by_name:
                    raise ValueError(f"procedure {p.name} depends on unknown procedure {d}")
                if self._by_name[d].run_order >= p.run_order:
                    raise ValueError(f"procedure {p.name} depends on {d}, which does not run before it")
        self._dependents: dict[str, set[str]] = {p.name: set() for p in self.procedures}
        for p in self.procedures:
            for d in p.depends_on:
                self._dependents[d].add(p.name)

    @classmethod
    def load(cls, conn: psycopg.Connection) -> TransformPlan:
        rows = conn.execute(
            "SELECT procedure_name, target_table, layer, run_order, source_tables, depends_on, is_active "
            "FROM etl.dw_transform_procedures").fetchall()
        return cls(Procedure(r[0], r[1], r[2], r[3], tuple(r[4] or ()), tuple(r[5] or ()), r[6]) for r in rows)

    # -- lookups -----------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Procedure:
        return self._by_name[name]

    @property
    def known_tables(self) -> set[str]:
        """Bronze tables some procedure reads: control messages for any other table are skipped."""
        return {t for p in self.procedures for t in p.source_tables}

    def resolve(self, name: str) -> Procedure:
        """Accept ``silver.load_dim_studies``, ``load_dim_studies``, ``dim_studies`` or ``silver.dim_studies``."""
        candidates = [p for p in self.procedures
                      if name in (p.name, p.short_name, p.target_table, p.target_table.split(".", 1)[1])]
        if len(candidates) == 1:
            return candidates[0]
        known = ", ".join(p.short_name for p in self.procedures)
        if not candidates:
            raise UnknownProcedure(f"unknown procedure {name!r}: use one of {known}")
        raise UnknownProcedure(f"procedure name {name!r} is ambiguous: use the schema-qualified name")

    # -- planning ----------------------------------------------------------------------------------
    def _ordered(self, names: Iterable[str]) -> list[Procedure]:
        wanted = set(names)
        return [p for p in self.procedures if p.name in wanted]

    def downstream(self, names: Iterable[str]) -> list[Procedure]:
        """``names`` plus every procedure that (transitively) depends on one of them, in run order."""
        seen: set[str] = set()
        stack = [n for n in names if n in self._by_name]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(self._dependents[n])
        return self._ordered(seen)

    def for_tables(self, tables: Iterable[str]) -> list[Procedure]:
        """The procedures a finished run of these Bronze tables triggers, each once, in run order."""
        tables = set(tables)
        direct = [p.name for p in self.procedures if tables.intersection(p.source_tables)]
        return self.downstream(direct)

    def ancestors(self, name: str) -> set[str]:
        """Every procedure ``name`` (transitively) depends on."""
        out: set[str] = set()
        stack = list(self._by_name[name].depends_on)
        while stack:
            n = stack.pop()
            if n not in out:
                out.add(n)
                stack.extend(self._by_name[n].depends_on)
        return out

    def all(self) -> list[Procedure]:
        return list(self.procedures)
