"""Helpers for the loader's integration and fault tests: publish known records, model the expected
final state, run loaders in-process or as real ``trialsync load`` processes, read tables back."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg

REPO = Path(__file__).resolve().parent.parent
#: the installed entry point (``python -m common.cli`` would load common.cli twice, as __main__ and as
#: common.cli, and then not recognise common.cli.UserError as an expected error)
TRIALSYNC = str(Path(sys.executable).with_name("trialsync"))
BASE_TS = datetime(2025, 12, 1, 20, 0, tzinfo=UTC)


@dataclass
class Rec:
    """One message to publish. ``value=None`` is a tombstone; ``key=None`` has no id."""

    key: str | None
    value: dict[str, Any] | bytes | None
    run_id: int | None = None
    job_id: int = 9
    extracted_at: datetime | None = None
    headers: dict[str, bytes] = field(default_factory=dict)

    def raw_value(self) -> bytes | None:
        if self.value is None or isinstance(self.value, bytes):
            return self.value
        return orjson.dumps(self.value)

    def raw_headers(self, fmt: str = "named") -> list[tuple[str, bytes]]:
        """The record's headers: ``named`` (earlier versions) or ``v1`` (one ts-load-v1 header, as
        this version's publisher sends them; records the publisher could not put in it -- no
        extraction time, odd header values -- keep the named ones, as the publisher does)."""
        h: dict[str, bytes] = {"ts-job-id": str(self.job_id).encode(), "ts-instance-id": b"cc1"}
        if self.run_id is not None:
            h["ts-run-id"] = str(self.run_id).encode()
        if self.extracted_at is not None:
            h["ts-extracted-at"] = self.extracted_at.isoformat().encode()
        h.update(self.headers)
        named = list(h.items())
        if fmt == "v1" and not self.headers and self.extracted_at is not None:
            return load_header(named, self.raw_value())
        return named


def load_header(named: list[tuple[str, bytes]], value: bytes | None) -> list[tuple[str, bytes]]:
    """``named`` headers as this version's publisher sends them: one ts-load-v1 header (with the
    content hash of ``value``), via the publisher's own builder."""
    from binascii import hexlify
    from hashlib import sha256

    from common.kafka import H_LOAD, H_MODIFIED_AT
    from producers.publisher import load_header_shape

    shape = load_header_shape(named)
    assert shape is not None, named
    pre, post, extra = shape
    mod = dict(named).get(H_MODIFIED_AT, b"")
    digest = hexlify(sha256(value).digest()[:16]) if value is not None else b""
    return [(H_LOAD, pre + mod + post + digest), *extra]


class ServerLog:
    """The embedded PostgreSQL's log (postgres.log) from the moment this object was made."""

    def __init__(self, stack: dict[str, str]):
        self.path = Path(stack["state_dir"]) / "pg" / "postgres.log"
        self.available = self.path.exists()  # not with testcontainers
        self.offset = self.path.stat().st_size if self.available else 0

    def new_text(self) -> str:
        """What the server logged since the last call (or since creation)."""
        if not self.available:
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode(errors="replace")


def ts(i: int) -> datetime:
    return BASE_TS + timedelta(milliseconds=i)


def create_table(conn: psycopg.Connection, name: str) -> None:
    conn.execute("SELECT etl.create_staging_table(%s)", (name,))
    conn.execute("SELECT etl.add_loader_columns(%s)", (name,))


def drop_table(conn: psycopg.Connection, name: str) -> None:
    conn.execute(f'DROP TABLE IF EXISTS bronze."{name}"')


