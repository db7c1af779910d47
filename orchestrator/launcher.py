"""Run one extraction in a child process, so the orchestrator can stop it.

Why a process per extraction: a job that hangs (an API that never answers, a stuck socket) must
be stoppable when it exceeds its timeout, and threads cannot be killed. The child is forked from a
``forkserver`` that has already imported the extractor, so starting one costs a fork (a few ms,
measured in ``bench/orch_overhead.py``) instead of a fresh interpreter and its imports (~1 s for
``trialsync extract``). The child

* becomes its own process group (``setsid``), so a timeout kills it together with any worker
  processes the extractor forked;
* dies with the orchestrator (``PR_SET_PDEATHSIG`` on Linux; the forkserver exits when its parent
  does), so an orchestrator killed with ``kill -9`` leaves no orphan extractions behind;
* gets the orchestrator's environment at launch time (the forkserver's own environment is from
  when it started), so settings such as the demo's throwaway API key reach it without ever being
  printed or written to disk;
* reports over a pipe: ``("progress", counters)`` a few times a second, then ``("result",
  RunResult.to_dict())`` or ``("error", {error_class, message})`` when there was no run to record.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.jobs import Job

PROGRESS_INTERVAL = 0.25
_PRELOAD = ["common.config", "common.db", "common.kafka", "common.logging", "orchestrator.launcher"]


@dataclass(frozen=True)
class LaunchRequest:
    """Everything one attempt of one job needs (picklable)."""

    job: Job
    mode: str = "incremental"
    only_parents: list[dict[str, Any]] | None = None
    trigger: str = "orchestrator"
    parent_run_id: int | None = None
    orchestration_id: str | None = None
    attempt: int = 1
    workers: int | None = None
    processes: int | None = None


class JobHandle(Protocol):
    """A running attempt, as the runner sees it."""

    job_id: int
    pid: int | None

    def poll(self) -> list[tuple[str, Any]]: ...

    def is_alive(self) -> bool: ...

    def exitcode(self) -> int | None: ...

    def kill(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def wait_objects(self) -> list[Any]: ...


class Launcher(Protocol):
    def start(self, request: LaunchRequest) -> JobHandle: ...

    def close(self) -> None: ...


# -- the child side ------------------------------------------------------------------------------

class _PipeProgress:
    """The extractor's ProgressSink, forwarding counters over the pipe (throttled)."""

    def __init__(self, conn: multiprocessing.connection.Connection):
        self.conn = conn
        self._last = 0.0

    def start(self, job: Job, parents_total: int | None) -> None:
        self._send({"parents_total": parents_total})

    def update(self, **counters: Any) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._send(counters)

    def finish(self, result: Any) -> None:
        return

    def _send(self, counters: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("progress", counters))


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _redirect_output(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def child_main(request: LaunchRequest, env: dict[str, str], conn: multiprocessing.connection.Connection,
               log_path: str | None) -> None:
    """Entry point of the child process: run the attempt, report its result, exit."""
    with contextlib.suppress(OSError):
        os.setsid()
    _set_parent_death_signal()
    if log_path:
        _redirect_output(log_path)
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    from common import config
    from common.logging import setup_logging

    config.reset_settings()
    try:
        setup_logging("extractor")
        from producers.extractor import run_job

        result = run_job(request.job, mode=request.mode, only_parents=request.only_parents,  # type: ignore[arg-type]
                         trigger=request.trigger, progress=_PipeProgress(conn), parent_run_id=request.parent_run_id,
                         orchestration_id=request.orchestration_id, attempt=request.attempt,
                         workers=request.workers, processes=request.processes)
        conn.send(("result", result.to_dict()))
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", {"error_class": "Interrupted", "message": "the extraction was interrupted"}))
    except Exception as e:  # noqa: BLE001 - reported to the orchestrator, which records it
        from common.logging import scrub

        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", {"error_class": type(e).__name__, "message": scrub(text)}))
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# -- the parent side -----------------------------------------------------------------------------

class ProcessHandle:
    def __init__(self, job_id: int, proc: multiprocessing.process.BaseProcess,
                 conn: multiprocessing.connection.Connection):
        self.job_id = job_id
        self.proc = proc
        self.conn = conn
        self.pid = proc.pid
        self._closed = False

    def poll(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        if self._closed:
            return out
        try:
            while self.conn.poll():
                out.append(self.conn.recv())
        except (EOFError, OSError):
            self._closed = True
        return out

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    def exitcode(self) -> int | None:
        return self.proc.exitcode

    def kill(self) -> None:
        """SIGKILL the child's whole process group (its extractor workers too)."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)

    def terminate(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)

    def join(self, timeout: float | None = None) -> None:
        self.proc.join(timeout)
        if not self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.close()
            self._closed = True

    def wait_objects(self) -> list[Any]:
        return [] if self._closed else [self.conn, self.proc.sentinel]


class ProcessLauncher:
    """Starts attempts in forkserver children (see the module docstring)."""

    def __init__(self, log_path: str | None = None, start_method: str = "forkserver"):
        self.log_path = log_path
        if start_method == "forkserver":
            multiprocessing.set_forkserver_preload(_PRELOAD + _optional_preload())
        self.ctx = multiprocessing.get_context(start_method)

    def start(self, request: LaunchRequest) -> ProcessHandle:
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=child_main, args=(request, dict(os.environ), child, self.log_path),
                                name=f"trialsync-job-{request.job.id}", daemon=False)
        proc.start()
        child.close()
        return ProcessHandle(request.job.id, proc, parent)

    def close(self) -> None:
        return


def _optional_preload() -> list[str]:
    """The extractor, when it is installed (imported once in the forkserver, not per child)."""
    import importlib.util

    return ["producers.extractor"] if importlib.util.find_spec("producers.extractor") else []
