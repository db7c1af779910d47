"""Tolerant parsing of every response shape Clinical Conductor sends.

The docs show OData ``{"@odata.count": N, "value": [...], "@odata.nextLink": ...}``, the Swagger
spec shows ``{"Items": [...], "Count": N, "NextPageLink": ...}``, and plain endpoints return a
bare array or a single object. One function turns all of them into a :class:`Page`, so the paging
loop never cares which one it got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

#: keys that hold the records of a wrapped page, in order of preference
_ITEM_KEYS = ("value", "Items", "items", "Value", "results", "Results")
_COUNT_KEYS = ("@odata.count", "Count", "count", "@count", "odata.count", "TotalCount", "totalCount")
_NEXT_KEYS = ("@odata.nextLink", "NextPageLink", "nextPageLink", "odata.nextLink", "nextLink", "NextLink")


@dataclass(slots=True)
class Page:
    records: list[Any]
    next_link: str | None = None
    count: int | None = None
    #: odata | page | array | object | empty
    shape: str = "array"
    nbytes: int = 0


def parse_page(body: bytes) -> Page:
    """Parse one response body. Raises ``orjson.JSONDecodeError`` when it is not JSON.

    * wrapped pages (``value``/``Items``) -> their records, count and next link;
    * a bare array -> its elements;
    * ``null`` -> no records;
    * any other object -> one record (the object itself);
    * a scalar (e.g. a string) -> one record.
    """
    doc = orjson.loads(body)
    n = len(body)
    if isinstance(doc, list):
        return Page(doc, shape="array", nbytes=n)
    if doc is None:
        return Page([], shape="empty", nbytes=n)
    if isinstance(doc, dict):
        for k in _ITEM_KEYS:
            items = doc.get(k)
            if isinstance(items, list):
                return Page(items, next_link=_first_str(doc, _NEXT_KEYS), count=_first_int(doc, _COUNT_KEYS),
                            shape="odata" if k == "value" else "page", nbytes=n)
        return Page([doc], shape="object", nbytes=n)
    return Page([doc], shape="object", nbytes=n)


def _first_str(doc: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for k in keys:
        v = doc.get(k)
        if isinstance(v, str) and v:
            return v
    return None


def _first_int(doc: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for k in keys:
        v = doc.get(k)
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.isdigit():
            return int(v)
    return None
