"""Settings of the transform consumer (``TRANSFORM_*`` environment variables).

Why a separate model: these knobs matter only to ``trialsync transform``; keeping them out of the
shared ``common.config.Settings`` lets the transformer evolve without touching every process's
configuration. A bad value stops the command with one line, like every other setting.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.config import ConfigError


class TransformSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRANSFORM_", env_file=".env", extra="ignore",
                                      case_sensitive=False, validate_default=True)

    #: consumer group on the control topic
    group_id: str = Field(default="trialsync-transformer", pattern=r"^[A-Za-z0-9_.-]{1,200}$")
    #: after the first loaded run, wait this long for more before transforming (one batch for all)
    coalesce_seconds: float = Field(default=3.0, ge=0, le=3600)
    #: how often the consumer polls, re-checks "is the run loaded?" and looks for due retries
    poll_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    #: give up waiting for the loader after this long and transform what is there (logged)
    load_wait_timeout_seconds: float = Field(default=1800.0, gt=0)
    #: statement_timeout of each procedure's transaction
    statement_timeout_seconds: int = Field(default=3600, ge=1, le=86_400)
    #: failed procedures: retry after base * 2^(attempt-1) seconds, at most max, up to max_attempts
    retry_base_seconds: float = Field(default=30.0, ge=0)
    retry_max_seconds: float = Field(default=3600.0, ge=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    #: run the data-quality checks after each batch, each with this statement timeout
    quality_enabled: bool = True
    quality_timeout_seconds: int = Field(default=300, ge=1, le=86_400)
    #: safety margin below the oldest open transaction for the incremental horizon (see 0300 SQL)
    watermark_margin_seconds: float = Field(default=2.0, ge=0, le=3600)
    #: transform runs and quality results older than this are pruned hourly (the latest per
    #: procedure and per check always stay)
    history_retention_days: int = Field(default=90, ge=1, le=36_500)
    #: work_mem of each procedure's transaction: full builds hash and sort millions of rows, and
    #: the server default (4MB) makes every hash spill to disk
    work_mem: str = Field(default="128MB", pattern=r"^\d{1,7}(kB|MB|GB)$")

    def retry_delay(self, attempt: int) -> float:
        """Backoff before attempt ``attempt + 1`` after ``attempt`` failed."""
        return min(self.retry_max_seconds, self.retry_base_seconds * (2 ** max(0, attempt - 1)))


def load_transform_settings(**overrides: Any) -> TransformSettings:
    try:
        return TransformSettings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        name = "TRANSFORM_" + str(err["loc"][0]).upper() if err["loc"] else "TRANSFORM_*"
        raise ConfigError(f"invalid setting {name}={err.get('input')!r}: {err['msg']}") from None
