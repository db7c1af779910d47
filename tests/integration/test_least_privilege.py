"""Least privilege by default, through the real commands against the session's embedded stack:

* the embedded PostgreSQL asks every login for its password (no ``trust``); services log in as
  ``trialsync_writer``, the history API as ``trialsync_reader``; neither is a superuser;
* the history API answers every request under the read-only login (rejects included), and a
  missing grant is a JSON error that says what to run -- never a plain-text 500;
* ``trialsync api`` refuses to serve a non-loopback interface without API_TOKEN (unless --no-auth);
* quality checks' SQL (writable by the writer role) runs read-only as the reader, with a timeout:
  it can neither write, nor switch to a writing role, nor read the pseudonymisation key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TRIALSYNC = str(Path(sys.executable).parent / "trialsync")


def _dsn_without_password(dsn: str, user: str) -> str:
    from urllib.parse import urlsplit

    p = urlsplit(dsn)
    return f"postgresql://{user}@{p.hostname}:{p.port}{p.path}"


def _popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([TRIALSYNC, *args], env={**os.environ, **(env or {})}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.stdout.read() if proc.stdout else ""


def _wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.get(url, timeout=3)
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} never answered (exit {proc.poll()}): {_stop(proc)}") from None
            time.sleep(0.2)


# -- logins ----------------------------------------------------------------------------------------

def test_embedded_server_requires_passwords_and_logins_are_not_superusers(stack: dict[str, str]) -> None:
    for user in ("postgres", "trialsync_writer", "trialsync_reader"):
        with pytest.raises(psycopg.OperationalError, match="no password supplied|password authentication failed"):
            psycopg.connect(_dsn_without_password(stack["dsn"], user), connect_timeout=5)
    with psycopg.connect(stack["dsn"]) as conn:
        roles = dict(conn.execute(
            "SELECT rolname, rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls FROM pg_roles "
            "WHERE rolname IN ('trialsync_writer', 'trialsync_reader')").fetchall())
        assert roles == {"trialsync_writer": False, "trialsync_reader": False}
        member = conn.execute("SELECT pg_has_role('trialsync_writer', 'trialsync_etl', 'MEMBER'), "
                              "pg_has_role('trialsync_reader', 'trialsync_analytics', 'MEMBER'), "
                              "pg_has_role('trialsync_reader', 'trialsync_etl', 'MEMBER')").fetchone()
        assert member == (True, True, False)
    logins = Path(stack["state_dir"]) / "pg" / "logins.json"
    assert logins.stat().st_mode & 0o077 == 0  # the passwords file is private
    with psycopg.connect(stack["reader_dsn"]) as conn:
        for q in ("SELECT * FROM etl.dw_api_credentials", "SELECT secret FROM etl.dw_pseudonym_secret",
                  "DELETE FROM etl.dw_etl_runs WHERE false"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(q)
            conn.rollback()


def test_services_log_in_as_the_writer_and_the_api_as_the_reader(stack: dict[str, str]) -> None:
    from common.stack import free_port

    port = free_port()
    api = _popen("api", "--port", str(port), env={"API_TOKEN": "lp-token-123456", "ENABLE_METRICS": "false"})
    # the transformer (a service that holds a connection from the start), on topics of its own
    load = _popen("transform", env={"ENABLE_METRICS": "false", "KAFKA_TOPIC_PREFIX": "lp" + str(port)})
    try:
        assert _wait_http(f"http://127.0.0.1:{port}/api/v1/jobs?limit=1", api).status_code == 401
        ok = requests.get(f"http://127.0.0.1:{port}/api/v1/jobs?limit=1",
                          headers={"Authorization": "Bearer lp-token-123456"}, timeout=10)
        assert ok.status_code == 200, ok.text
        pids = {"api": api.pid, "transform": load.pid}
        deadline = time.monotonic() + 60
        with psycopg.connect(stack["dsn"], autocommit=True) as conn:
            while True:
                seen = {}
                for name, pid in pids.items():
                    rows = conn.execute(
                        "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = 'trialsync' AND "
                        "client_port IN (SELECT unnest(%s::int[]))", (_client_ports(pid),)).fetchall()
                    seen[name] = {r[0] for r in rows}
                if all(seen.values()) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert seen == {"api": {"trialsync_reader"}, "transform": {"trialsync_writer"}}, seen
    finally:
        out = _stop(api) + _stop(load)
    assert "lp-token-123456" not in out


def _client_ports(pid: int) -> list[int]:
    """Local TCP ports of ``pid``'s sockets (its connections to PostgreSQL among them)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes:
                ports.append(int(f[1].rsplit(":", 1)[1], 16))
    return ports


