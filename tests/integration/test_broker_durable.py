"""The durable embedded broker: topics outlive the broker, retention keeps them bounded.

Everything runs through the real CLI on a private durable stack: a real extraction from the CC
simulator, ``stack down`` / ``stack up``, ``replay --truncate`` and the simulator's reconciliation;
then repeated full publications of one table with the stack's retention keeper bounding the topic
while never dropping what the loader has not loaded.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import psycopg
import pytest

from common import broker_retention, embedded_s3
from tests.integration.stack_support import PrivateStack
from tests.loader_support import (
    Rec,
    create_table,
    expected_state,
    load_once,
    publish,
    table_state,
    ts,
    wait_until,
)

pytestmark = pytest.mark.integration

if embedded_s3.s3rver_command() is None:
    pytest.skip("the durable broker needs Node.js and s3rver (`make install`)", allow_module_level=True)

JOB = "9"  # patient visits, the largest plain OData job
TABLE = "dim_patient_visits_staging"


def _topic_bytes(ps: PrivateStack, topic: str) -> tuple[int, int]:
    """(bytes, batches) the durable store holds for ``topic``."""
    parts = broker_retention.parse_batches(embedded_s3.list_objects(ps.state().s3_port, "clusters/"))
    mine = [b for (t, _), bs in parts.items() if t == topic for b in bs]
    return sum(b.size for b in mine), len(mine)


@pytest.mark.heavy  # its own durable stack, stopped and started: ~25 s, in `make test-heavy`
def test_topics_survive_stack_down_and_replay_rebuilds_exactly() -> None:
    from simulator.testing import SimulatorProcess

    with SimulatorProcess(scale=0.002, seed=42, api_key="durable-key") as sim, PrivateStack(storage="durable") as ps:
        ps.env.update({"CC_API_BASE_URL": sim.base_url, "CC_API_KEY": sim.api_key, "CC_API_KEY_HEADER": sim.key_header,
                       "KAFKA_SESSION_TIMEOUT_MS": "6000"})
        ps.cli("stack", "up")
        ps.cli("db", "migrate")
        ps.cli("jobs", "sync")
        ps.cli("extract", "--job", JOB, "--full", timeout=300)
        ps.cli("load", "--once", "--tables", TABLE, timeout=300)
        rec = ps.cli("simulator", "reconcile", "--job", JOB, "--url", sim.admin_url, check=False)
        assert rec.returncode == 0, rec.stdout
        topic = f"trialsync.bronze.{TABLE}"
        before = _topic_bytes(ps, topic)
        assert before[0] > 0

        # the whole stack goes down (a reboot); the broker's storage stays
        ps.cli("stack", "down")
        ps.cli("stack", "up")
        assert _topic_bytes(ps, topic) == before

        # the table is damaged by hand; replay --truncate rebuilds it from the topic alone
        with psycopg.connect(ps.dsn(), autocommit=True) as c:
            n = c.execute(f'SELECT count(*) FROM bronze."{TABLE}"').fetchone()[0]
            assert n > 100
            c.execute(f"DELETE FROM bronze.\"{TABLE}\" WHERE source_id IN "
                      f"(SELECT source_id FROM bronze.\"{TABLE}\" ORDER BY source_id LIMIT 50)")
            c.execute(f"UPDATE bronze.\"{TABLE}\" SET data = '{{\"hacked\": true}}' WHERE source_id = "
                      f"(SELECT max(source_id) FROM bronze.\"{TABLE}\")")
        assert ps.cli("simulator", "reconcile", "--job", JOB, "--url", sim.admin_url, check=False).returncode == 1
        ps.cli("replay", "--table", TABLE, "--truncate", timeout=300)
        rec = ps.cli("simulator", "reconcile", "--job", JOB, "--url", sim.admin_url, check=False)
        assert rec.returncode == 0, rec.stdout


def _round(r: int, n: int) -> list[Rec]:
    # incompressible content (~400 bytes), so the byte bound is about real records
    return [Rec(f"cc1:{i}", {"id": i, "round": r, "blob": base64.b64encode(os.urandom(300)).decode()},
                extracted_at=ts(r * 100_000 + i)) for i in range(n)]


@pytest.mark.heavy  # ~50 s: six publications through a 1 MB bound
def test_retention_bounds_the_topic_over_repeated_runs_and_keeps_unloaded_records(tmp_path: Path) -> None:
    limit_mb = 1
    with PrivateStack(storage="durable", TRIALSYNC_BROKER_RETENTION_MB=str(limit_mb),
                      TRIALSYNC_BROKER_RETENTION_INTERVAL_SECONDS="0.5") as ps:
        ps.cli("stack", "up")
        ps.cli("db", "migrate")
        with psycopg.connect(ps.dsn(), autocommit=True) as c:
            create_table(c, "ret_staging")
        s = ps.settings()
        topic = "trialsync.bronze.ret_staging"
        group = "trialsync-loader"  # the group retention guards: the default loader group of the prefix
        n = 1500  # ~0.65 MB a round: two rounds do not fit in the bound, one does
        limit = limit_mb * 1024 * 1024

        def largest_batch() -> int:
            parts = broker_retention.parse_batches(embedded_s3.list_objects(ps.state().s3_port, "clusters/"))
            return max((b.size for (t, _), bs in parts.items() if t == topic for b in bs), default=0)

        slack = 0  # retention deletes whole batches: the bound holds to within one batch
        for r in range(4):
            publish(s, "ret_staging", _round(r, n))
            load_once(s, group, ["ret_staging"], batch_size=5000)
            slack = bound = max(slack, largest_batch())
            wait_until(lambda b=bound: _topic_bytes(ps, topic)[0] <= limit + b, 30,
                       what=f"round {r}: the keeper to bring the topic under {limit_mb} MB")

        # records the loader has not committed are never deleted, whatever the bound
        publish(s, "ret_staging", _round(4, n))
        latest = _round(5, n)
        publish(s, "ret_staging", latest)
        time.sleep(2)  # several keeper intervals
        rep = broker_retention.sweep(ps.state().s3_port, f"127.0.0.1:{ps.state().kafka_port}",
                                     broker_retention.Policy(max_age_seconds=1e9, max_topic_bytes=limit), dry_run=True)
        assert rep.held_unloaded > 0
        assert _topic_bytes(ps, topic)[0] > limit, "unloaded records must stay even above the bound"
        load_once(s, group, ["ret_staging"], batch_size=5000)
        slack = max(slack, largest_batch())
        wait_until(lambda: _topic_bytes(ps, topic)[0] <= limit + slack, 30, what="the bound after loading")

        # what is left still holds the latest content of every key: replay --truncate is exact
        with psycopg.connect(ps.dsn(), autocommit=True) as c:
            c.execute('DELETE FROM bronze."ret_staging"')
        ps.cli("replay", "--table", "ret_staging", "--truncate")
        with psycopg.connect(ps.dsn(), autocommit=True) as c:
            assert table_state(c, "ret_staging") == expected_state(latest)
        assert '"broker_retention_sweep"' in (ps.dir / "kafka" / "retention.log").read_text()


@pytest.mark.heavy  # kills the durable broker: in `make test-heavy`
def test_concurrent_producers_and_a_broker_kill_lose_nothing() -> None:
    """Eight idempotent producers at once (the orchestrator's parallel jobs), then kill -9 of the
    broker and more records: every acknowledged record is there exactly once, offsets continue.

    Guards the S3 store's conditional PUTs and whole-object reads (common/embedded_s3_server.js):
    without them tansu fenced producers, failed produce requests and, after a restart, wrote new
    records over acknowledged ones."""
    import signal
    import threading

    from confluent_kafka import Consumer, Producer, TopicPartition

    from common import stack as stack_mod
    from common.kafka import ensure_topics, producer_config

    with PrivateStack(storage="durable") as ps:
        ps.cli("stack", "up")
        s = ps.settings()
        topics = [f"trialsync.bronze.conc_{i}_staging" for i in range(4)]
        ensure_topics(topics, s, partitions=3)
        acked: list[tuple[str, int, int]] = []
        errors: list[str] = []
        lock = threading.Lock()

        def cb(err: object, msg: object) -> None:
            with lock:
                if err is not None:
                    errors.append(str(err))
                else:
                    acked.append((msg.topic(), msg.partition(), msg.offset()))  # type: ignore[attr-defined]

        def work(w: int, n: int, tag: str) -> None:
            p = Producer(producer_config(s, **{"linger.ms": 5}))
            for i in range(n):
                p.produce(topics[(w + i) % 4], key=f"{tag}{w}:{i}".encode(), value=b"x" * 200, on_delivery=cb)
                if i % 200 == 0:
                    p.poll(0)
            assert p.flush(60) == 0

        threads = [threading.Thread(target=work, args=(w, 500, "a")) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(acked) == 4000 and len(set(acked)) == 4000

        os.kill(ps.state().kafka_pid, signal.SIGKILL)
        st = ps.state()
        settings = ps.settings().model_copy(update={"kafka_bootstrap_servers": None, "trialsync_broker_storage": "durable",
                                                    "database_url": None})
        st.kafka_pid = None
        stack_mod.write_state(stack_mod.start_broker(settings, st), settings)
        work(0, 1000, "b")
        assert not errors and len(set(acked)) == 5000, "offsets after the restart must not reuse acknowledged ones"

        # the S3 store itself dies: status says so, `stack up` brings it back under the running broker
        os.kill(ps.state().s3_pid, signal.SIGKILL)
        rc, st = wait_until(lambda: (lambda r: r if r[0] == 3 else None)(ps.status()), 15, what="status to see it")
        assert st["broker"]["running"] is False
        ps.cli("stack", "up")
        assert ps.status()[0] == 0

        c = Consumer({"bootstrap.servers": f"127.0.0.1:{ps.state().kafka_port}", "group.id": "verify",
                      "enable.auto.commit": False})
        c.assign([TopicPartition(t, p, 0) for t in topics for p in range(3)])
        keys: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(keys) < 5000 and time.monotonic() < deadline:
            keys += [m.key() for m in c.consume(5000, 1.0) if m.error() is None]
        c.close()
        assert len(keys) == 5000 and len(set(keys)) == 5000
