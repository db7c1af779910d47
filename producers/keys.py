"""``source_id`` of a record: ``<CC_INSTANCE_ID>:<primary key>``.

A job's ``primary_key`` is a tuple of paths (schemas/jobs.py):

* dotted keys into the record: ``id``, ``visit.id``;
* ``$param.<name>``: the parent parameter value the record was fetched with (records of
  ``/studies/{studyId}/warnings`` carry no study id of their own);
* ``$value``: the record itself, for endpoints that return plain strings.

Composite keys join their parts with ``|``. A record that lacks a part (missing, null, empty
string, or an object/array where a scalar belongs) gets **no** key: it is still published, with a
null key, so the loader dead-letters it with "record has no id" instead of it vanishing silently;
the extractor counts such records.

Key builders are compiled once per run: the common ``("id",)`` case is one dict lookup per record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

KeyFn = Callable[[Any, Mapping[str, Any] | None], str | None]
_MISSING = object()


def _scalar(v: Any) -> str | None:
    """The text of one key part, or None when the value cannot be a key."""
    if v is None or isinstance(v, dict | list):
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    s = v if isinstance(v, str) else str(v)
    return s if s != "" else None


def path_getter(path: str) -> Callable[[Any, Mapping[str, Any] | None], str | None]:
    """``(record, params) -> text`` of one dotted path (``study.id``), ``$value`` or
    ``$param.<name>``; None when it is missing or not a scalar. The text matches what PostgreSQL's
    ``data #>> path`` gives for the same JSON value (so parents read from Bronze and parents taken
    from records compare equal)."""
    if path == "$value":
        return lambda rec, params: _scalar(rec)
    if path.startswith("$param."):
        name = path.removeprefix("$param.")
        return lambda rec, params: _scalar(params.get(name)) if params else None
    steps = path.split(".")
    if len(steps) == 1:
        k = steps[0]

        def one(rec: Any, params: Mapping[str, Any] | None) -> str | None:
            if type(rec) is not dict:
                return None
            return _scalar(rec.get(k))

        return one

    def nested(rec: Any, params: Mapping[str, Any] | None) -> str | None:
        cur = rec
        for s in steps:
            if type(cur) is not dict:
                return None
            cur = cur.get(s, _MISSING)
            if cur is _MISSING:
                return None
        return _scalar(cur)

    return nested


def key_builder(primary_key: tuple[str, ...] | list[str], instance_id: str) -> KeyFn:
    """Compile ``primary_key`` into ``fn(record, params) -> source_id | None``."""
    prefix = f"{instance_id}:"
    if not primary_key:
        raise ValueError("primary_key needs at least one path")
    if tuple(primary_key) == ("id",):
        def by_id(rec: Any, params: Mapping[str, Any] | None) -> str | None:
            if type(rec) is not dict:
                return None
            v = rec.get("id")
            if type(v) is int:
                return prefix + str(v)
            v = _scalar(v)
            return None if v is None else prefix + v

        return by_id
    getters = [path_getter(p) for p in primary_key]
    if len(getters) == 1:
        g = getters[0]

        def single(rec: Any, params: Mapping[str, Any] | None) -> str | None:
            v = g(rec, params)
            return None if v is None else prefix + v

        return single

    def composite(rec: Any, params: Mapping[str, Any] | None) -> str | None:
        parts = []
        for g in getters:
            v = g(rec, params)
            if v is None:
                return None
            parts.append(v)
        return prefix + "|".join(parts)

    return composite


def parent_key(params: Mapping[str, Any] | None) -> str:
    """Canonical text of a parameter dict ('' for plain jobs): the per-parent watermark key."""
    if not params:
        return ""
    import orjson

    return orjson.dumps({k: params[k] for k in sorted(params)}).decode()
