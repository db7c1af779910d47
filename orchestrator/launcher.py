"""Run one extraction in a child process, so the orchestrator can stop it.

Why a process per extraction: a job that hangs (an API that never answers, a stuck socket) must
be stoppable when it exceeds its timeout, and threads cannot be killed. The child is forked from a
``forkserver`` that has already imported the extractor, so starting one costs a fork (a few ms,
measured in ``bench/orch_overhead.py``) instead of a fresh interpreter and its imports (~1 s for
``trialsync extract``). The child

* becomes its own process group (``setsid``), so a timeout kills it together with any worker
  processes the extractor forked;
* dies with the orchestrator, so an orchestrator killed with ``kill -9`` leaves no orphan
  extraction running without its job lock (another scheduler would run the job beside it). A
  forkserver child's parent is the forkserver, which does *not* exit with the orchestrator:
  every forkserver child holds the forkserver's "alive" pipe, so the forkserver waits for its
  children and ``PR_SET_PDEATHSIG`` never fires (seen: a scheduler killed mid-run, its extraction
  finished 40 s later). Each child therefore watches the orchestrator's pid and SIGKILLs its own
  process group within a second of the orchestrator's death (:func:`_watch_owner`);
  ``PR_SET_PDEATHSIG`` stays for the other start methods;
* gets the orchestrator's environment at launch time (the forkserver's own environment is from
  when it started), so settings such as the demo's throwaway API key reach it without ever being
  printed or written to disk;
* reports over a pipe with the typed messages of ``schemas/runs.py``: ``("progress", RunProgress)``
  a few times a second, then ``("result", RunResult)`` or ``("error", LaunchFailure)`` when there
  was no run to record.

Two launchers share that contract: :class:`ProcessLauncher` (one fresh child per attempt) and
:class:`PoolLauncher` (the default: long-lived workers, one per concurrent job, that keep their
Kafka producer warm between attempts; a worker that is killed is replaced).
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
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from schemas.jobs import Job
from schemas.runs import ChildMessage, LaunchFailure, RunProgress

if TYPE_CHECKING:
    from producers.extractor import Mode

PROGRESS_INTERVAL = 0.25
_PRELOAD = ["common.config", "common.db", "common.kafka", "common.logging", "orchestrator.launcher"]


@dataclass(frozen=True)
class LaunchRequest:
    """Everything one attempt of one job needs (picklable)."""

    job: Job
    mode: Mode = "incremental"
    only_parents: list[dict[str, Any]] | None = None
    trigger: str = "orchestrator"
    parent_run_id: int | None = None
    orchestration_id: str | None = None
    attempt: int = 1
    workers: int | None = None
    processes: int | None = None
    #: a failed run whose paged stream this attempt continues (producers.page_publisher.ResumePoint)
    resume_from: int | None = None


class JobHandle(Protocol):
    """A running attempt, as the runner sees it."""

    job_id: int
    pid: int | None

    def poll(self) -> list[ChildMessage]: ...

    def is_alive(self) -> bool: ...

    def exitcode(self) -> int | None: ...

    def kill(self) -> None: ...

    def terminate(self) -> None: ...

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
        self._send(RunProgress(parents_total=parents_total))

    def update(self, **counters: Any) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._send(RunProgress(**counters))

    def finish(self, result: Any) -> None:
        return

    def _send(self, progress: RunProgress) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(("progress", progress))


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


OWNER_POLL_SECONDS = 1.0


def _watch_owner(owner_pid: int, interval: float = OWNER_POLL_SECONDS) -> None:
    """Kill this process group as soon as the orchestrator ``owner_pid`` is gone (module docstring)."""
    import threading

    from common.stack import pid_alive

    def watch() -> None:
        while True:
            time.sleep(interval)
            if not pid_alive(owner_pid):
                if os.getpgrp() == os.getpid():  # our own group (setsid): the workers the extraction forked
                    with contextlib.suppress(OSError):
                        os.killpg(os.getpid(), signal.SIGKILL)
                os._exit(1)

    threading.Thread(target=watch, name="trialsync-owner-watch", daemon=True).start()


def _prepare_process(log_path: str | None, owner_pid: int | None = None) -> None:
    """Own process group (killable as a whole), die with the orchestrator, logs to a file if asked."""
    with contextlib.suppress(OSError):
        os.setsid()
    _set_parent_death_signal()
    if owner_pid is not None:
        _watch_owner(owner_pid)
    if log_path:
        _redirect_output(log_path)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def _apply_env(env: dict[str, str]) -> None:
    """Take the orchestrator's environment of this launch (settings re-read when it changed)."""
    if dict(os.environ) == env:
        return
    os.environ.clear()
    os.environ.update(env)
    from common import config
    from common.logging import setup_logging

    config.reset_settings()
    setup_logging("extractor")


