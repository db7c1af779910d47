"""The writer's direct-COPY path for first loads, on a real PostgreSQL: new keys are COPYed straight
into the staging table; the first existing key falls back to the upsert (and the table leaves the
direct path); bad rows still reach the isolation of the upsert path; a table that already holds
rows never takes it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from common.db import connect, staging_table
from consumers.staging_writer import StagingWriter, prepare
from tests.loader_support import create_table, drop_table

pytestmark = pytest.mark.integration

EXTRACTED = b"2025-12-01T20:00:00+00:00"


class Msg:
    """The five accessors of a confluent-kafka Message the writer uses."""

    def __init__(self, key: str, value: Any, offset: int, extracted: bytes | None = EXTRACTED):
        self._k, self._off = key.encode(), offset
        self._v = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
        self._h = [("ts-run-id", b"7"), ("ts-job-id", b"9"), ("ts-instance-id", b"cc1")]
        if extracted is not None:
            self._h.append(("ts-extracted-at", extracted))

    def key(self) -> bytes: return self._k
    def value(self) -> bytes | None: return self._v
    def headers(self) -> list[tuple[str, bytes]]: return self._h
    def partition(self) -> int: return 0
    def offset(self) -> int: return self._off
    def timestamp(self) -> tuple[int, int]: return (1, 1_764_619_200_000 + self._off)
    def topic(self) -> str: return "t.bronze.x"


@pytest.fixture
def table(stack: dict[str, str], unique: str) -> Iterator[tuple[psycopg.Connection, str]]:
    name = f"dc_{unique}_staging"
    with connect(autocommit=True) as conn:
        create_table(conn, name)
        try:
            yield conn, name
        finally:
            drop_table(conn, name)


def write(conn: psycopg.Connection, writer: StagingWriter, name: str, msgs: list[Msg]) -> Any:
    with conn.transaction():
        res = writer.write(staging_table(name), prepare(msgs))
    writer.after_commit()
    return res


def rows(conn: psycopg.Connection, name: str) -> dict[str, tuple[Any, Any, Any]]:
    q = sql.SQL("SELECT source_id, data, kafka_timestamp_ms, extracted_at FROM {}").format(staging_table(name))
    return {r[0]: r[1:] for r in conn.execute(q).fetchall()}


def test_first_load_goes_direct_until_a_key_exists(table: tuple[psycopg.Connection, str]) -> None:
    conn, name = table
    writer = StagingWriter(conn)
    first = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i, "v": 1}, i) for i in range(100)])
    assert first.direct and first.inserted == first.accepted == 100
    got = rows(conn, name)
    assert len(got) == 100 and got["cc1:7"][0] == {"i": 7, "v": 1}
    assert got["cc1:7"][1] == 1_764_619_200_007 and got["cc1:7"][2] is not None

    # 50 known keys with new content + 50 new: the direct COPY meets a unique violation -> upsert
    second = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i, "v": 2}, 100 + i) for i in range(50, 150)])
    assert not second.direct and (second.inserted, second.updated) == (50, 50)
    got = rows(conn, name)
    assert len(got) == 150 and got["cc1:60"][0] == {"i": 60, "v": 2} and got["cc1:10"][0] == {"i": 10, "v": 1}
    assert got["cc1:60"][1] == 1_764_619_200_160  # the upsert path keeps the lineage column too

    # the table has left the direct path: even all-new keys are upserted now
    third = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i}, 300 + i) for i in range(200, 210)])
    assert not third.direct and third.inserted == 10
    # a new connection on a table that holds rows never tries it
    with connect(autocommit=True) as other:
        res = write(other, StagingWriter(other), name, [Msg(f"cc1:{i}", {"i": i}, 400 + i) for i in range(300, 305)])
        assert not res.direct and res.inserted == 5


def test_bad_rows_in_a_first_load_fall_back_and_are_isolated(table: tuple[psycopg.Connection, str]) -> None:
    conn, name = table
    writer = StagingWriter(conn)
    msgs = [Msg(f"cc1:{i}", {"i": i}, i) for i in range(20)]
    msgs[5] = Msg("cc1:5", b'{"i": 5, "bad": "\\u0000"}', 5)  # valid JSON, refused by jsonb
    msgs[9] = Msg("cc1:9", {"i": 9}, 9, extracted=None)  # no extraction time: upsert path's fallback
    res = write(conn, writer, name, msgs)
    assert not res.direct and res.inserted == 19
    assert [r.offset for r in res.rejects] == [5]
    got = rows(conn, name)
    assert set(got) == {f"cc1:{i}" for i in range(20)} - {"cc1:5"}
    assert got["cc1:9"][2] is not None  # extracted_at from the message timestamp
    # the table is still empty of those keys' conflicts: the next clean batch goes direct
    nxt = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i}, 100 + i) for i in range(100, 110)])
    assert nxt.direct and nxt.inserted == 10
