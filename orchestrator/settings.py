"""Settings only the orchestrator reads, beside the shared ones in ``common.config``.

Why a separate model: the seed's ``ETL_*`` names (parallel jobs, retries, timeouts) are shared by
every process and live in ``common.config``; the knobs below matter only to ``run``, the
scheduler, alerting and the demo, so they stay here and do not grow the shared model. Same
behaviour as the shared settings: environment / ``.env``, one-line error for a bad value.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.config import ConfigError


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      case_sensitive=False, validate_default=True)

    #: how long a job's children wait for its records to be loaded before they are skipped
    etl_load_timeout_seconds: float = Field(default=1800.0, gt=0, description="How long a job's children wait for its records to be loaded into Bronze (and a job waits for another process's lock) before they are skipped.")
    #: ceiling of the exponential retry delay (ETL_RETRY_DELAY_SECONDS * 2^(attempt-1))
    etl_retry_max_delay_seconds: float = Field(default=600.0, ge=0, description="Ceiling of the exponential delay between automatic retries of a failed or partial run (ETL_RETRY_DELAY_SECONDS * 2^(attempt-1)).")
    #: concurrent requests inside one parameterized (fan-out) job; 0 = ETL_PARALLEL_JOBS
    etl_fanout_workers: int = Field(default=0, ge=0, le=256, description="Concurrent requests inside one parameterized (fan-out) job run by the orchestrator; 0 = ETL_PARALLEL_JOBS.")
    #: concurrent requests inside one plain job; 0 = ETL_PARALLEL_JOBS
    etl_plain_workers: int = Field(default=2, ge=0, le=256, description="Concurrent requests inside one plain (paged) job run by the orchestrator; 0 = ETL_PARALLEL_JOBS.")
    #: extra seconds after a job's timeout before its process is killed (it gets the chance to
    #: stop itself and record what it did first)
    etl_timeout_grace_seconds: float = Field(default=15.0, ge=0, le=600, description="Seconds after a job's timeout before its extraction process is killed (it first gets the chance to stop itself and record what it did).")
    #: scheduler: a fire time missed by at most this much (scheduler down, machine asleep) is run
    #: once when the scheduler is back; older misses are skipped and logged
    scheduler_misfire_grace_seconds: int = Field(default=3600, ge=1, description="A scheduled fire time missed by at most this much (no scheduler running, machine asleep) is run once when a scheduler is back; older misses are skipped and logged.")
    #: scheduler: cron expressions are evaluated in this time zone
    scheduler_timezone: str = Field(default="UTC", description="IANA time zone in which cron schedules are evaluated.")
    #: scheduler: how often schedules are re-read from etl.dw_etl_jobs (and alerts evaluated)
    scheduler_refresh_seconds: float = Field(default=30.0, gt=0, description="How often the scheduler re-reads schedules from etl.dw_etl_jobs and evaluates alerts.")
    #: scheduler: fires arriving within this window are merged into one orchestration, so a
    #: shared parent runs once
    scheduler_coalesce_seconds: float = Field(default=2.0, ge=0, description="Fires arriving within this window are merged into one orchestration, so a shared parent runs once.")
    #: alerts: seconds to wait for an SMTP server / Slack webhook
    alert_timeout_seconds: float = Field(default=10.0, gt=0, description="Seconds to wait for the SMTP server or the Slack webhook.")
    #: alerts: prefix of every subject line
    alert_subject_prefix: str = Field(default="[TrialSync]", description="Prefix of every alert's subject line.")

    @field_validator("scheduler_timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA time zone name (e.g. UTC, Europe/Berlin, America/New_York)") from None
        return v


def load_orchestrator_settings(**overrides: Any) -> OrchestratorSettings:
    try:
        return OrchestratorSettings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]).upper() if err["loc"] else "settings"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"invalid setting {name}={err.get('input')!r}: {msg}") from None


@functools.lru_cache(maxsize=1)
def get_orchestrator_settings() -> OrchestratorSettings:
    return load_orchestrator_settings()


def reset_orchestrator_settings() -> None:
    get_orchestrator_settings.cache_clear()
