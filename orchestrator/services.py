"""Start and stop the long-running services of a local TrialSync: the CC simulator, the loader and
the transformer, as background processes with logs under the state directory.

Why here and not in ``common/stack.py``: the stack is infrastructure (PostgreSQL, broker) that
every command needs; these are TrialSync's own services that the demo (and a developer) starts
around a run. Each is the real command (``trialsync simulator serve`` / ``load`` /
``transform``) in its own session, so it keeps running after the demo returns -- the user can
look at its metrics and health endpoints -- and ``trialsync demo --stop`` (or
:meth:`Services.stop_all`) ends it.

``<state_dir>/services.json`` records pid, start time, log file and URLs of each service, so a
second ``trialsync demo`` finds (and restarts) what the first one left. Secrets (the simulator's
throwaway API key) travel to children in their environment only; the file never holds one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from common.config import Settings, env_for_child, get_settings
from common.logging import get_logger
from common.stack import free_port, pid_alive, state_dir

log = get_logger("services")

REPO = Path(__file__).resolve().parent.parent


class ServiceError(RuntimeError):
    """A service did not start or is not healthy; the message names it and its log file."""


@dataclass
class ServiceInfo:
    name: str
    pid: int
    log: str
    started_at: float
    urls: dict[str, str] = field(default_factory=dict)
    #: process start time (clock ticks since boot): a recycled pid is not mistaken for the service
    proc_start: int | None = None

    @property
    def alive(self) -> bool:
        if not pid_alive(self.pid):
            return False
        return self.proc_start is None or _proc_start(self.pid) == self.proc_start


def _proc_start(pid: int) -> int | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return int(data[data.rfind(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class Services:
    """The services of one state directory."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.dir = state_dir(self.settings)
        self.log_dir = self.dir / "logs"
        self.file = self.dir / "services.json"

    # -- bookkeeping ----------------------------------------------------------------------------
    def read(self) -> dict[str, ServiceInfo]:
        if not self.file.exists():
            return {}
        try:
            raw = json.loads(self.file.read_text())
            return {k: ServiceInfo(**v) for k, v in raw.items()}
        except (ValueError, TypeError):
            return {}

    def _write(self, infos: dict[str, ServiceInfo]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in infos.items()}, indent=2))
        os.replace(tmp, self.file)

    def _save(self, info: ServiceInfo) -> None:
        infos = self.read()
        infos[info.name] = info
        self._write(infos)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: {**asdict(info), "alive": info.alive} for name, info in self.read().items()}

    # -- starting -------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logf = self.log_dir / f"{name}.log"
        with open(logf, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
            out.flush()
            proc = subprocess.Popen([sys.executable, "-m", "common.cli", *args], cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return proc, logf

    def _child_env(self, **extra: str) -> dict[str, str]:
        env = env_for_child(self.settings)
        env["LOG_FORMAT"] = "json"
        env.update(extra)
        return env

    def start_simulator(self, scale: float, seed: int, api_key: str, timeout: float = 180.0,
                        extra_args: list[str] | None = None) -> ServiceInfo:
        """Serve the simulated CC API on a free port; return once it answers its health check."""
        self.stop("simulator")
        ready = self.dir / "simulator.ready.json"
        ready.unlink(missing_ok=True)
        env = self._child_env(SIM_API_KEY=api_key, ENABLE_METRICS="false")
        proc, logf = self._spawn("simulator", ["simulator", "serve", "--scale", str(scale), "--seed", str(seed),
                                               "--port", "0", "--ready-file", str(ready), *(extra_args or [])], env)
        deadline = time.monotonic() + timeout
        info: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(f"the simulator exited with code {proc.returncode} while starting: see {logf}")
            if ready.exists():
                with contextlib.suppress(ValueError):
                    info = json.loads(ready.read_text())
                if info and _http_ok(f"{info['admin_url']}/health"):
                    break
            time.sleep(0.1)
        else:
            _kill_group(proc.pid)
            raise ServiceError(f"the simulator did not become healthy within {timeout:g} s: see {logf}")
        assert info is not None
        base = str(info["base_url"])
        root = base.split("/CCSWEB")[0]
        si = ServiceInfo("simulator", proc.pid, str(logf), time.time(),
                         {"api": base, "admin": str(info["admin_url"]), "health": f"{root}/healthz",
                          "metrics": f"{root}/metrics"}, _proc_start(proc.pid))
        self._save(si)
        return si

    def start_consumer(self, name: str, args: list[str], timeout: float = 60.0) -> ServiceInfo:
        """Start ``trialsync load`` / ``trialsync transform`` with its own metrics port; wait for /healthz."""
        self.stop(name)
        port = free_port()
        env = self._child_env(METRICS_PORT=str(port), ENABLE_METRICS="true")
        proc, logf = self._spawn(name, args, env)
        health = f"http://127.0.0.1:{port}/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(f"`trialsync {' '.join(args)}` exited with code {proc.returncode} while starting: "
                                   f"see {logf}")
            if _http_ok(health):
                break
            time.sleep(0.1)
        else:
            _kill_group(proc.pid)
            raise ServiceError(f"`trialsync {' '.join(args)}` did not answer {health} within {timeout:g} s: see {logf}")
        si = ServiceInfo(name, proc.pid, str(logf), time.time(),
                         {"health": health, "ready": f"http://127.0.0.1:{port}/readyz",
                          "metrics": f"http://127.0.0.1:{port}/metrics"}, _proc_start(proc.pid))
        self._save(si)
        return si

    def start_loader(self, workers: int = 1) -> ServiceInfo:
        args = ["load"] + (["--workers", str(workers)] if workers > 1 else [])
        return self.start_consumer("loader", args)

    def start_transformer(self) -> ServiceInfo:
        return self.start_consumer("transformer", ["transform"])

    # -- stopping -------------------------------------------------------------------------------
    def stop(self, name: str, timeout: float = 30.0) -> bool:
        """SIGTERM the service's process group, wait, then SIGKILL; True when one was running."""
        infos = self.read()
        info = infos.get(name)
        if info is None:
            return False
        was = info.alive
        if was:
            _terminate_group(info.pid, timeout)
        infos.pop(name, None)
        self._write(infos)
        if was:
            log.info("service_stopped", name=name, service_pid=info.pid)
        return was

    def stop_all(self) -> list[str]:
        stopped = []
        # the simulator last: consumers first finish what they hold
        for name in ("transformer", "loader", "simulator"):
            if self.stop(name):
                stopped.append(name)
        for name in list(self.read()):
            if self.stop(name):
                stopped.append(name)
        return stopped


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _terminate_group(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if pid_alive(pid):
        _kill_group(pid)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
