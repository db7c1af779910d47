"""Readiness checks for ``/readyz`` (and the building blocks of ``trialsync doctor``).

Each factory returns a ``ReadinessCheck``: a no-argument callable answering ``(ok, detail)``.
Why factories and not one ``ready()`` function: each service depends on different things (the
loader on the database and the broker, an extractor also on the Clinical Conductor API), so each
passes exactly the checks it needs to :class:`common.metrics.MetricsServer`.

Details are one line, name the setting to fix, and never contain a DSN, a key or a password.
Checks are cached for a couple of seconds (:func:`cached`) so a tight probe interval or several
scrapers never hammer the database or the API.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from common.config import Settings, get_settings

ReadinessCheck = Callable[[], tuple[bool, str]]

_DSN_RE = re.compile(r"postgres(ql)?://\S+")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return _DSN_RE.sub("<dsn>", text)[:300]


def cached(check: ReadinessCheck, ttl: float = 2.0) -> ReadinessCheck:
    """Remember a check's answer for ``ttl`` seconds (thread-safe; one probe at a time)."""
    lock = threading.Lock()
    at, last = 0.0, (False, "not checked yet")

    def run() -> tuple[bool, str]:
        nonlocal at, last
        with lock:
            now = time.monotonic()
            if now - at < ttl:
                return last
            try:
                value = check()
            except Exception as e:  # noqa: BLE001 - a failing probe is a not-ready answer
                value = (False, f"{type(e).__name__}: {_short(e)}")
            at, last = time.monotonic(), value
            return value

    return run


def database_check(settings: Settings | None = None, timeout: int = 2, login: str = "writer") -> ReadinessCheck:
    """Ready when PostgreSQL accepts ``login``'s connection and answers ``SELECT 1``."""

    def check() -> tuple[bool, str]:
        import psycopg

        from common.stack import database_dsn

        s = settings or get_settings()
        try:
            with psycopg.connect(database_dsn(s, login=login), connect_timeout=timeout, autocommit=True,
                                 application_name="trialsync-readyz") as conn:
                conn.execute("SELECT 1")
        except Exception as e:  # noqa: BLE001 - StackError, OperationalError...
            return False, f"database unreachable ({_short(e)}): check DATABASE_URL / DATABASE_HOST"
        return True, "ok"

    return check


def broker_check(settings: Settings | None = None, timeout: float = 2.0) -> ReadinessCheck:
    """Ready when the Kafka-API broker answers a metadata request."""

    def check() -> tuple[bool, str]:
        from confluent_kafka.admin import AdminClient

        from common.stack import bootstrap_servers

        s = settings or get_settings()
        try:
            admin = AdminClient({"bootstrap.servers": bootstrap_servers(s), "client.id": "trialsync-readyz",
                                 "socket.timeout.ms": int(timeout * 1000), "log_level": 0})
            md = admin.list_topics(timeout=timeout)
        except Exception as e:  # noqa: BLE001 - KafkaException, StackError
            return False, f"broker unreachable ({_short(e)}): check KAFKA_BOOTSTRAP_SERVERS"
        return True, f"{len(md.brokers)} broker(s)"

    return check


def probe_path(settings: Settings | None = None) -> str:
    """A cheap authenticated GET proving the API and the key work: the first active,
    non-parameterized OData job's endpoint with ``$top=1`` (else the first such plain endpoint)."""
    from common.catalog import load_catalog

    jobs = [j for j in load_catalog(settings).runnable if not j.requires_parameters and j.source_type == "cc_api"]
    jobs.sort(key=lambda j: (j.paging != "odata", j.id))
    if not jobs:
        return "/"
    j = jobs[0]
    return j.endpoint + ("?$top=1" if j.paging == "odata" else "")


def api_check(settings: Settings | None = None, timeout: float = 3.0, path: str | None = None) -> ReadinessCheck:
    """Ready when the Clinical Conductor API answers the probe with 2xx using the configured key."""
    probe: dict[str, str] = {}

    def check() -> tuple[bool, str]:
        import requests

        s = settings or get_settings()
        if not s.cc_api_base_url:
            return False, "CC_API_BASE_URL is not set"
        if "path" not in probe:
            probe["path"] = path or probe_path(s)
        headers = {"Accept": "application/json"}
        if s.cc_api_key is not None:
            headers[s.cc_api_key_header] = s.cc_api_key.get_secret_value()
        try:
            r = requests.get(s.cc_api_base_url + probe["path"], headers=headers, timeout=timeout)
        except requests.RequestException as e:
            return False, (f"API at {s.cc_api_base_url} unreachable ({type(e).__name__}): "
                           "check CC_API_BASE_URL and the network")
        if r.status_code in (401, 403):
            which = "CC_API_KEY is not set" if s.cc_api_key is None else "the key was rejected"
            return False, (f"API answered HTTP {r.status_code} ({which}): fix CC_API_KEY "
                           f"(sent in header CC_API_KEY_HEADER={s.cc_api_key_header})")
        if r.status_code >= 300:
            return False, f"API answered HTTP {r.status_code} for {probe['path']}: check CC_API_BASE_URL"
        return True, f"HTTP {r.status_code}"

    return check


def service_checks(service: str, settings: Settings | None = None) -> dict[str, ReadinessCheck]:
    """The standard readiness checks of each service type, cached."""
    wanted = {
        "extractor": ("database", "broker", "api"),
        "loader": ("database", "broker"),
        "transform": ("database", "broker"),
        "transformer": ("database", "broker"),
        "scheduler": ("database", "broker"),
        "api": ("database",),
        "simulator": (),
    }.get(service, ("database", "broker"))
    factories: dict[str, Callable[[Settings | None], ReadinessCheck]] = {
        # the history API reads as the read-only login: check that one
        "database": (lambda st: database_check(st, login="reader")) if service == "api" else database_check,
        "broker": broker_check, "api": api_check,
    }
    return {name: cached(factories[name](settings)) for name in wanted}
