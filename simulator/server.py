"""Run the simulator on uvicorn (httptools + uvloop), one worker by default.

The listening socket is bound here, before uvicorn starts, so ``--port 0`` works: the real port
is known at once and written to ``--ready-file`` (JSON: base_url, port, pid, key_header) after the
data model is built -- which is how :class:`simulator.testing.SimulatorProcess` waits for
readiness without polling a guessed port.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict
from pathlib import Path

import uvicorn

from common.logging import get_logger
from simulator.admin import handle_admin
from simulator.app import SimConfig, Simulator
from simulator.spec import BASE_PATH

log = get_logger("simulator")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(cfg: SimConfig, ready_file: Path | None = None, log_level: str = "warning") -> None:
    """Build the data, bind, announce readiness, serve until SIGINT/SIGTERM."""
    sock = bind_socket(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    cfg.port = port
    shown_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host  # noqa: S104 - display only
    info = {"base_url": f"http://{shown_host}:{port}{BASE_PATH}", "admin_url": f"http://{shown_host}:{port}/_sim",
            "port": port, "pid": os.getpid(), "key_header": cfg.key_header, "scale": cfg.scale, "seed": cfg.seed}
    if cfg.workers > 1:
        raw = asdict(cfg)
        raw.pop("api_key")
        os.environ["SIM_CONFIG_JSON"] = json.dumps(raw)
        os.environ["SIM_API_KEY"] = cfg.api_key
        config = _uvicorn_config("simulator.server:create_app", log_level, factory=True, workers=cfg.workers)
        _announce(info, ready_file)
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
        return
    app = Simulator(cfg, admin=handle_admin)
    config = _uvicorn_config(app, log_level)
    server = uvicorn.Server(config)
    _announce(info, ready_file)
    log.info("simulator_ready", **{k: v for k, v in info.items() if k != "pid"})
    server.run(sockets=[sock])


def _uvicorn_config(app: Simulator | str, log_level: str, factory: bool = False,
                    workers: int | None = None) -> uvicorn.Config:
    """The uvicorn settings of both modes (one process, or ``--workers N`` building the app per worker)."""
    return uvicorn.Config(app, http="httptools", loop="uvloop", log_level=log_level, access_log=False,
                          lifespan="off", timeout_keep_alive=30, server_header=False, factory=factory,
                          workers=workers)


def _announce(info: dict, ready_file: Path | None) -> None:
    print(f"simulator ready: {info['base_url']} (admin {info['admin_url']}, pid {info['pid']})", flush=True)
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(ready_file)


_APP: Simulator | None = None


def create_app() -> Simulator:
    """uvicorn factory for ``--workers N``: configuration arrives as JSON in SIM_CONFIG_JSON."""
    global _APP
    if _APP is None:
        raw = json.loads(os.environ["SIM_CONFIG_JSON"])
        raw["api_key"] = os.environ.get("SIM_API_KEY", "")
        _APP = Simulator(SimConfig(**raw), admin=handle_admin)
    return _APP
