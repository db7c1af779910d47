"""The writer's direct-COPY path for first loads, on a real PostgreSQL: new keys are COPYed straight
into the staging table; a batch holding a key this writer already wrote takes the upsert (no unique
violation reaches the server); a key written by someone else still falls back (and the table
leaves the direct path); bad rows still reach the isolation of the upsert path; a table that
already holds rows never takes it. Both header formats: ts-load-v1 (this version's publisher) and
the named headers of earlier versions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from common.db import connect, staging_table
from consumers.staging_writer import StagingWriter, prepare
from tests.loader_support import ServerLog, create_table, drop_table, load_header

pytestmark = pytest.mark.integration

EXTRACTED = b"2025-12-01T20:00:00+00:00"


class Msg:
    """The accessors of a confluent-kafka Message the writer uses."""

    fmt = "named"

    def __init__(self, key: str, value: Any, offset: int, extracted: bytes | None = EXTRACTED):
        self._k, self._off = key.encode(), offset
        self._v = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
        self._h = [("ts-run-id", b"7"), ("ts-job-id", b"9"), ("ts-instance-id", b"cc1")]
        if extracted is not None:
            self._h.append(("ts-extracted-at", extracted))
        if self.fmt == "v1" and extracted is not None:
            self._h = load_header(self._h, self._v)

    def key(self) -> bytes: return self._k
    def value(self) -> bytes | None: return self._v
    def headers(self) -> list[tuple[str, bytes]]: return self._h
    def partition(self) -> int: return 0
    def offset(self) -> int: return self._off
    def timestamp(self) -> tuple[int, int]: return (1, 1_764_619_200_000 + self._off)
    def topic(self) -> str: return "t.bronze.x"


@pytest.fixture(params=["named", "v1"])
def fmt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(Msg, "fmt", request.param)
    return str(request.param)


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


def rows(conn: psycopg.Connection, name: str) -> dict[str, tuple[Any, Any, Any, Any]]:
    q = sql.SQL("SELECT source_id, data, kafka_timestamp_ms, extracted_at, content_hash FROM {}").format(
        staging_table(name))
    return {r[0]: r[1:] for r in conn.execute(q).fetchall()}


def test_first_load_goes_direct_and_known_keys_take_the_upsert(table: tuple[psycopg.Connection, str],
                                                                 fmt: str, stack: dict[str, str]) -> None:
    conn, name = table
    log = ServerLog(stack)
    writer = StagingWriter(conn)
    first = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i, "v": 1}, i) for i in range(100)])
    assert first.direct and first.inserted == first.accepted == 100
    got = rows(conn, name)
    assert len(got) == 100 and got["cc1:7"][0] == {"i": 7, "v": 1}
    assert got["cc1:7"][1] == 1_764_619_200_007 and got["cc1:7"][2] is not None
    assert got["cc1:7"][3] is not None  # the content hash, COPYed with the row

    # 50 keys this writer wrote (new content) + 50 new: known keys -> the upsert, no COPY attempted
    second = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i, "v": 2}, 100 + i) for i in range(50, 150)])
    assert not second.direct and (second.inserted, second.updated) == (50, 50)
    assert "duplicate key" not in log.new_text()  # nothing refused on the way (issue 16)
    got = rows(conn, name)
    assert len(got) == 150 and got["cc1:60"][0] == {"i": 60, "v": 2} and got["cc1:10"][0] == {"i": 10, "v": 1}
    assert got["cc1:60"][1] == 1_764_619_200_160  # the upsert path keeps the lineage column too

    # all-new keys go direct again: the table is still on the direct path
    third = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i}, 300 + i) for i in range(200, 210)])
    assert third.direct and third.inserted == 10
    # the same content again: unchanged by hash, nothing written
    again = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i}, 400 + i) for i in range(200, 210)])
    assert not again.direct and (again.inserted, again.updated, again.unchanged) == (0, 0, 10)

    # a key another writer inserted meanwhile: the COPY meets a unique violation, the batch is
    # upserted, and this writer leaves the direct path for good
    with connect(autocommit=True) as other:
        write(other, StagingWriter(other), name, [Msg("cc1:500", {"i": 500, "by": "other"}, 500)])
    log.new_text()
    raced = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i, "by": "us"}, 600 + i) for i in range(495, 505)])
    if log.available:
        assert "duplicate key" in log.new_text()  # (this test's check above can see one)
    assert not raced.direct and (raced.inserted, raced.updated) == (9, 1)
    assert rows(conn, name)["cc1:500"][0] == {"i": 500, "by": "us"}
    later = write(conn, writer, name, [Msg(f"cc1:{i}", {"i": i}, 700 + i) for i in range(800, 805)])
    assert not later.direct and later.inserted == 5

    # a new connection on a table that holds rows never tries it
    with connect(autocommit=True) as other:
        res = write(other, StagingWriter(other), name, [Msg(f"cc1:{i}", {"i": i}, 900 + i) for i in range(900, 905)])
        assert not res.direct and res.inserted == 5


def test_bad_rows_in_a_first_load_fall_back_and_are_isolated(table: tuple[psycopg.Connection, str], fmt: str) -> None:
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
