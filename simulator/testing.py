"""Test helper: a real simulator in a subprocess, over real HTTP.

::

    from simulator.testing import SimulatorProcess

    with SimulatorProcess(scale=0.002, seed=42) as sim:
        requests.get(f"{sim.base_url}/api/v1/studies/odata", headers={sim.key_header: sim.api_key})
        sim.mutate("subjects", modify=0.1)             # -> {"modified": [ids], ...}
        sim.set_faults("429@/api/v1/patients/*,count=2")
        truth = sim.expected("/api/v1/studies/{studyId}/subjects/odata")  # [{"params", "record"}]
        sim.stats()                                     # requests per route template and status

It starts ``python -m common.cli simulator serve … --port 0 --ready-file F`` (the real command,
the real server), waits until F names the port and ``/_sim/health`` answers, and kills the
process group on ``stop()``/exit. The API key is a throwaway value, never a real one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent


class SimulatorError(RuntimeError):
    """The simulator did not start, or an admin call failed (message includes its answer/log)."""


class SimulatorProcess:
    """A running simulator subprocess with admin helpers. Use as a context manager."""

    def __init__(self, scale: float = 0.002, seed: int = 42, port: int = 0, latency_ms: float = 0,
                 faults: str | None = None, api_key: str = "test-key", rate_limit: float | None = None,
                 odata_shape: str = "spec", key_header: str = "X-ApiKey", workers: int = 1,
                 startup_timeout: float = 120.0, extra_args: list[str] | None = None):
        self.scale, self.seed, self.port = scale, seed, port
        self.latency_ms, self.faults, self.rate_limit = latency_ms, faults, rate_limit
        self.api_key, self.key_header, self.odata_shape, self.workers = api_key, key_header, odata_shape, workers
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self.admin_url = ""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._session = requests.Session()

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise SimulatorError("simulator not started")
        return self.proc.pid

    @property
    def headers(self) -> dict[str, str]:
        """Headers an API client sends: the key in the configured header."""
        return {self.key_header: self.api_key}

    def start(self) -> SimulatorProcess:
        self._tmp = tempfile.TemporaryDirectory(prefix="trialsync-sim-")
        ready = Path(self._tmp.name) / "ready.json"
        logf = Path(self._tmp.name) / "sim.log"
        cmd = [sys.executable, "-m", "common.cli", "simulator", "serve", "--scale", str(self.scale),
               "--seed", str(self.seed), "--port", str(self.port), "--latency-ms", str(self.latency_ms),
               "--odata-shape", self.odata_shape, "--key-header", self.key_header, "--workers", str(self.workers),
               "--ready-file", str(ready), *self.extra_args]
        if self.faults:
            cmd += ["--faults", self.faults]
        if self.rate_limit:
            cmd += ["--rate-limit", str(self.rate_limit)]
        env = {**os.environ, "SIM_API_KEY": self.api_key, "ENABLE_METRICS": "false"}
        self._log = logf.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SimulatorError(f"simulator exited with {self.proc.returncode}: {self.log_tail()}")
            if ready.exists():
                info = json.loads(ready.read_text())
                self.port = info["port"]
                self.base_url = info["base_url"]
                self.admin_url = info["admin_url"]
                if self._healthy():
                    return self
            time.sleep(0.05)
        self.stop()
        raise SimulatorError(f"simulator not ready after {self.startup_timeout}s: {self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            return self._session.get(f"{self.admin_url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._session.close()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log_tail(self, n: int = 4000) -> str:
        if self._tmp is None:
            return ""
        p = Path(self._tmp.name) / "sim.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    # -- API ------------------------------------------------------------------------------------
    def get(self, path: str, params: dict[str, Any] | None = None, **kw: Any) -> requests.Response:
        """GET ``base_url + path`` with the API key (a convenience for tests)."""
        return self._session.get(self.base_url + path, params=params, headers=self.headers, timeout=60, **kw)

    # -- admin ----------------------------------------------------------------------------------
    def _admin(self, method: str, path: str, **kw: Any) -> requests.Response:
        r = self._session.request(method, self.admin_url + path, timeout=600, **kw)
        if r.status_code >= 400:
            raise SimulatorError(f"{method} /_sim{path} -> {r.status_code}: {r.text}")
        return r

    def set_faults(self, spec: str | list[dict[str, Any]], append: bool = False) -> dict[str, Any]:
        body = {"spec": spec} if isinstance(spec, str) else {"rules": spec}
        return self._admin("POST", "/faults", json={**body, "append": append}).json()

    def clear_faults(self) -> dict[str, Any]:
        return self._admin("DELETE", "/faults").json()

    def faults_status(self) -> dict[str, Any]:
        return self._admin("GET", "/faults").json()

    def mutate(self, entity: str | None = None, *, endpoint: str | None = None, **changes: Any) -> dict[str, Any]:
        """``modify``/``insert``/``delete`` (fractions), ``*_count``, ``modify_ids``/``delete_ids``,
        ``parent_id``, ``spread_ms``, ``touch_parents``; returns ids (or records, for entities without ids)."""
        body = {"entity": entity, "endpoint": endpoint, **changes}
        return self._admin("POST", "/mutate", json={k: v for k, v in body.items() if v is not None}).json()

    def realistic(self, *, days: int | None = None, fraction: float | None = None,
                  touch_parents: bool = False) -> dict[str, Any]:
        """Days of realistic site activity (simulator/activity.py): ``days`` of it, or as many as it
        takes to change ``fraction`` of all live records; returns counts and ids per entity."""
        body = {"model": "realistic", "days": days, "fraction": fraction, "touch_parents": touch_parents or None}
        return self._admin("POST", "/mutate", json={k: v for k, v in body.items() if v is not None}).json()

    def advance_clock(self, seconds: float) -> str:
        return self._admin("POST", "/clock", json={"advance_seconds": seconds}).json()["clock"]

    def clock(self) -> str:
        return self._admin("GET", "/clock").json()["clock"]

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "/stats").json()

    def reset_stats(self) -> None:
        self._admin("DELETE", "/stats")

    def requests_to(self, template: str, status: int | None = 200) -> int:
        """How many requests hit an endpoint template (with this status; None = any)."""
        by = self.stats()["requests"].get(template, {})
        return sum(by.values()) if status is None else by.get(str(status), 0)

    def info(self) -> dict[str, Any]:
        return self._admin("GET", "/info").json()

    def counts(self) -> dict[str, Any]:
        return self._admin("GET", "/counts").json()

    def expected(self, endpoint_template: str | None = None, *, job: int | None = None) -> list[dict[str, Any]]:
        """Ground truth: every ``{"params", "record"}`` the endpoint returns over all valid parents."""
        params = {"job": job} if job is not None else {"endpoint": endpoint_template}
        r = self._admin("GET", "/expected", params=params)
        return [json.loads(line) for line in r.iter_lines() if line]

    def parents(self, endpoint_template: str) -> list[dict[str, int]]:
        """Every valid parameter set of a parameterized endpoint (with or without children)."""
        r = self._admin("GET", "/parents", params={"endpoint": endpoint_template})
        return [json.loads(line) for line in r.iter_lines() if line]
