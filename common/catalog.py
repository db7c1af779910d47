"""The job catalog as this installation sees it, and its copy in ``etl.dw_etl_jobs``.

``load_catalog`` is the one way every command and service gets the catalog (repo export + fixes +
the operator's ``ETL_JOBS_FILE``). The catalog file in the repo is the source of truth; the table
is what operators query and what runs reference.

``sync`` is one transaction: either all jobs (and their staging tables) are written, or nothing.
Operational columns (last_run_*, last_success_at) are never written by a sync: they describe this
installation's runs. The export's own last status/records (the legacy system's runs) go to
``export_last_status`` / ``export_last_records`` (migration 0900).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg

from common.config import Settings, get_settings
from common.db import connect, ensure_staging_tables
from schemas.jobs import CatalogError, Job, JobCatalog


def load_catalog(settings: Settings | None = None) -> JobCatalog:
    """The catalog with the operator's overrides (ETL_JOBS_FILE, default config/jobs.yaml).

    An ``ETL_JOBS_FILE`` that names no file is an error, not "no overrides": silently dropping the
    operator's schedules, priorities and disabled jobs would let the next ``jobs sync`` reset them
    all in the database. Only the default path may be absent (a checkout without overrides).
    """
    s = settings or get_settings()
    path = Path(s.etl_jobs_file).expanduser()
    explicit = "etl_jobs_file" in s.model_fields_set
    if path.is_dir() or (explicit and not path.exists()):
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CatalogError(f"ETL_JOBS_FILE={str(s.etl_jobs_file)!r} {what} (resolved from {Path.cwd()}): "
                           "point it at your overrides file (e.g. config/jobs.yaml) or unset it; "
                           "nothing was changed")
    return JobCatalog.load(overrides_path=path)


@dataclass
class SyncResult:
    inserted: int
    updated: int
    unchanged: int
    staging_created: list[str]
    credentials_instance: str | None


def _legacy_column(job: Job) -> str | None:
    if not job.parameters:
        return None
    # the export's single-parameter shape, for operators who query the seed's columns
    return ", ".join(f"data #>> '{{{path.replace('.', ',')}}}'" for path in job.parameters.values())


_UPSERT = """
INSERT INTO etl.dw_etl_jobs AS j (
    id, name, source_endpoint, target_table, is_active, is_valid, invalid_reason, requires_parameters,
    parameter_source_table, parameter_source_column, parameters, primary_key, source_type, source_options,
    category, depends_on, schedule, priority, timeout_seconds, incremental, timestamp_field, page_size,
    fix_reasons, export_last_status, export_last_records, source_instance_id)
VALUES (%(id)s, %(name)s, %(endpoint)s, %(target_table)s, %(is_active)s, %(is_valid)s, %(invalid_reason)s,
    %(requires_parameters)s, %(parameter_source_table)s, %(parameter_source_column)s, %(parameters)s::jsonb,
    %(primary_key)s, %(source_type)s, %(source_options)s::jsonb, %(category)s, %(depends_on)s, %(schedule)s,
    %(priority)s, %(timeout_seconds)s, %(incremental)s, %(timestamp_field)s, %(page_size)s, %(fix_reasons)s,
    %(last_status)s, %(last_records)s, %(instance)s)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name, source_endpoint = EXCLUDED.source_endpoint, target_table = EXCLUDED.target_table,
    is_active = EXCLUDED.is_active, is_valid = EXCLUDED.is_valid, invalid_reason = EXCLUDED.invalid_reason,
    requires_parameters = EXCLUDED.requires_parameters, parameter_source_table = EXCLUDED.parameter_source_table,
    parameter_source_column = EXCLUDED.parameter_source_column, parameters = EXCLUDED.parameters,
    primary_key = EXCLUDED.primary_key, source_type = EXCLUDED.source_type, source_options = EXCLUDED.source_options,
    category = EXCLUDED.category, depends_on = EXCLUDED.depends_on,
    schedule = COALESCE(EXCLUDED.schedule, j.schedule), priority = EXCLUDED.priority,
    timeout_seconds = EXCLUDED.timeout_seconds, incremental = EXCLUDED.incremental,
    timestamp_field = EXCLUDED.timestamp_field, page_size = EXCLUDED.page_size, fix_reasons = EXCLUDED.fix_reasons,
    export_last_status = EXCLUDED.export_last_status, export_last_records = EXCLUDED.export_last_records,
    source_instance_id = COALESCE(EXCLUDED.source_instance_id, j.source_instance_id),
    updated_at = now()
