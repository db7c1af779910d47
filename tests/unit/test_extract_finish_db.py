"""The end of an extraction run survives a lost database connection (`producers.run_recorder._Db`).

Found by the fault suite: a PostgreSQL restart while runs were finishing left them `running` without
end offsets, so they could never be seen as loaded; their children waited ETL_LOAD_TIMEOUT_SECONDS
and were skipped. The final writes now reconnect and retry for a bounded time."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from producers import run_recorder


class _Conn:
    def __init__(self, n: int, broken: bool):
        self.n, self.broken, self.closed = n, broken, False

    def close(self) -> None:
        self.closed = True


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))


@pytest.fixture
def reconnects(monkeypatch: pytest.MonkeyPatch) -> list[_Conn]:
    """`connect` fails twice (server still down), then hands out a working connection."""
    made: list[_Conn] = []
    attempts = {"n": 0}

    def connect(settings: Any, autocommit: bool = False, application_name: str = "") -> _Conn:
        attempts["n"] += 1
        if attempts["n"] <= 2:
            raise run_recorder.DatabaseError("cannot connect to PostgreSQL (connection refused)")
        c = _Conn(len(made) + 1, broken=False)
        made.append(c)
        return c

    monkeypatch.setattr(run_recorder, "connect", connect)
    monkeypatch.setattr(run_recorder.time, "sleep", lambda s: None)
    return made


def _write(conn: _Conn) -> str:
    if conn.broken:
        raise psycopg.OperationalError("terminating connection due to administrator command")
    return f"written on connection {conn.n}"


def test_final_write_reconnects_and_succeeds(reconnects: list[_Conn]) -> None:
    old = _Conn(0, broken=True)
    db, log = run_recorder._Db(object(), old), _Log()  # type: ignore[arg-type]
    assert db.call("record_results", _write, deadline=run_recorder.time.monotonic() + 60, log=log) == "written on connection 1"
    assert old.closed and db.conn is reconnects[0]
    assert [e for e, _ in log.events].count("database_unavailable_retrying") == 3


def test_final_write_gives_up_at_the_deadline(reconnects: list[_Conn]) -> None:
    db = run_recorder._Db(object(), _Conn(0, broken=True))  # type: ignore[arg-type]
    with pytest.raises(psycopg.OperationalError):
        db.call("finish_run", _write, deadline=run_recorder.time.monotonic() - 1, log=_Log())


def test_other_errors_are_not_retried(reconnects: list[_Conn]) -> None:
    def bad(conn: _Conn) -> None:
        raise psycopg.errors.UndefinedColumn("column x does not exist")

    db = run_recorder._Db(object(), _Conn(0, broken=False))  # type: ignore[arg-type]
    with pytest.raises(psycopg.errors.UndefinedColumn):
        db.call("record_results", bad, deadline=run_recorder.time.monotonic() + 60, log=_Log())
    assert not reconnects
