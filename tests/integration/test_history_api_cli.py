"""`trialsync api` as operators run it: a real process serving the API on --port and /metrics,
/healthz, /readyz on METRICS_PORT, stopping cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

pytestmark = pytest.mark.integration


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.get(url, timeout=3)
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"{url} never answered (exit {proc.poll()}): {out}") from None
            time.sleep(0.2)


def test_api_command_serves_and_stops_on_sigterm(stack: dict[str, str]) -> None:
    from common.stack import free_port

    port, mport = free_port(), free_port()
    token = "cli-token-" + "k" * 12
    env = {**os.environ, "ENABLE_METRICS": "true", "METRICS_PORT": str(mport), "API_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "common.cli", "api", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        r = _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        assert r.status_code == 200
        jobs = requests.get(f"http://127.0.0.1:{port}/api/v1/jobs?limit=5",
                            headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert jobs.status_code == 200 and jobs.json()["total"] >= 90
        assert requests.get(f"http://127.0.0.1:{port}/api/v1/jobs", timeout=10).status_code == 401
        ready = _wait_http(f"http://127.0.0.1:{mport}/readyz", proc)
        assert ready.status_code == 200 and ready.json()["service"] == "api"
        metrics = requests.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text
        assert 'trialsync_db_pool_connections{pool="api",state="idle"}' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    out = proc.stdout.read() if proc.stdout else ""
    assert rc == 0, out
    assert token not in out