def publish(settings: Any, table: str, recs: Iterable[Rec], partitions: int = 3,
            topic: str | None = None, fmt: str = "named") -> dict[int, int]:
    """Publish in order (idempotent producer); returns {partition: last offset} from delivery reports.
    ``fmt``: the header format (``Rec.raw_headers``), or ``mixed`` (alternating, as a topic holding
    records of an earlier version and of this one)."""
    from confluent_kafka import Producer

    from common.kafka import bronze_topic, ensure_topics, producer_config

    topic = topic or bronze_topic(table, settings)
    ensure_topics([topic], settings, partitions=partitions)
    p = Producer(producer_config(settings, **{"linger.ms": 5}))
    ends: dict[int, int] = {}
    errors: list[str] = []

    def cb(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            ends[msg.partition()] = max(ends.get(msg.partition(), -1), msg.offset())

    for i, r in enumerate(recs):
        while True:
            try:
                p.produce(topic, key=r.key.encode() if r.key is not None else None, value=r.raw_value(),
                          headers=r.raw_headers(("named", "v1")[i % 2] if fmt == "mixed" else fmt), on_delivery=cb)
                break
            except BufferError:
                p.poll(0.05)
        if i % 2000 == 0:
            p.poll(0)
    left = p.flush(60)
    assert left == 0 and not errors, (left, errors[:3])
    return ends


def expected_state(recs: Iterable[Rec]) -> dict[str, tuple[Any, bool]]:
    """Final state per key when extraction times grow with publish order per key:
    last message wins; a tombstone keeps the last data and sets is_deleted; a tombstone for a
    key never seen is a no-op."""
    state: dict[str, tuple[Any, bool]] = {}
    for r in recs:
        if r.key is None:
            continue
        if r.value is None:
            if r.key in state:
                state[r.key] = (state[r.key][0], True)
        else:
            state[r.key] = (orjson.loads(r.raw_value() or b"null"), False)
    return state


def table_state(conn: psycopg.Connection, table: str) -> dict[str, tuple[Any, bool]]:
    rows = conn.execute(f'SELECT source_id, data, is_deleted FROM bronze."{table}"').fetchall()
    return {sid: (data, deleted) for sid, data, deleted in rows}


def new_run(conn: psycopg.Connection, job_id: int = 9, topic: str | None = None) -> int:
    ctx = orjson.dumps({"topic": topic}).decode() if topic else "{}"
    return int(conn.execute("INSERT INTO etl.dw_etl_runs (job_id, run_context) VALUES (%s, %s::jsonb) RETURNING id",
                            (job_id, ctx)).fetchone()[0])


def finish_run(conn: psycopg.Connection, run_id: int, topic: str, end_offsets: dict[int, int], published: int,
               status: str = "success") -> None:
    """What the extractor does at the end of a run: end offsets in run_context, then the final status."""
    conn.execute(
        """UPDATE etl.dw_etl_runs SET records_published = %s,
               run_context = run_context || jsonb_build_object('topic', %s::text, 'end_offsets', %s::jsonb),
               run_status = %s, completed_at = now() WHERE id = %s""",
        (published, topic, orjson.dumps({str(k): v for k, v in end_offsets.items()}).decode(), status, run_id))


def run_row(conn: psycopg.Connection, run_id: int) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM etl.dw_etl_runs WHERE id = %s", (run_id,))
    names = [d.name for d in cur.description]  # type: ignore[union-attr]
    return dict(zip(names, cur.fetchone(), strict=True))  # type: ignore[arg-type]


def load_once(settings: Any, group: str, tables: list[str], batch_size: int = 500, flush_ms: int = 200,
              **over: Any):  # -> LoaderStats
    from consumers.loader import Loader, LoaderOptions

    opts = LoaderOptions(group=group, tables=tables, batch_size=batch_size, flush_ms=flush_ms, once=True,
                         install_signal_handlers=False, **over)
    return Loader(opts, settings).run()


def wait_until(pred: Any, timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def child_env(prefix: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ, KAFKA_TOPIC_PREFIX=prefix, LOG_FORMAT="json", ENABLE_METRICS="false",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class LoaderProcess:
    """A real ``trialsync load`` process with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen([TRIALSYNC, "load", *args], env=env, cwd=str(REPO),
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    d = orjson.loads(line)
                    if d.get("event") == name:
                        out.append(d)
        return out

    def kill9(self) -> None:
        """SIGKILL the process and everything it started (its own process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, timeout: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"loader {self.pid} did not stop within {timeout} s after SIGTERM") from None
        self._log.close()
        return rc

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc


@contextlib.contextmanager
def loaders(*procs: LoaderProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            if p.alive():
                p.kill9()


def group_committed(settings: Any, group: str, topic: str, partitions: int = 3) -> dict[int, int]:
    """The group's committed offsets as the broker reports them."""
    from confluent_kafka import Consumer, TopicPartition

    from common.kafka import consumer_config

    c = Consumer(consumer_config(group, settings))
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def dlq_messages(settings: Any, topic: str, expect: int, timeout: float = 30) -> list[Any]:
    """Read ``expect`` messages from a DLQ topic (all partitions) with a throwaway consumer."""
    from confluent_kafka import Consumer

    from common.kafka import consumer_config

    c = Consumer(consumer_config(f"dlq-reader-{time.time_ns()}", settings))
    c.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for m in c.consume(100, 0.5):
                if m.error() is None:
                    out.append(m)
    finally:
        c.close()
    return out


@dataclass
class Ctx:
    """Per-test world: its own topic prefix, consumer group and staging table."""

    settings: Any
    prefix: str
    table: str
    topic: str
    group: str
    conn: psycopg.Connection
    tmp: Path

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(self.prefix, **extra)

    def state(self) -> dict[str, tuple[Any, bool]]:
        return table_state(self.conn, self.table)

    def count(self) -> int:
        return int(self.conn.execute(f'SELECT count(*) FROM bronze."{self.table}"').fetchone()[0])


def make_ctx(unique: str, tmp_path: Path, monkeypatch: Any) -> Iterator[Ctx]:
    """Generator behind the ``ctx`` fixtures of the loader tests (needs the session stack)."""
    from common import config
    from common.db import connect
    from common.kafka import bronze_topic

    prefix = f"lt{unique}"
    monkeypatch.setenv("KAFKA_TOPIC_PREFIX", prefix)
    config.reset_settings()
    s = config.get_settings()
    table = f"lt_{unique}_staging"
    conn = connect(s, autocommit=True)
    create_table(conn, table)
    try:
        yield Ctx(s, prefix, table, bronze_topic(table, s), f"{prefix}-loader", conn, tmp_path)
    finally:
        with contextlib.suppress(Exception):
            drop_table(conn, table)
        conn.close()
        config.reset_settings()
