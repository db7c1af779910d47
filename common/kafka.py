"""Broker plumbing shared by producers and consumers: topic names, client configs, topic creation.

Topic layout (prefix from KAFKA_TOPIC_PREFIX, default ``trialsync``):

* ``<prefix>.bronze.<target_table>`` -- one per staging table, key = source_id, value = raw record
  (orjson bytes), null value = tombstone;
* ``<prefix>.control.runs`` -- ``run_started`` / ``run_finished`` (schemas/messages.py), key = run id;
* ``<prefix>.state.watermarks`` -- compacted, key = ``<job_id>:<parent_key>``;
* ``<prefix>.dlq.<target_table>`` -- records the loader could not load, error in headers.

Note on the embedded tansu broker: ListOffsets (``get_watermark_offsets(cached=False)``) can
report stale high watermarks; fetch responses (partition EOF, cached watermarks) are right. So the
end of a run is the producer's own delivery reports (last offset per partition, carried in
``run_finished``), never a ListOffsets call.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import Any

from common.config import Settings, get_settings
from common.logging import get_logger
from common.stack import bootstrap_servers
from schemas.jobs import check_identifier

# -- record headers (bytes on the wire, names stable: dashboards and the DLQ depend on them) ------
H_JOB_ID = "ts-job-id"
H_RUN_ID = "ts-run-id"
H_INSTANCE = "ts-instance-id"
H_EXTRACTED_AT = "ts-extracted-at"
H_PARAMS = "ts-params"
H_MODIFIED_AT = "ts-modified-at"
H_ERROR = "ts-error"
H_ERROR_CLASS = "ts-error-class"
H_SRC_TOPIC = "ts-src-topic"
H_SRC_PARTITION = "ts-src-partition"
H_SRC_OFFSET = "ts-src-offset"
#: first 128 bits of SHA-256 of the value bytes, hex (the loader's "did the content change" test); a field of H_LOAD
H_CONTENT_HASH = "ts-content-hash"

# -- the loader's header ------------------------------------------------------------------------------
#: One header carrying everything the loader needs, in COPY column order, tab-separated. Why one:
#: confluent-kafka turns every header of every consumed message into Python objects (~0.55 us per
#: header on the development machine), so six named headers cost the loader more CPU than the rest
#: of its per-record work; one header costs ~0.6 us in all (bench/RESULTS.md). The value is bytes the
#: loader puts into its COPY stream unparsed. A format change takes a new header name (ts-load-v2);
#: records without it (published by older versions) carry the named headers, which still load.
H_LOAD = "ts-load-v1"
#: the fields of H_LOAD, in order (a missing value is empty)
LOAD_FIELDS = (H_RUN_ID, H_JOB_ID, H_INSTANCE, H_EXTRACTED_AT, H_MODIFIED_AT, H_PARAMS, H_CONTENT_HASH)
_LOAD_N = len(LOAD_FIELDS)


def load_header_fields(value: bytes | None) -> dict[str, bytes] | None:
    """The named fields of an ``H_LOAD`` value (only the non-empty ones), or None when malformed."""
    if value is None:
        return None
    parts = value.split(b"\t")
    if len(parts) != _LOAD_N:
        return None
    return {name: v for name, v in zip(LOAD_FIELDS, parts, strict=True) if v}


def named_headers(headers: list[tuple[str, bytes | None]] | None) -> list[tuple[str, bytes]]:
    """A message's headers with ``H_LOAD`` expanded into the named headers (ts-run-id, ...).

    For readers that want names (the DLQ, replay's run filter, tests); the named headers a record
    carries itself win over the same field in H_LOAD. Null-valued headers are dropped."""
    if not headers:
        return []
    out: list[tuple[str, bytes]] = []
    fields: dict[str, bytes] = {}
    for k, v in headers:
        if k == H_LOAD:
            fields = load_header_fields(v) or {}
        elif v is not None:
            out.append((k, v))
    have = {k for k, _ in out}
    out.extend((k, v) for k, v in fields.items() if k not in have)
    return out


def header_value(headers: list[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    """One named header's value, looking into ``H_LOAD`` too (None when absent)."""
    for k, v in named_headers(headers):
        if k == name:
            return v
    return None


def topic_prefix(settings: Settings | None = None) -> str:
    return (settings or get_settings()).kafka_topic_prefix


def bronze_topic(table: str, settings: Settings | None = None) -> str:
    return f"{topic_prefix(settings)}.bronze.{check_identifier(table, 'staging table name')}"


def dlq_topic(table: str, settings: Settings | None = None) -> str:
    return f"{topic_prefix(settings)}.dlq.{check_identifier(table, 'staging table name')}"


def control_topic(settings: Settings | None = None) -> str:
    return f"{topic_prefix(settings)}.control.runs"


def watermark_topic(settings: Settings | None = None) -> str:
    return f"{topic_prefix(settings)}.state.watermarks"


def bronze_topic_regex(settings: Settings | None = None) -> str:
    """Subscription regex (librdkafka: leading ^) matching every bronze topic."""
    return "^" + re.escape(topic_prefix(settings) + ".bronze.") + r"[a-z_][a-z0-9_]*$"


def table_of_topic(topic: str, settings: Settings | None = None) -> str | None:
    """The staging table a bronze topic feeds, or None when the topic is not a bronze topic."""
    pre = topic_prefix(settings) + ".bronze."
    if not topic.startswith(pre):
        return None
    name = topic[len(pre):]
    try:
        return check_identifier(name)
    except ValueError:
        return None


# -- client configs ------------------------------------------------------------------------------

class QuietClientLog:
    """librdkafka's own log lines (``%3|…|FAIL|…``, one per reconnect attempt, dozens a second
    while a broker does not answer) as DEBUG events instead of raw stderr lines.

    Why DEBUG: the condition they describe is reported once, in words, by the code that runs into
    it (``PublishError`` / ``describe_broker_error``, the loader's ``broker_unavailable``), and a
    process keeps retrying quietly. ``LOG_LEVEL=DEBUG`` shows them again. librdkafka calls
    ``log(level, fmt, *args)`` on whatever object ``logger`` is (from poll/flush).
    """

    def __init__(self) -> None:
        from common.logging import get_logger

        self._log = get_logger("librdkafka")

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        if self._log.is_enabled_for(10):  # logging.DEBUG
            text = (str(msg) % args) if args else str(msg)
            self._log.debug("librdkafka_log", severity=level, message=text[:500])


def _base(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap_servers(settings), "client.id": "trialsync",
        "logger": QuietClientLog(),
        # a broker that accepts the connection but never answers must not hold a client for the
        # default 30 s per attempt
        "socket.connection.setup.timeout.ms": int(settings.kafka_connect_timeout_seconds * 1000),
    }


def producer_config(settings: Settings | None = None, **extra: Any) -> dict[str, Any]:
    """Idempotent, batched, compressed: retries never duplicate or reorder within a partition."""
    s = settings or get_settings()
    cfg = {
        **_base(s),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "batch.num.messages": 10000,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500_000,
        "queue.buffering.max.kbytes": 512 * 1024,
        "message.timeout.ms": 300_000,
    }
    cfg.update(extra)
    return cfg


def consumer_config(group_id: str, settings: Settings | None = None, **extra: Any) -> dict[str, Any]:
    """Manual commits only: offsets move after the database commit, never before."""
    s = settings or get_settings()
    cfg = {
        **_base(s),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": s.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(500, s.kafka_session_timeout_ms // 3),
        "max.poll.interval.ms": 300_000,
        "fetch.max.bytes": 52_428_800,
        "max.partition.fetch.bytes": 10_485_760,
        "topic.metadata.refresh.interval.ms": 5000,
        "partition.assignment.strategy": "cooperative-sticky",
    }
    cfg.update(extra)
    return cfg


def admin_client(settings: Settings | None = None):  # -> AdminClient
    from confluent_kafka.admin import AdminClient

    return AdminClient(_base(settings or get_settings()))


def ensure_topics(names: Iterable[str], settings: Settings | None = None, partitions: int | None = None,
                  compacted: Iterable[str] = (), timeout: float = 15.0) -> list[str]:
    """Create the topics that do not exist yet; return those created. Existing topics are left alone.

    Retention is set deliberately at creation: the compacted topics keep the latest value per key
    (the watermark state); every other topic keeps KAFKA_TOPIC_RETENTION_HOURS of history, long
    enough to replay a table (docs/deployment.md, "Topic retention")."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    s = settings or get_settings()
    admin = admin_client(s)
    wanted = sorted(set(names))
    # first contact: a broker that does not answer is reported within KAFKA_CONNECT_TIMEOUT_SECONDS
    existing = set(admin.list_topics(timeout=min(timeout, s.kafka_connect_timeout_seconds)).topics)
    compacted = set(compacted)
    new = [
        NewTopic(
            t,
            num_partitions=1 if t in compacted else (partitions or s.kafka_partitions),
            replication_factor=s.kafka_replication_factor,
            config=topic_config(t in compacted, s),
        )
        for t in wanted if t not in existing
    ]
    if not new:
        return []
    created = []
    for topic, fut in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            fut.result()
            created.append(topic)
        except KafkaException as e:
            if e.args and e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise
    return created


def topic_config(compacted: bool, settings: Settings | None = None) -> dict[str, str]:
    """The configs TrialSync creates a topic with."""
    s = settings or get_settings()
    if compacted:
        return {"cleanup.policy": "compact"}
    return {"cleanup.policy": "delete", "retention.ms": str(int(s.kafka_topic_retention_hours * 3_600_000))}


def ensure_system_topics(settings: Settings | None = None) -> list[str]:
    s = settings or get_settings()
    return ensure_topics([control_topic(s), watermark_topic(s)], s, compacted=[watermark_topic(s)])


def describe_broker_error(e: Exception, settings: Settings | None = None) -> str:
    """One line: which broker, what librdkafka said (its text, not the KafkaError repr), the fix."""
    try:
        where = bootstrap_servers(settings)
    except Exception:  # noqa: BLE001 - best effort for an error message
        where = "(not configured)"
    detail = str(e)
    err = e.args[0] if e.args else None
    text_of = getattr(err, "str", None)  # a KafkaError's own text
    if callable(text_of):
        detail = text_of()
    try:
        wait = f" within {(settings or get_settings()).kafka_connect_timeout_seconds:g} s"
    except Exception:  # noqa: BLE001
        wait = ""
    return (f"broker at {where} is not reachable: no answer{wait} ({detail}): start it with "
            "`trialsync stack up` or check KAFKA_BOOTSTRAP_SERVERS")


class RdkafkaLog(logging.Logger):
    """librdkafka's own log lines, as structured events, each distinct message at most every 30 s.

    Without it librdkafka writes every reconnect attempt to stderr (dozens per second while the
    broker is down); the state itself is reported by ``broker_unavailable``.
    """

    def __init__(self, name: str = "trialsync.librdkafka", every: float = 30.0):
        super().__init__(name)
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}
        # not ``self._log``: that is logging.Logger's own method, which debug()/info()/... call
        self._events = get_logger("librdkafka")

    def log(self, level: int, msg: object, *args: object, **kwargs: object) -> None:
        text = (str(msg) % args) if args else str(msg)
        sig = re.sub(r"\d+", "#", text)
        now = time.monotonic()
        last, suppressed = self._seen.get(sig, (0.0, 0))
        if now - last < self.every:
            self._seen[sig] = (last, suppressed + 1)
            return
        self._seen[sig] = (now, 0)
        if len(self._seen) > 500:
            self._seen.clear()
        event = "librdkafka_error" if level >= logging.ERROR else "librdkafka_log"
        (self._events.warning if level >= logging.WARNING else self._events.info)(
            event, message=text[:500], **({"suppressed_since_last": suppressed} if suppressed else {}))
