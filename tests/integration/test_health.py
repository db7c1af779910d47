"""/healthz and /readyz against real dependencies: a separate embedded stack (its own PostgreSQL
and broker in a temp dir, never the session stack) is stopped and started under a live
MetricsServer, and the API check probes a real HTTP endpoint."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.http_helpers import fixed_status_server

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def _wait_ready(url: str, want: int, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = requests.get(url + "/readyz", timeout=10)
        if r.status_code == want or time.monotonic() > deadline:
            assert r.status_code == want, r.text
            return r.json()
        time.sleep(0.3)


@pytest.fixture(scope="module")
def own_stack() -> Iterator:
    """An embedded PostgreSQL + broker of this module only, so stopping them harms nobody."""
    import shutil

    from common import stack
    from common.config import load_settings

    sd = Path(tempfile.mkdtemp(prefix="trialsync-health-"))
    sd.chmod(0o755)
    settings = load_settings(trialsync_state_dir=sd, database_url=None, database_host=None,
                             kafka_bootstrap_servers=None)
    assert settings.uses_embedded_database and settings.uses_embedded_broker
    try:
        stack.up(settings)
        yield settings
    finally:
        stack.down(settings)
        shutil.rmtree(sd, ignore_errors=True)


@pytest.fixture
def loader_server(own_stack) -> Iterator[str]:
    from common.health import service_checks
    from common.metrics import MetricsServer

    srv = MetricsServer(0, "loader", service_checks("loader", own_stack), host="127.0.0.1").start()
    try:
        yield f"http://127.0.0.1:{srv.port}"
    finally:
        srv.stop()


def test_readyz_follows_the_database(own_stack, loader_server: str) -> None:
    from common import stack

    body = _wait_ready(loader_server, 200)
    assert body == {"ready": True, "service": "loader", "checks": {
        "database": {"ok": True, "detail": "ok"}, "broker": {"ok": True, "detail": "1 broker(s)"}}}

    st = stack.stop_postgres(own_stack)
    stack.write_state(st, own_stack)
    try:
        body = _wait_ready(loader_server, 503)
        assert body["ready"] is False
        assert body["checks"]["database"]["ok"] is False
        assert "DATABASE_URL" in body["checks"]["database"]["detail"]
        assert "postgresql://" not in body["checks"]["database"]["detail"]
        assert body["checks"]["broker"]["ok"] is True
        # alive while not ready: the orchestrator must not restart a process that only waits
        assert requests.get(loader_server + "/healthz", timeout=5).status_code == 200
    finally:
        st = stack.start_postgres(own_stack, st)
        stack.write_state(st, own_stack)
    body = _wait_ready(loader_server, 200)
    assert body["checks"]["database"]["ok"] is True


def test_readyz_follows_the_broker(own_stack, loader_server: str) -> None:
    from common import stack

    _wait_ready(loader_server, 200)
    st = stack.stop_broker(own_stack)
    stack.write_state(st, own_stack)
    try:
        body = _wait_ready(loader_server, 503)
        assert body["checks"]["broker"]["ok"] is False
        assert "KAFKA_BOOTSTRAP_SERVERS" in body["checks"]["broker"]["detail"]
        assert body["checks"]["database"]["ok"] is True
    finally:
        st = stack.start_broker(own_stack, st)
        stack.write_state(st, own_stack)
    _wait_ready(loader_server, 200)


def test_metrics_endpoint_serves_the_families(loader_server: str) -> None:
    from common.metrics import RECORDS_LOADED

    RECORDS_LOADED.labels(table="dim_health_probe_staging", outcome="inserted").inc(3)
    text = requests.get(loader_server + "/metrics", timeout=5).text
    assert 'trialsync_records_loaded_total{outcome="inserted",table="dim_health_probe_staging"} 3.0' in text
    assert "# TYPE trialsync_job_run_duration_seconds histogram" in text
    assert requests.get(loader_server + "/nope", timeout=5).status_code == 404


@pytest.mark.parametrize("status,ok,needle", [(200, True, "HTTP 200"), (401, False, "CC_API_KEY"),
                                              (403, False, "CC_API_KEY"), (500, False, "HTTP 500")])
def test_api_check_probes_with_the_key(status: int, ok: bool, needle: str) -> None:
    from common.config import load_settings
    from common.health import api_check

    key = "key-" + "x" * 20
    with fixed_status_server(status, b'{"value": []}') as (base, seen):
        s = load_settings(cc_api_base_url=base, cc_api_key=key, cc_api_key_header="CCAPIKey")
        good, detail = api_check(s)()
    assert good is ok and needle in detail
    assert key not in detail
    assert seen and seen[0]["ccapikey"] == key
    assert seen[0]["path"].endswith("$top=1") or "%24top=1" in seen[0]["path"]


def test_extractor_readiness_includes_the_api(own_stack) -> None:
    from common.health import service_checks
    from common.metrics import MetricsServer

    with fixed_status_server(401) as (base, _):
        s = own_stack.model_copy(update={"cc_api_base_url": base})
        ok, body = MetricsServer.evaluate("extractor", service_checks("extractor", s))
    assert ok is False and b'"api":{"ok":false' in body and b"CC_API_KEY" in body
    assert set(service_checks("loader", s)) == {"database", "broker"}


@pytest.mark.parametrize("service,expected", [
    ("extractor", {"database", "broker", "api", "custom"}), ("loader", {"database", "broker", "custom"}),
    ("transformer", {"database", "broker", "custom"}), ("scheduler", {"database", "broker", "custom"}),
])
def test_every_service_gets_the_standard_checks(service: str, expected: set[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Services call start_metrics_server(service, port, own_checks): /readyz covers the database,
    the broker and (extractors) the API whatever they pass themselves."""
    from common.config import reset_settings
    from common.metrics import start_metrics_server

    monkeypatch.setenv("ENABLE_METRICS", "true")
    reset_settings()
    srv = start_metrics_server(service, 0, {"custom": lambda: (True, "ok")})
    try:
        assert srv is not None and set(srv.checks) == expected
        body = requests.get(f"http://127.0.0.1:{srv.port}/readyz", timeout=30).json()
        assert body["checks"]["custom"] == {"ok": True, "detail": "ok"} and set(body["checks"]) == expected
    finally:
        if srv is not None:
            srv.stop()
        reset_settings()
