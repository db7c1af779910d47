"""The embedded stack: real PostgreSQL 16 and a real Kafka-API broker, started by the session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from common import stack as stack_mod
from common.config import load_settings
from common.kafka import consumer_config, ensure_topics, producer_config

pytestmark = pytest.mark.integration


def test_postgres_is_16(db) -> None:
    version = db.execute("SHOW server_version").fetchone()[0]
    assert version.startswith("16.")


def test_roundtrip_one_message(settings, unique) -> None:
    topic = f"t.{unique}"
    ensure_topics([topic], settings, partitions=2)
    p = Producer(producer_config(settings))
    p.produce(topic, key=b"k1", value=b'{"id": 1}', headers=[("ts-run-id", b"7")])
    assert p.flush(10) == 0
    c = Consumer(consumer_config(f"g.{unique}", settings))
    c.subscribe([topic])
    got = None
    deadline = time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got = m
    c.close()
    assert got is not None
    assert got.key() == b"k1" and got.value() == b'{"id": 1}'
    assert dict(got.headers())["ts-run-id"] == b"7"


def test_up_is_idempotent(stack) -> None:
    before = stack_mod.read_state()
    again = stack_mod.up()
    assert (again.pg_pid, again.kafka_pid, again.pg_port, again.kafka_port) == (
        before.pg_pid, before.kafka_pid, before.pg_port, before.kafka_port)


def test_status_reports_running(stack) -> None:
    st = stack_mod.status()
    assert st["postgres"]["running"] and st["broker"]["running"]


def test_configured_port_taken_is_clear_error(stack, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = Path(tempfile.mkdtemp(prefix="trialsync-test-port-"))
        try:
            cfg = load_settings(trialsync_state_dir=d, trialsync_kafka_port=port, trialsync_broker_storage="durable")
            with pytest.raises(stack_mod.StackError, match=rf"port {port} \(TRIALSYNC_KAFKA_PORT\) is already in use"):
                stack_mod.start_broker(cfg)
            assert not (d / "kafka" / "s3").exists(), "nothing may be started behind the error"
        finally:
            import shutil

            shutil.rmtree(d, ignore_errors=True)


def test_second_stack_up_down_via_cli(tmp_path) -> None:
    """A separate state dir gets its own servers; `stack down` stops them (CLI, real processes)."""
    d = Path(tempfile.mkdtemp(prefix="trialsync-test-cli-"))
    d.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    env["TRIALSYNC_STATE_DIR"] = str(d)
    cli = [sys.executable, "-m", "common.cli"]
    try:
        up = subprocess.run([*cli, "stack", "up"], env=env, capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr
        st = stack_mod.read_state(load_settings(trialsync_state_dir=d))
        assert stack_mod.pg_running(st) and stack_mod.kafka_running(st)
        status = subprocess.run([*cli, "stack", "status", "--json"], env=env, capture_output=True, text=True)
        assert status.returncode == 0 and '"running": true' in status.stdout
        down = subprocess.run([*cli, "stack", "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert not stack_mod.pid_alive(st.kafka_pid)
        assert not stack_mod.pid_alive(st.pg_pid)
        status = subprocess.run([*cli, "stack", "status"], env=env, capture_output=True, text=True)
        assert status.returncode == 3
    finally:
        subprocess.run([*cli, "stack", "down", "--purge"], env=env, capture_output=True, timeout=120)


def test_external_urls_mean_nothing_embedded(tmp_path) -> None:
    d = tmp_path / "nothing"
    cfg = load_settings(trialsync_state_dir=d, database_url="postgresql://u@db.example:5432/x",
                        kafka_bootstrap_servers="broker.example:9092")
    st = stack_mod.up(cfg)
    assert st.pg_pid is None and st.kafka_pid is None
    assert stack_mod.database_dsn(cfg) == "postgresql://u@db.example:5432/x"
    assert stack_mod.bootstrap_servers(cfg) == "broker.example:9092"


def test_no_stack_no_url_is_clear_error(tmp_path) -> None:
    cfg = load_settings(trialsync_state_dir=tmp_path / "empty")
    with pytest.raises(stack_mod.StackError, match="trialsync stack up"):
        stack_mod.database_dsn(cfg)
    with pytest.raises(stack_mod.StackError, match="KAFKA_BOOTSTRAP_SERVERS"):
        stack_mod.bootstrap_servers(cfg)


def test_topics_are_created_with_deliberate_retention(settings, unique) -> None:
    """Bronze topics keep KAFKA_TOPIC_RETENTION_HOURS of history; the watermark topic is compacted
    (what Redpanda in compose.yaml enforces; the embedded broker stores the configs too)."""
    from confluent_kafka.admin import ConfigResource

    from common.kafka import admin_client

    s = settings.model_copy(update={"kafka_topic_prefix": f"ret{unique}", "kafka_topic_retention_hours": 48.0})
    bronze, state = f"ret{unique}.bronze.x_staging", f"ret{unique}.state.watermarks"
    ensure_topics([bronze, state], s, compacted=[state])
    admin = admin_client(s)
    got = {}
    for res, fut in admin.describe_configs([ConfigResource("topic", bronze), ConfigResource("topic", state)]).items():
        got[res.name] = {k: v.value for k, v in fut.result().items()}
    assert got[bronze]["retention.ms"] == str(48 * 3_600_000) and got[bronze]["cleanup.policy"] == "delete"
    assert got[state]["cleanup.policy"] == "compact"