# -- the history API under the read-only login -----------------------------------------------------

@pytest.fixture
def run_with_reject(stack: dict[str, str]) -> Iterator[int]:
    with psycopg.connect(stack["dsn"], autocommit=True) as conn:
        run_id = conn.execute("INSERT INTO etl.dw_etl_runs (job_id, run_status, mode, trigger, completed_at) "
                              "VALUES (1, 'partial', 'full', 'test', now()) RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO etl.dw_etl_rejects (table_name, topic, kafka_partition, kafka_offset, record_key, "
                     "job_id, run_id, stage, error_class, error_message, payload) VALUES ('dim_sites_staging', "
                     "'x.bronze.dim_sites_staging', 0, %s, 'cc1:1', 1, %s, 'load', 'BadRecord', 'bad', '{}')",
                     (run_id, run_id))
    try:
        yield run_id
    finally:
        with psycopg.connect(stack["dsn"], autocommit=True) as conn:
            conn.execute("DELETE FROM etl.dw_etl_rejects WHERE run_id = %s", (run_id,))
            conn.execute("DELETE FROM etl.dw_etl_runs WHERE id = %s", (run_id,))


def test_history_api_reads_everything_as_the_reader_and_errors_are_json(stack: dict[str, str],
                                                                        run_with_reject: int) -> None:
    from common.stack import free_port

    port = free_port()
    auth = {"Authorization": "Bearer lp-token-abcdef"}
    api = _popen("api", "--port", str(port), env={"API_TOKEN": "lp-token-abcdef", "ENABLE_METRICS": "false"})
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", api)
        for path in ("/jobs", "/jobs/1", "/runs", f"/runs/{run_with_reject}", f"/runs/{run_with_reject}/rejects",
                     "/transform-runs", "/quality-results"):
            r = requests.get(base + path, headers=auth, timeout=10)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json", (path, r.text)
        detail = requests.get(f"{base}/runs/{run_with_reject}", headers=auth, timeout=10).json()
        assert detail["rejects"]["total"] == 1 and detail["rejects"]["first"][0]["error_class"] == "BadRecord"
        # a grant missing under the read-only login: a JSON answer naming the fix, not a plain-text 500
        with psycopg.connect(stack["dsn"], autocommit=True) as conn:
            conn.execute("REVOKE SELECT ON etl.dw_etl_rejects FROM trialsync_analytics")
        try:
            r = requests.get(f"{base}/runs/{run_with_reject}", headers=auth, timeout=10)
        finally:
            with psycopg.connect(stack["dsn"], autocommit=True) as conn:
                conn.execute("GRANT SELECT ON etl.dw_etl_rejects TO trialsync_analytics")
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
        body = r.json()
        assert "permission denied for table dw_etl_rejects" in body["error"]
        assert "trialsync db migrate" in body["error"]
    finally:
        _stop(api)


# -- `trialsync api` without a token ----------------------------------------------------------------