INTERRUPTED = LaunchFailure(error_class="Interrupted", message="the extraction was interrupted")


def _run_one(request: LaunchRequest, conn: multiprocessing.connection.Connection) -> None:
    """One attempt: run_job, then ("result", ...) or ("error", ...) over the pipe."""
    try:
        from producers.extractor import run_job

        result = run_job(request.job, mode=request.mode, only_parents=request.only_parents,
                         trigger=request.trigger, progress=_PipeProgress(conn), parent_run_id=request.parent_run_id,
                         orchestration_id=request.orchestration_id, attempt=request.attempt,
                         workers=request.workers, processes=request.processes, resume_from=request.resume_from)
        conn.send(("result", result))
    except Exception as e:  # noqa: BLE001 - reported to the orchestrator, which records it
        from common.logging import scrub

        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", LaunchFailure(error_class=type(e).__name__, message=scrub(text))))


def child_main(request: LaunchRequest, env: dict[str, str], conn: multiprocessing.connection.Connection,
               log_path: str | None, owner_pid: int | None = None) -> None:
    """Entry point of a one-shot child process: run the attempt, report its result, exit."""
    _prepare_process(log_path, owner_pid)
    os.environ.clear()
    _apply_env(env)
    try:
        _run_one(request, conn)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", INTERRUPTED))
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def worker_main(conn: multiprocessing.connection.Connection, log_path: str | None,
                owner_pid: int | None = None) -> None:
    """Entry point of a pooled worker: run attempts one after the other until told to exit.

    The process keeps its Kafka producer, database driver and imports warm between attempts, which
    is most of what a fresh process pays (~1 s, see bench/orch_overhead.py). It is still a process
    of its own: a timeout kills it (and its group) and the pool starts a fresh one.
    """
    _prepare_process(log_path, owner_pid)
    os.environ.clear()
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg[0] != "run":
                return
            _, request, env = msg
            _apply_env(env)
            _run_one(request, conn)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", INTERRUPTED))
    finally:
        with contextlib.suppress(Exception):
            from producers.publisher import reset_publishers

            reset_publishers()
        with contextlib.suppress(OSError):
            conn.close()


#: the reason a run stopped by the orchestrator's SIGTERM records (the runner then marks it cancelled)
STOP_REASON = "stopped by the orchestrator"


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM: ask the running extraction to stop cleanly (it records itself with its end offsets);
    with nothing running, leave the process."""
    try:
        from producers.extractor import request_stop
    except ImportError:  # pragma: no cover - extractor not installed
        raise KeyboardInterrupt from None
    if request_stop(STOP_REASON) == 0:
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

    def poll(self) -> list[ChildMessage]:
        out: list[ChildMessage] = []
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
        """SIGTERM the child: its extraction stops cleanly and reports (see _sigterm_as_interrupt)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGTERM)

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

    def __init__(self, log_path: str | None = None,
                 start_method: Literal["forkserver", "spawn", "fork"] = "forkserver"):
        self.log_path = log_path
        if start_method == "forkserver":
            multiprocessing.set_forkserver_preload(_PRELOAD + _optional_preload())
        # get_context(<one of three literals>) resolves to its str overload, BaseContext, which has no Process
        self.ctx = cast(ForkServerContext | SpawnContext | ForkContext, multiprocessing.get_context(start_method))

    def start(self, request: LaunchRequest) -> ProcessHandle:
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=child_main, args=(request, dict(os.environ), child, self.log_path, os.getpid()),
                                name=f"trialsync-job-{request.job.id}", daemon=False)
        proc.start()
        child.close()
        return ProcessHandle(request.job.id, proc, parent)

    def close(self) -> None:
        return


class _Worker:
    def __init__(self, proc: multiprocessing.process.BaseProcess, conn: multiprocessing.connection.Connection):
        self.proc = proc
        self.conn = conn
        self.runs = 0
        self.busy = False
        self.dead = False


