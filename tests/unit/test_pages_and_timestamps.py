"""Response-shape parsing and watermark timestamp handling (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from producers.pages import parse_page
from producers.watermarks import filter_expression, max_timestamp, odata_literal, parse_timestamp


def test_odata_shape() -> None:
    p = parse_page(orjson.dumps({"@odata.count": 9, "value": [{"id": 1}], "@odata.nextLink": "http://x/next"}))
    assert (p.records, p.count, p.next_link, p.shape) == ([{"id": 1}], 9, "http://x/next", "odata")


def test_spec_page_shape() -> None:
    p = parse_page(orjson.dumps({"Items": [{"id": 1}, {"id": 2}], "Count": 2, "NextPageLink": None}))
    assert (len(p.records), p.count, p.next_link, p.shape) == (2, 2, None, "page")


def test_bare_array_object_null_scalar() -> None:
    assert parse_page(b"[1, 2]").records == [1, 2]
    assert parse_page(b'{"id": 5, "name": "x"}').records == [{"id": 5, "name": "x"}]
    assert parse_page(b"null").records == []
    assert parse_page(b'"just text"').records == ["just text"]


def test_object_with_a_value_field_that_is_not_a_list_is_a_record() -> None:
    assert parse_page(b'{"id": 1, "value": 3}').records == [{"id": 1, "value": 3}]


def test_malformed_raises() -> None:
    with pytest.raises(orjson.JSONDecodeError):
        parse_page(b'{"value": [')


@pytest.mark.parametrize(("raw", "expected"), [
    ("2025-12-01T20:30:52Z", datetime(2025, 12, 1, 20, 30, 52, tzinfo=UTC)),
    ("2025-12-01T20:30:52", datetime(2025, 12, 1, 20, 30, 52, tzinfo=UTC)),
    ("2025-12-01T21:30:52+01:00", datetime(2025, 12, 1, 20, 30, 52, tzinfo=UTC)),
    ("2025-12-01T20:30:52.1234567Z", datetime(2025, 12, 1, 20, 30, 52, 123456, tzinfo=UTC)),
    ("2025-12-01", datetime(2025, 12, 1, tzinfo=UTC)),
    ("garbage", None), ("", None), (None, None), ({"a": 1}, None),
])
def test_parse_timestamp(raw: object, expected: datetime | None) -> None:
    assert parse_timestamp(raw) == expected


def test_max_timestamp_mixed_formats() -> None:
    vals = ["2025-01-01T10:00:00Z", "2025-01-01T11:30:00+01:00", "2025-01-01T10:45:00.5", None, "bad"]
    assert max_timestamp(vals) == datetime(2025, 1, 1, 10, 45, 0, 500000, tzinfo=UTC)
    assert max_timestamp([]) is None


def test_filter_expression_applies_overlap_and_keeps_milliseconds() -> None:
    wm = datetime(2025, 12, 1, 20, 30, 52, 900000, tzinfo=UTC)
    assert filter_expression("modifiedDate", wm, 300) == "modifiedDate gt 2025-12-01T20:25:52.900Z"
    assert odata_literal(wm + timedelta(hours=1, microseconds=99)) == "2025-12-01T21:30:52.900Z"
    assert odata_literal(datetime(2025, 1, 1, 1, 0, 0, 999999, tzinfo=UTC)) == "2025-01-01T01:00:00.999Z"