def test_api_refuses_a_network_interface_without_a_token(stack: dict[str, str]) -> None:
    from common.stack import free_port

    env = {**os.environ, "ENABLE_METRICS": "false"}
    env.pop("API_TOKEN", None)
    port = free_port()
    refused = subprocess.run([TRIALSYNC, "api", "--host", "0.0.0.0", "--port", str(port)], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "API_TOKEN is not set and --host 0.0.0.0" in lines[0] and "--no-auth" in lines[0]
    # told explicitly, or on loopback, it serves (openly)
    for args in (["--host", "0.0.0.0", "--no-auth"], ["--host", "127.0.0.1"]):
        port = free_port()
        proc = subprocess.Popen([TRIALSYNC, "api", "--port", str(port), *args], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            r = _wait_http(f"http://127.0.0.1:{port}/api/v1/jobs?limit=1", proc)
            assert r.status_code == 200, (args, r.text)
        finally:
            _stop(proc)


# -- quality checks run read-only as the reader -----------------------------------------------------

PLANTED = {
    # what a writer login could put into etl.dw_quality_checks
    "lp_who_runs_me": "SELECT current_user::text || '/' || session_user::text",
    "lp_reads_key": "SELECT secret::text FROM etl.dw_pseudonym_secret",
    "lp_switches_role": "SELECT set_config('role', 'trialsync_etl', true)",
    "lp_writes_via_definer": "SELECT silver.lp_planted_write()",
    "lp_never_ends": "SELECT pg_sleep(60)::text",
}


@pytest.fixture
def planted_checks(stack: dict[str, str]) -> Iterator[None]:
    # planted by the writer login itself, as an attacker holding it would
    with psycopg.connect(stack["writer_dsn"], autocommit=True) as conn:
        conn.execute("""CREATE OR REPLACE FUNCTION silver.lp_planted_write() RETURNS text
                        LANGUAGE plpgsql SECURITY DEFINER AS $$
                        BEGIN UPDATE etl.dw_etl_jobs SET priority = 99 WHERE id = 1; RETURN 'written'; END $$""")
        for name, q in PLANTED.items():
            # scope 1: the checks always run (a check over nothing is recorded `empty` and never runs)
            conn.execute("INSERT INTO etl.dw_quality_checks (check_name, target_table, severity, category, "
                         "description, check_sql, scope_sql) VALUES (%s, 'silver.dim_sites', 'info', 'required', "
                         "'planted by a test', %s, 'SELECT 1')", (name, q))
    try:
        yield
    finally:
        with psycopg.connect(stack["dsn"], autocommit=True) as conn:
            conn.execute("DELETE FROM etl.dw_quality_results WHERE check_name LIKE 'lp\\_%'")
            conn.execute("DELETE FROM etl.dw_quality_checks WHERE check_name LIKE 'lp\\_%'")
            conn.execute("DROP FUNCTION IF EXISTS silver.lp_planted_write()")


def test_quality_checks_cannot_write_escalate_or_read_the_key(stack: dict[str, str], planted_checks: None) -> None:
    with psycopg.connect(stack["dsn"]) as conn:
        prio = conn.execute("SELECT priority FROM etl.dw_etl_jobs WHERE id = 1").fetchone()[0]
        secret = conn.execute("SELECT secret FROM etl.dw_pseudonym_secret").fetchone()[0]
    t0 = time.monotonic()
    proc = subprocess.run([TRIALSYNC, "transform", "--now", "--procedure", "load_dim_sites", "--json"],
                          env={**os.environ, "TRANSFORM_QUALITY_TIMEOUT_SECONDS": "2", "ENABLE_METRICS": "false"},
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr  # info-severity checks never fail the batch
    quality = {q["check"]: q for q in json.loads(proc.stdout)["quality"]}
    assert quality["lp_who_runs_me"]["sample_keys"] == ["trialsync_analytics/trialsync_reader"]
    with psycopg.connect(stack["dsn"]) as conn:
        errors = dict(conn.execute("SELECT check_name, error_message FROM etl.v_quality_latest "
                                   "WHERE check_name LIKE 'lp\\_%'").fetchall())
        assert conn.execute("SELECT priority FROM etl.dw_etl_jobs WHERE id = 1").fetchone()[0] == prio
        stored = [k for (ks,) in conn.execute("SELECT sample_keys FROM etl.dw_quality_results").fetchall()
                  for k in ks or []]
    assert secret not in stored and secret not in proc.stdout + proc.stderr
    assert quality["lp_reads_key"]["status"] == "error"
    assert "permission denied for table dw_pseudonym_secret" in errors["lp_reads_key"]
    assert quality["lp_switches_role"]["status"] == "error"
    assert "permission denied to set role" in errors["lp_switches_role"]
    assert quality["lp_writes_via_definer"]["status"] == "error"
    assert "read-only transaction" in errors["lp_writes_via_definer"]
    assert quality["lp_never_ends"]["status"] == "error"
    assert "statement timeout" in errors["lp_never_ends"]
    assert elapsed < 60  # the 60 s sleep was cut at the 2 s timeout
    # the model's own checks of that table still ran (over an empty table: `empty`, never a pass)
    assert quality["dim_sites_required_fields"]["status"] in ("pass", "empty")
    assert quality["dim_sites_required_fields"].get("error") is None
