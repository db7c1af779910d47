"""``trialsync doctor``: check configuration, database, broker and the Clinical Conductor API, and
say for each problem what is wrong and how to fix it.

Why a separate command and not just ``/readyz``: readiness answers "can this process work now";
the doctor answers "what must an operator change" -- a pending migration, an unsynced catalog, a
rejected API key (naming the setting), a missing system topic -- before anything is started.

Every check is independent and catches its own errors, so one broken part never hides the state
of the others; checks that need an earlier one (migrations need a database) are reported as
skipped. Messages never contain a DSN, a password or the API key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from common.config import ConfigError, Settings, load_settings
from common.logging import scrub

if TYPE_CHECKING:
    from schemas.jobs import JobCatalog

Status = Literal["ok", "warn", "fail", "skip"]
_DSN_RE = re.compile(r"postgres(ql)?://\S+")


@dataclass
class Finding:
    area: str
    check: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _clean(text: str) -> str:
    return scrub(_DSN_RE.sub("<dsn>", text)).strip()


class Doctor:
    """Runs the checks in order; ``findings`` holds one row per check."""

    def __init__(self, settings: Settings | None = None, api_timeout: float = 5.0):
        self.settings = settings
        self.api_timeout = api_timeout
        self.findings: list[Finding] = []
        self.catalog: JobCatalog | None = None

    def add(self, area: str, check: str, status: Status, detail: str, fix: str = "") -> Finding:
        f = Finding(area, check, status, _clean(detail), _clean(fix))
        self.findings.append(f)
        return f

    @property
    def failed(self) -> bool:
        return any(f.status == "fail" for f in self.findings)

    def run(self) -> list[Finding]:
        if self.check_config():
            db_ok = self.check_database()
            self.check_broker()
            self.check_api(db_ok)
        return self.findings

    # -- config ------------------------------------------------------------------------------
    def check_config(self) -> bool:
        if self.settings is None:
            try:
                self.settings = load_settings()
            except ConfigError as e:
                self.add("config", "settings", "fail", str(e),
                         "fix that variable in the environment or .env (docs/configuration.md lists every setting)")
                return False
        s = self.settings
        db_where = "embedded (trialsync stack up)" if s.uses_embedded_database else (
            "DATABASE_URL" if s.database_url is not None else f"{s.database_host}:{s.database_port}/{s.database_name}")
        broker_where = "embedded (trialsync stack up)" if s.uses_embedded_broker else s.kafka_bootstrap_servers
        self.add("config", "settings", "ok", f"database: {db_where}; broker: {broker_where}; "
                 f"topic prefix {s.kafka_topic_prefix}; CC instance {s.cc_instance_id}")
        from schemas.jobs import CatalogError

        try:
            from common.catalog import load_catalog

            self.catalog = load_catalog(s)
        except (CatalogError, OSError, ValueError) as e:
            self.add("config", "job catalog", "fail", str(e).splitlines()[0],
                     f"fix {s.etl_jobs_file} (ETL_JOBS_FILE); `trialsync jobs list` shows the catalog once it loads")
            return True
        self.add("config", "job catalog", "ok",
                 f"{len(self.catalog)} jobs, {len(self.catalog.runnable)} active and valid ({s.etl_jobs_file})")
        return True

    # -- database ----------------------------------------------------------------------------
    def check_database(self) -> bool:
        from common.db import DatabaseError, connect, migration_status, scalar
        from common.stack import StackError

        s = self.settings
        assert s is not None
        try:
            conn = connect(s, autocommit=True, connect_timeout=5, application_name="trialsync-doctor")
        except (DatabaseError, StackError) as e:
            fix = ("run `trialsync stack up`" if s.uses_embedded_database
                   else "check DATABASE_URL / DATABASE_HOST, DATABASE_USER, DATABASE_PASSWORD and that the server "
                        "accepts connections")
            self.add("database", "connect", "fail", str(e).split(": start it with")[0], fix)
            for check in ("migrations", "catalog synced"):
                self.add("database", check, "skip", "database unreachable")
            return False
        with conn:
            version = scalar(conn, "SHOW server_version")
            self.add("database", "connect", "ok", f"PostgreSQL {version}")
            try:
                status = migration_status(s)
            except DatabaseError as e:
                self.add("database", "migrations", "fail", str(e), "run `trialsync db migrate`")
                status = []
            pending = [m for m, done in status if not done]
            if pending:
                self.add("database", "migrations", "fail",
                         f"{len(pending)} of {len(status)} migrations pending: "
                         + ", ".join(m.path.name for m in pending[:5]) + (" ..." if len(pending) > 5 else ""),
                         "run `trialsync db migrate`")
            elif status:
                self.add("database", "migrations", "ok", f"all {len(status)} migrations applied")
            self._check_catalog_synced(conn)
        return True

    def _check_catalog_synced(self, conn) -> None:  # noqa: ANN001 - psycopg.Connection
        if self.catalog is None:
            self.add("database", "catalog synced", "skip", "the job catalog did not load")
            return
        from common.db import scalar

        if scalar(conn, "SELECT to_regclass('etl.dw_etl_jobs')") is None:
            self.add("database", "catalog synced", "fail", "etl.dw_etl_jobs does not exist",
                     "run `trialsync db migrate` then `trialsync jobs sync`")
            return
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, source_endpoint, target_table, is_active, is_valid, requires_parameters FROM etl.dw_etl_jobs")}
        missing, differ = [], []
        for job in self.catalog:
            row = rows.get(job.id)
            if row is None:
                missing.append(job.id)
            elif tuple(row) != (job.endpoint, job.target_table, job.is_active, job.is_valid, job.requires_parameters):
                differ.append(job.id)
        if missing or differ:
            parts = []
            if missing:
                parts.append(f"{len(missing)} job(s) missing from etl.dw_etl_jobs (e.g. {missing[:5]})")
            if differ:
                parts.append(f"{len(differ)} job(s) differ from the catalog (e.g. {differ[:5]})")
            self.add("database", "catalog synced", "fail", "; ".join(parts), "run `trialsync jobs sync`")
            return
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'bronze'")}
        no_table = sorted(set(self.catalog.target_tables) - tables)
        if no_table:
            self.add("database", "catalog synced", "fail",
                     f"{len(no_table)} staging table(s) missing, e.g. bronze.{no_table[0]}", "run `trialsync jobs sync`")
            return
        self.add("database", "catalog synced", "ok",
                 f"{len(self.catalog)} jobs and {len(self.catalog.target_tables)} staging tables in place")

    # -- broker ------------------------------------------------------------------------------
    def check_broker(self) -> None:
        from common.kafka import control_topic, watermark_topic
        from common.stack import StackError, bootstrap_servers

        s = self.settings
        assert s is not None
        try:
            where = bootstrap_servers(s)
        except StackError as e:
            self.add("broker", "metadata", "fail", str(e).split(": run")[0],
                     "run `trialsync stack up` or set KAFKA_BOOTSTRAP_SERVERS")
            self.add("broker", "system topics", "skip", "broker unreachable")
            return
        try:
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({"bootstrap.servers": where, "client.id": "trialsync-doctor",
                                 "socket.timeout.ms": 5000, "log_level": 0})
            md = admin.list_topics(timeout=5)
        except Exception as e:  # noqa: BLE001 - KafkaException in many shapes
            self.add("broker", "metadata", "fail", f"broker at {where} did not answer ({e})",
                     "start the broker (`trialsync stack up`, or Redpanda) or fix KAFKA_BOOTSTRAP_SERVERS")
            self.add("broker", "system topics", "skip", "broker unreachable")
            return
        self.add("broker", "metadata", "ok", f"{len(md.brokers)} broker(s) at {where}, {len(md.topics)} topics")
        wanted = [control_topic(s), watermark_topic(s)]
        missing = [t for t in wanted if t not in md.topics]
        if missing:
            self.add("broker", "system topics", "warn", "missing: " + ", ".join(missing),
                     "created by the first extract/load; an embedded broker loses topics when it restarts. Check "
                     "KAFKA_TOPIC_PREFIX matches the one the services use")
        else:
            self.add("broker", "system topics", "ok", ", ".join(wanted))

    # -- Clinical Conductor API --------------------------------------------------------------
    def check_api(self, db_ok: bool) -> None:
        import requests

        from common.health import probe_path

        s = self.settings
        assert s is not None
        if not s.cc_api_base_url:
            self.add("api", "reachable", "fail", "CC_API_BASE_URL is not set",
                     "set CC_API_BASE_URL, e.g. https://<site>.clinicalconductor.com/CCSWEB")
            self.add("api", "key accepted", "skip", "no API configured")
            return
        try:
            path = probe_path(s)
        except Exception:  # noqa: BLE001 - the catalog failure is already reported
            path = "/"
        url = s.cc_api_base_url + path
        headers = {"Accept": "application/json"}
        if s.cc_api_key is not None:
            headers[s.cc_api_key_header] = s.cc_api_key.get_secret_value()
        try:
            r = requests.get(url, headers=headers, timeout=self.api_timeout)
        except requests.RequestException as e:
            self.add("api", "reachable", "fail", f"GET {s.cc_api_base_url} failed: {type(e).__name__}",
                     "check CC_API_BASE_URL, DNS, proxies and firewalls")
            self.add("api", "key accepted", "skip", "API unreachable")
            return
        if r.status_code in (401, 403):
            self.add("api", "reachable", "ok", f"{s.cc_api_base_url} answers")
            if s.cc_api_key is None:
                self.add("api", "key accepted", "fail", f"HTTP {r.status_code}: no API key configured",
                         "set CC_API_KEY (environment or .env)")
            else:
                self.add("api", "key accepted", "fail",
                         f"HTTP {r.status_code}: the API rejected the key sent in header {s.cc_api_key_header}",
                         "fix CC_API_KEY (and CC_API_KEY_HEADER if your instance expects another header, "
                         "e.g. CCAPIKey)")
            return
        if r.status_code == 404:
            self.add("api", "reachable", "fail", f"HTTP 404 for {path}",
                     "CC_API_BASE_URL probably lacks or repeats the path prefix (e.g. /CCSWEB)")
            self.add("api", "key accepted", "skip", "probe endpoint not found")
            return
        if r.status_code >= 400:
            self.add("api", "reachable", "fail", f"HTTP {r.status_code} for {path}",
                     "the API is failing or rate limiting; retry later, lower CC_RATE_LIMIT_RPS on 429")
            self.add("api", "key accepted", "skip", "API answered an error")
            return
        self.add("api", "reachable", "ok", f"HTTP {r.status_code} from {s.cc_api_base_url}{path} "
                 f"in {r.elapsed.total_seconds() * 1000:.0f} ms")
        self.add("api", "key accepted", "ok", f"header {s.cc_api_key_header}")


def run_doctor(settings: Settings | None = None, api_timeout: float = 5.0) -> Doctor:
    d = Doctor(settings, api_timeout)
    d.run()
    return d


STATUS_STYLE: dict[str, Callable[[str], str]] = {
    "ok": lambda t: f"[green]{t}[/]", "warn": lambda t: f"[yellow]{t}[/]",
    "fail": lambda t: f"[bold red]{t}[/]", "skip": lambda t: f"[dim]{t}[/]",
}
