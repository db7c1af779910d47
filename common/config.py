"""Settings for every TrialSync process: environment variables, an optional ``.env`` file and
``config/jobs.yaml``.

Why one model: every process (extractor, loader, transformer, scheduler, simulator) must agree on
where the database, the broker and the API are, so they all read the same names (the seed's
``DATABASE_*``, ``CC_API_*``, ``ETL_*``). A bad value stops the process at start-up with one line
naming the setting, the value and what is allowed -- never a traceback, never a secret.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRET_FIELDS = ("database_password", "database_url", "database_admin_url", "database_reader_url",
                 "database_reader_password", "database_writer_password", "cc_api_key", "smtp_password",
                 "slack_webhook_url", "api_token")
#: the login roles TrialSync provisions (members of migration 0002's group roles trialsync_etl and
#: trialsync_analytics); the superuser/owner only migrates
WRITER_LOGIN = "trialsync_writer"
READER_LOGIN = "trialsync_reader"


class ConfigError(ValueError):
    """A setting is missing or wrong. ``str(e)`` is one line: setting, value, what is allowed."""


class Settings(BaseSettings):
    """All settings. Field names map to upper-case environment variables of the same name."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False,
        validate_default=True,
    )

    # -- database ------------------------------------------------------------------------------
    database_url: SecretStr | None = Field(default=None, description="postgresql://user:pass@host:port/db; wins over DATABASE_*")
    database_host: str | None = None
    database_port: int = Field(default=5432, ge=1, le=65535)
    database_name: str = "trialsync"
    database_user: str = "trialsync"
    database_password: SecretStr | None = None
    database_admin_url: SecretStr | None = Field(
        default=None, description="login of `db migrate` (owner/superuser); unset = DATABASE_URL / DATABASE_*")
    database_writer_password: SecretStr | None = Field(
        default=None, description="`db migrate` creates/updates the login trialsync_writer with it")
    database_reader_password: SecretStr | None = Field(
        default=None, description="password of the read-only login trialsync_reader (created by `db migrate`)")
    database_reader_url: SecretStr | None = Field(
        default=None, description="read-only login for the history API and quality checks; wins over "
                                  "DATABASE_READER_PASSWORD")
    database_pool_size: int = Field(default=10, ge=1, le=200)
    database_statement_timeout_ms: int = Field(default=0, ge=0)

    # -- Clinical Conductor API ----------------------------------------------------------------
    cc_api_base_url: str | None = Field(default=None, description="e.g. https://site.clinicalconductor.com/CCSWEB")
    cc_api_key: SecretStr | None = None
    cc_api_key_header: str = Field(default="X-ApiKey", pattern=r"^[A-Za-z0-9-]{1,64}$")
    cc_instance_id: str = Field(default="cc1", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                description="prefix of every source_id: '<instance>:<entity id>'")
    cc_rate_limit_rps: float = Field(default=0.0, ge=0, description="requests/s for all workers of one instance; 0 = unlimited")
    cc_page_size: int = Field(default=1000, ge=1, le=1000)
    cc_incremental_overlap_seconds: int = Field(default=300, ge=0)

    # -- ETL engine (seed 001) -----------------------------------------------------------------
    etl_batch_size: int = Field(default=1000, ge=1, le=100_000)
    etl_max_retries: int = Field(default=3, ge=0, le=20)
    etl_retry_delay_seconds: float = Field(default=5.0, ge=0, le=3600)
    etl_parallel_jobs: int = Field(default=5, ge=1, le=64)
    etl_timeout_seconds: int = Field(default=300, ge=1)
    etl_request_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    etl_http_engine: Literal["auto", "async", "threads"] = Field(
        default="auto", description="extraction HTTP engine: async (uvloop) | threads (requests); auto = async "
                                    "unless an HTTP(S) proxy is configured")
    etl_jobs_file: Path = Path("config/jobs.yaml")
    etl_fanout_incremental: Literal["all", "changed"] = "changed"  # guarded by the sweep: docs/extraction.md
    etl_fanout_sweep_runs: int = Field(default=30, ge=1, le=10_000)
    #: a run that makes no progress (no record read, acknowledged or request answered) for this long
    #: is stalled: it fails with the reason and is retried, instead of waiting for its timeout
    etl_stall_seconds: float = Field(default=600.0, ge=0.1, le=86_400)
    #: a night's API call budget: explicit, or the window x CC_RATE_LIMIT_RPS; 0 = no budget
    etl_call_budget: int = Field(default=0, ge=0)
    etl_night_window_hours: float = Field(default=0.0, ge=0, le=24)

    def call_budget(self) -> int | None:
        """Calls one orchestration (a night) may make, or None for no limit."""
        if self.etl_call_budget:
            return self.etl_call_budget
        if self.etl_night_window_hours and self.cc_rate_limit_rps:
            return int(self.etl_night_window_hours * 3600 * self.cc_rate_limit_rps)
        return None

    # -- broker --------------------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(default=None, description="host:port[,host:port]; unset = embedded broker")
    kafka_topic_prefix: str = Field(default="trialsync", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    kafka_partitions: int = Field(default=3, ge=1, le=256)
    kafka_replication_factor: int = Field(default=1, ge=1, le=5)
    kafka_session_timeout_ms: int = Field(default=6000, ge=1000, le=300_000)
    kafka_connect_timeout_seconds: float = Field(default=8.0, ge=1, le=300,
                                                 description="a broker that does not answer within this is reported down")
    kafka_topic_retention_hours: float = Field(default=336.0, gt=0, le=876_000)

    # -- loader --------------------------------------------------------------------------------
    loader_batch_size: int = Field(default=20_000, ge=1, le=1_000_000)  # tuned by bench/loader_bench.py
    loader_flush_ms: int = Field(default=250, ge=1, le=600_000)  # tuned by bench/loader_bench.py (lag)
    # an idle loader stops fetching and looks for records this often (0 = keep fetching): bench/idle_bench.py
    loader_idle_probe_ms: int = Field(default=5000, ge=0, le=60_000)

    # -- embedded stack ------------------------------------------------------------------------
    trialsync_state_dir: Path = Field(default=Path(".trialsync"), validation_alias=AliasChoices("TRIALSYNC_STATE_DIR", "STATE_DIR"))
    trialsync_pg_port: int | None = Field(default=None, ge=1, le=65535)
    trialsync_kafka_port: int | None = Field(default=None, ge=1, le=65535)
    trialsync_broker_storage: Literal["durable", "memory"] = Field(
        default="durable", description="embedded broker storage: durable (s3:// on a local disk-backed S3 server) "
                                       "| memory (faster, lost on restart)")
    trialsync_broker_retention_hours: float = Field(default=168.0, gt=0, le=100_000)
    trialsync_broker_retention_mb: int = Field(default=2048, ge=1, le=10_000_000)
    trialsync_broker_retention_interval_seconds: float = Field(default=300.0, ge=0.2, le=86_400)

    # -- logging and metrics -------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_file: Path | None = None
    enable_metrics: bool = True
    metrics_port: int = Field(default=9108, ge=0, le=65535, description="0 = pick a free port")
    metrics_host: str = Field(default="127.0.0.1", min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:_-]+$",
                              description="interface of /metrics, /healthz, /readyz; 0.0.0.0 = every interface")

    # -- alerting ------------------------------------------------------------------------------
    alert_email: str | None = None
    alert_email_from: str = "trialsync@localhost"
    smtp_host: str | None = None
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    slack_webhook_url: SecretStr | None = None

    # -- history API ---------------------------------------------------------------------------
    api_token: SecretStr | None = None

    @field_validator(*SECRET_FIELDS, mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, v: object) -> object:
        # `API_TOKEN=` (or compose blanking a secret for a service) means "not set", never "empty token"
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("cc_api_base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        for hp in v.split(","):
            host, _, port = hp.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("must be host:port[,host:port...]")
        return v

    @model_validator(mode="after")
    def _database_url_scheme(self) -> Settings:
        for name in ("database_url", "database_admin_url", "database_reader_url"):
            value = getattr(self, name)
            if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
                raise ValueError(f"{name.upper()} must start with postgresql:// (value hidden: it may hold a password)")
        return self

    # -- derived -------------------------------------------------------------------------------
    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None and self.database_host is None

    @property
    def uses_embedded_broker(self) -> bool:
        return self.kafka_bootstrap_servers is None

    def explicit_dsn(self) -> str | None:
        """The DSN given by DATABASE_URL or DATABASE_*; None means 'use the embedded stack'."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        if self.database_host is None:
            return None
        pw = self.database_password.get_secret_value() if self.database_password else ""
        auth = quote(self.database_user, safe="") + (":" + quote(pw, safe="") if pw else "")
        return f"postgresql://{auth}@{self.database_host}:{self.database_port}/{quote(self.database_name, safe='')}"

    def explicit_login_dsn(self, login: str) -> str | None:
        """The DSN of one login of an explicitly configured database (None: the embedded stack, or
        that login is not configured).

        ``writer`` (every service) is DATABASE_URL / DATABASE_*; ``admin`` (``db migrate``) is
        DATABASE_ADMIN_URL, else the writer's; ``reader`` (history API, quality checks) is
        DATABASE_READER_URL, else trialsync_reader with DATABASE_READER_PASSWORD on DATABASE_HOST,
        else None (the caller decides: the API falls back to its own login)."""
        base = self.explicit_dsn()
        if login == "writer" or base is None:
            return base
        if login == "admin":
            return self.database_admin_url.get_secret_value() if self.database_admin_url else base
        if login == "reader":
            if self.database_reader_url is not None:
                return self.database_reader_url.get_secret_value()
            if self.database_reader_password is None:
                return None
            from urllib.parse import urlsplit, urlunsplit

            pw = quote(self.database_reader_password.get_secret_value(), safe="")
            parts = urlsplit(base)
            host = parts.netloc.rsplit("@", 1)[-1]
            return urlunsplit(parts._replace(netloc=f"{READER_LOGIN}:{pw}@{host}"))
        raise ValueError(f"unknown database login {login!r}")

    def secret_values(self) -> list[str]:
        """Every secret's plain value, so logging can scrub them from any message."""
        out = []
        for name in SECRET_FIELDS:
            v = getattr(self, name, None)
            if isinstance(v, SecretStr) and v.get_secret_value():
                out.append(v.get_secret_value())
        from urllib.parse import unquote, urlsplit

        for url in (self.database_url, self.database_admin_url, self.database_reader_url):
            if url is not None:
                pw = urlsplit(url.get_secret_value()).password
                if pw:
                    out += [pw, unquote(pw)]
        return out


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = err["loc"][0] if err["loc"] else ""
    name = str(loc).upper() if loc else "settings"
    msg = err["msg"].removeprefix("Value error, ")
    inp = err.get("input")
    if isinstance(loc, str) and loc in SECRET_FIELDS:
        shown = "(value hidden)"
    elif inp is None or isinstance(inp, dict):
        shown = ""
    else:
        shown = f"={inp!r}"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"invalid setting {name}{shown}: {msg}{more}"


def load_settings(**overrides: Any) -> Settings:
    """Build settings from env/.env (plus explicit overrides); raise ConfigError in one line."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached). Tests call ``reset_settings()`` after changing env."""
    return load_settings()


def reset_settings() -> None:
    get_settings.cache_clear()


def env_for_child(settings: Settings | None = None) -> dict[str, str]:
    """Environment for a child process (loader/extractor/simulator) that must see the same stack."""
    env = dict(os.environ)
    s = settings or get_settings()
    env["TRIALSYNC_STATE_DIR"] = str(s.trialsync_state_dir.resolve())
    return env