WHERE (j.name, j.source_endpoint, j.target_table, j.is_active, j.is_valid, j.invalid_reason, j.requires_parameters,
       j.parameter_source_table, j.parameter_source_column, j.parameters, j.primary_key, j.source_type,
       j.source_options, j.category, j.depends_on, j.priority, j.timeout_seconds, j.incremental,
       j.timestamp_field, j.page_size, j.fix_reasons, j.export_last_status, j.export_last_records)
   IS DISTINCT FROM
      (EXCLUDED.name, EXCLUDED.source_endpoint, EXCLUDED.target_table, EXCLUDED.is_active, EXCLUDED.is_valid,
       EXCLUDED.invalid_reason, EXCLUDED.requires_parameters, EXCLUDED.parameter_source_table,
       EXCLUDED.parameter_source_column, EXCLUDED.parameters, EXCLUDED.primary_key, EXCLUDED.source_type,
       EXCLUDED.source_options, EXCLUDED.category, EXCLUDED.depends_on, EXCLUDED.priority,
       EXCLUDED.timeout_seconds, EXCLUDED.incremental, EXCLUDED.timestamp_field, EXCLUDED.page_size,
       EXCLUDED.fix_reasons, EXCLUDED.export_last_status, EXCLUDED.export_last_records)
   OR (EXCLUDED.schedule IS NOT NULL AND EXCLUDED.schedule IS DISTINCT FROM j.schedule)
RETURNING (xmax = 0) AS inserted
"""


def ensure_credentials(conn: psycopg.Connection, settings: Settings) -> int | None:
    """Register the configured CC instance (name of the key's env var, never the key)."""
    if not settings.cc_api_base_url:
        return None
    row = conn.execute(
        """INSERT INTO etl.dw_api_credentials (instance_name, instance_id, base_url, api_key_env, api_key_header,
                                               rate_limit_rps)
           VALUES (%s, %s, %s, 'CC_API_KEY', %s, %s)
           ON CONFLICT (instance_id) DO UPDATE SET base_url = EXCLUDED.base_url,
                api_key_header = EXCLUDED.api_key_header, rate_limit_rps = EXCLUDED.rate_limit_rps,
                updated_at = now()
           RETURNING id""",
        (settings.cc_instance_id, settings.cc_instance_id, settings.cc_api_base_url, settings.cc_api_key_header,
         settings.cc_rate_limit_rps),
    ).fetchone()
    return int(row[0]) if row else None


def sync(catalog: JobCatalog, settings: Settings | None = None, conn: psycopg.Connection | None = None) -> SyncResult:
    s = settings or get_settings()
    own = conn is None
    conn = conn or connect(s)
    try:
        with conn.transaction():
            instance = ensure_credentials(conn, s)
            created = ensure_staging_tables(conn, catalog.target_tables)
            inserted = updated = 0
            for job in catalog:
                row = conn.execute(_UPSERT, {
                    **job.model_dump(),
                    "parameters": orjson.dumps(job.parameters).decode(),
                    "source_options": orjson.dumps(job.source_options).decode(),
                    "primary_key": list(job.primary_key),
                    "depends_on": list(catalog.parents(job)),
                    "fix_reasons": list(job.fix_reasons),
                    "incremental": job.supports_incremental,
                    "parameter_source_column": _legacy_column(job),
                    "instance": instance,
                }).fetchone()
                if row is None:
                    continue
                if row[0]:
                    inserted += 1
                else:
                    updated += 1
        return SyncResult(inserted, updated, len(catalog) - inserted - updated, created,
                          s.cc_instance_id if instance else None)
    finally:
        if own:
            conn.close()