class PoolHandle:
    """An attempt running in a pooled worker; the worker returns to the pool with the result."""

    def __init__(self, job_id: int, worker: _Worker, pool: PoolLauncher):
        self.job_id = job_id
        self.worker = worker
        self.pool = pool
        self.pid = worker.proc.pid
        self._done = False

    def poll(self) -> list[ChildMessage]:
        out: list[ChildMessage] = []
        if self._done or self.worker.dead:
            return out
        try:
            while self.worker.conn.poll():
                msg = self.worker.conn.recv()
                out.append(msg)
                if msg[0] in ("result", "error"):
                    self._done = True
                    self.pool._release(self.worker)
                    break
        except (EOFError, OSError):
            self.worker.dead = True
        return out

    def is_alive(self) -> bool:
        return not self.worker.dead and self.worker.proc.is_alive()

    def exitcode(self) -> int | None:
        return self.worker.proc.exitcode

    def terminate(self) -> None:
        """SIGTERM the worker: its extraction stops cleanly and reports (see _sigterm_as_interrupt)."""
        if self.pid is not None and not self.worker.dead:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the worker's process group; the pool replaces it at the next launch."""
        self.worker.dead = True
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)
        self.pool._discard(self.worker)

    def join(self, timeout: float | None = None) -> None:
        if self._done and not self.worker.dead:
            return  # the worker lives on in the pool
        self.worker.proc.join(timeout)
        if not self.worker.proc.is_alive():
            self.worker.dead = True
            self.pool._discard(self.worker)

    def wait_objects(self) -> list[Any]:
        return [] if (self._done or self.worker.dead) else [self.worker.conn, self.worker.proc.sentinel]


class PoolLauncher:
    """Attempts in long-lived forkserver workers (one per concurrent job), replaced when killed.

    Why: a fresh extraction process spends ~1 s on its Kafka producer and first delivery before the
    first API call; over a 72-job run at 5 in parallel that is ~15 s of wall time. A worker is
    recycled after ``max_runs`` attempts so nothing accumulates forever.
    """

    def __init__(self, log_path: str | None = None, max_runs: int = 200):
        self.log_path = log_path
        self.max_runs = max_runs
        multiprocessing.set_forkserver_preload(_PRELOAD + _optional_preload())
        self.ctx = multiprocessing.get_context("forkserver")
        self.idle: list[_Worker] = []
        self.all: list[_Worker] = []

    def _spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=worker_main, args=(child, self.log_path, os.getpid()), name="trialsync-extract-worker",
                                daemon=False)
        proc.start()
        child.close()
        w = _Worker(proc, parent)
        self.all.append(w)
        return w

    def start(self, request: LaunchRequest) -> PoolHandle:
        w = None
        while self.idle:
            cand = self.idle.pop()
            if not cand.dead and cand.proc.is_alive():
                w = cand
                break
            self._discard(cand)
        if w is None:
            w = self._spawn()
        w.busy = True
        w.runs += 1
        w.conn.send(("run", request, dict(os.environ)))
        return PoolHandle(request.job.id, w, self)

    def _release(self, w: _Worker) -> None:
        w.busy = False
        if w.runs >= self.max_runs:
            self._retire(w)
        elif not w.dead:
            self.idle.append(w)

    def _retire(self, w: _Worker) -> None:
        with contextlib.suppress(OSError, ValueError):
            w.conn.send(("exit",))
        w.proc.join(10)
        if w.proc.is_alive():
            _kill_group(w.proc.pid)
            w.proc.join(5)
        self._discard(w)

    def _discard(self, w: _Worker) -> None:
        if not w.dead or w in self.all:
            _mark_metrics_dead(w.proc.pid)
        w.dead = True
        if w in self.idle:
            self.idle.remove(w)
        if w in self.all:
            self.all.remove(w)
        with contextlib.suppress(OSError):
            w.conn.close()

    def close(self) -> None:
        for w in list(self.all):
            if w.busy and w.proc.is_alive():
                _kill_group(w.proc.pid)
                w.proc.join(5)
                self._discard(w)
            else:
                self._retire(w)


def _kill_group(pid: int | None) -> None:
    """SIGKILL a started worker's whole process group (its extraction processes too)."""
    if pid is None:  # never started: nothing to kill
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _mark_metrics_dead(pid: int | None) -> None:
    """prometheus_client multiprocess mode: drop a gone worker's live gauges (counters stay)."""
    if pid and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)


def _optional_preload() -> list[str]:
    """The extractor, when it is installed (imported once in the forkserver, not per child)."""
    import importlib.util

    return ["producers.extractor"] if importlib.util.find_spec("producers.extractor") else []
