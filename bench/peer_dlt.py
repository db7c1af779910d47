"""The peer: dlt's ``rest_api`` source into its ``postgres`` destination, configured for the same
CC endpoints TrialSync's non-parameterized jobs call. Run by ``bench/run.py`` in a child process:

    BENCH_CC_API_KEY=... python -m bench.peer_dlt < spec.json      # prints one JSON line

The spec (JSON on stdin): ``base_url``, ``key_header``, ``dsn``, ``dataset``, ``workers``,
``page_size``, ``file_format``, ``pipelines_dir`` and ``jobs`` (``id``, ``name``, ``endpoint``,
``odata``, ``primary_key``); optional ``write_disposition`` (``append`` by default; ``merge`` keys
each resource by its job's primary key, as TrialSync upserts), ``extract_workers``,
``normalize_workers``, ``load_workers`` (default ``workers``, 1, ``workers``). The API key comes
from the environment only.

How the configuration is made fair (documented in bench/README.md):

* one dlt resource per job (its endpoint path), all in one source, ``parallelized=True`` with
  ``EXTRACT__WORKERS`` = TrialSync's ``ETL_PARALLEL_JOBS`` (jobs at once), ``LOAD__WORKERS`` the
  same; normalization in one process (dlt's default; TrialSync has one loader process);
* OData endpoints: dlt's ``offset`` paginator with ``$top`` = 1000 / ``$skip`` (dlt asks page after
  page, stopping at the first empty page: one extra request per endpoint); other endpoints one
  request (``single_page``), as TrialSync does;
* the API key in the same header; same simulator, same PostgreSQL server, own schema;
* ``max_table_nesting=0``: nested objects become JSON columns, so dlt writes one row per record
  like TrialSync's JSONB staging instead of fanning out into child tables;
* write disposition ``append`` into an empty dataset: dlt's cheapest path. TrialSync upserts by
  key (``INSERT ... ON CONFLICT``); dlt's equivalent (``merge`` with a primary key) is slower,
  so this choice favours dlt;
* loader file format ``csv`` (PostgreSQL ``COPY``), the fastest dlt offers for postgres
  (``insert_values`` is the default; ``file_format`` in the spec changes it).

Telemetry is switched off (``RUNTIME__DLTHUB_TELEMETRY=false``): the benchmark talks to no one
but the local simulator and database.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def rest_api_config(spec: dict[str, Any], api_key: str) -> dict[str, Any]:
    """The ``rest_api`` configuration for the spec's jobs (pure: no dlt import, unit-testable)."""
    resources = []
    for job in spec["jobs"]:
        if job["odata"]:
            paginator: dict[str, Any] = {"type": "offset", "limit": int(spec.get("page_size", 1000)),
                                         "offset_param": "$skip", "limit_param": "$top",
                                         "total_path": None, "stop_after_empty_page": True}
        else:
            paginator = {"type": "single_page"}
        resource: dict[str, Any] = {
            "name": f"job_{job['id']}",
            "table_name": f"job_{job['id']}",
            "endpoint": {"path": job["endpoint"].lstrip("/"), "paginator": paginator},
        }
        if spec.get("write_disposition", "append") == "merge":
            resource["primary_key"] = list(job.get("primary_key") or ["id"])
        resources.append(resource)
    return {
        "client": {"base_url": spec["base_url"].rstrip("/") + "/",
                   "auth": {"type": "api_key", "name": spec["key_header"], "api_key": api_key,
                            "location": "header"}},
        "resource_defaults": {"write_disposition": spec.get("write_disposition", "append")},
        "resources": resources,
    }


def dlt_environment(spec: dict[str, Any]) -> dict[str, str]:
    """dlt settings (it reads them from the environment): parallelism, quiet logs, no telemetry."""
    workers = str(int(spec.get("workers", 5)))
    return {"RUNTIME__DLTHUB_TELEMETRY": "false", "RUNTIME__LOG_LEVEL": "WARNING",
            "EXTRACT__WORKERS": str(int(spec.get("extract_workers", workers))),
            "LOAD__WORKERS": str(int(spec.get("load_workers", workers))),
            "NORMALIZE__WORKERS": str(int(spec.get("normalize_workers", 1))),
            "DLT_DATA_DIR": spec["pipelines_dir"], "DLT_PROJECT_DIR": spec["pipelines_dir"]}


def run(spec: dict[str, Any], api_key: str) -> dict[str, Any]:
    os.environ.update(dlt_environment(spec))
    import dlt
    from dlt.sources.rest_api import rest_api_source

    source = rest_api_source(rest_api_config(spec, api_key), name="cc", max_table_nesting=0, parallelized=True)
    pipeline = dlt.pipeline(pipeline_name="trialsync_peer", destination=dlt.destinations.postgres(spec["dsn"]),
                            dataset_name=spec["dataset"], pipelines_dir=spec["pipelines_dir"])
    t0 = time.monotonic()
    pipeline.run(source, loader_file_format=spec.get("file_format", "csv"))
    wall = time.monotonic() - t0
    phases: dict[str, float] = {}
    trace = pipeline.last_trace
    for step in getattr(trace, "steps", []) or []:
        if step.started_at and step.finished_at:
            phases[step.step] = round((step.finished_at - step.started_at).total_seconds(), 3)
    rows: dict[str, int] = {}
    with pipeline.sql_client() as client:
        for job in spec["jobs"]:
            name = f"job_{job['id']}"
            try:
                res = client.execute_sql(f"SELECT count(*) FROM {client.make_qualified_table_name(name)}")  # noqa: S608 - dlt quotes it
                rows[name] = int(res[0][0]) if res else 0
            except Exception:  # noqa: BLE001 - a resource that yielded nothing has no table
                rows[name] = 0
    return {"wall_s": round(wall, 3), "phases_s": phases, "rows": rows, "records": sum(rows.values()),
            "dlt_version": dlt.__version__, "file_format": spec.get("file_format", "csv"),
            "workers": int(spec.get("workers", 5)), "write_disposition": spec.get("write_disposition", "append"),
            "environment": {k: v for k, v in dlt_environment(spec).items() if k.endswith("WORKERS")}}


def main() -> None:
    spec = json.load(sys.stdin)
    key = os.environ.get("BENCH_CC_API_KEY", "")
    print(json.dumps(run(spec, key)), flush=True)


if __name__ == "__main__":
    main()
