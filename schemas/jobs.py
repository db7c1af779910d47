"""The job catalog: declarative jobs, one engine.

A job reads like a Singer stream: an endpoint path, a primary key, a replication key
(``timestamp_field``), how parameters are found (``parameter_source_table`` + ``parameters``)
and where records land (``target_table``). The engine (producers/extractor.py) does the paging,
state and retries; nothing in this module talks to the network or the database.

The catalog is built from three layers, each validated:

1. ``data/etl_jobs_export.psv`` -- the verbatim export of the 90 configured jobs;
2. ``data/catalog_fixes.yaml`` -- the documented corrections (invalid endpoints, fixed paths,
   completed parameter configuration, primary keys, categories), each with its reason;
3. ``config/jobs.yaml`` -- the operator's overrides (schedule, priority, depends_on, timeout,
   incremental, enabled), optional.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATA_DIR = Path(__file__).parent / "data"
EXPORT_FILE = DATA_DIR / "etl_jobs_export.psv"
FIXES_FILE = DATA_DIR / "catalog_fixes.yaml"

#: Safe SQL identifier: what a table or column name from configuration must look like before it is
#: ever handed to psycopg.sql.Identifier. Lower-case, starts with a letter, at most 63 bytes.
IDENTIFIER_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
#: A JSON path into a record: dotted keys (``study.id``), ``$value`` or ``$param.<name>``.
KEY_PATH_RE = re.compile(r"^(\$value|\$param\.[A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)$")
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
CRON_FIELDS = 5

#: how an endpoint pages (``producers.paging`` implements each); declared per job in
#: data/catalog_fixes.yaml (``paging:``) or config/jobs.yaml, never guessed from the URL
Paging = Literal["odata", "none"]
PAGING_STYLES: dict[str, str] = {
    "odata": "OData query paging: $top/$skip with $count, $orderby on the key, $filter for incremental runs; "
             "remaining pages fetched concurrently once the count is known; server next links followed",
    "none": "one request answering an array, an object or a wrapped page; server next links followed; "
            "no $filter, so incremental runs read it in full",
}

Category = Literal["core", "study", "patient", "patient-visit", "system", "organization", "finance", "recruitment", "file"]
EXPORT_COLUMNS = (
    "id", "name", "endpoint", "target_table", "status", "requires_params", "param_name",
    "param_source_table", "param_source_column", "last_status", "last_records",
)


class CatalogError(ValueError):
    """A catalog or override file is wrong; the message names the job, the field and the fix."""


def check_identifier(name: str, what: str = "table name") -> str:
    """Return ``name`` if it is a safe lower-case SQL identifier, else raise CatalogError."""
    if not isinstance(name, str) or not IDENTIFIER_RE.match(name):
        raise CatalogError(
            f"{what} {name!r} is not a safe identifier: use lower-case letters, digits and _ "
            "(starting with a letter or _, at most 63 characters)"
        )
    return name


def legacy_column_to_path(column: str) -> str:
    """Map the export's ``parameter_source_column`` (``id`` or ``data->>'id'``) to a JSON path.

    The export mixes ``id`` (which would be the staging table's serial key, a bug) and
    ``data->>'id'`` (the entity id inside the JSON). Both mean the entity id.
    """
    column = column.strip()
    m = re.fullmatch(r"data\s*->>\s*'([A-Za-z_][A-Za-z0-9_]*)'", column)
    if m:
        return m.group(1)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", column):
        return column
    raise CatalogError(f"parameter_source_column {column!r} is neither a column name nor data->>'key'")


class ListSource(BaseModel):
    """A cheaper source for a fan-out job: one list across all parents that returns the same model
    as the job's per-parent endpoint (``/api/v1/subjects/odata`` for ``/studies/{studyId}/subjects``).

    Read in a few pages instead of one call per parent; each record's parent -- the parameters the
    per-parent read would have used, stored as the row's ``source_params`` -- is taken from the
    record itself (``parameters``: placeholder -> JSON path). Declared in data/catalog_fixes.yaml
    from the spec; used only where config/jobs.yaml says ``source: list`` (verify first with
    ``trialsync doctor --sources``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str = Field(min_length=1)
    paging: Paging = "odata"
    parameters: dict[str, str]
    reason: str = ""

    @field_validator("parameters")
    @classmethod
    def _paths(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not KEY_PATH_RE.match(path) or path.startswith("$"):
                raise ValueError(f"list source parameter {name}: {path!r} is not a dotted path into the record")
        return v


class Job(BaseModel):
    """One configured extraction: endpoint -> topic -> staging table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int = Field(gt=0)
    name: str = Field(min_length=1)
    endpoint: str = Field(min_length=1, description="path under the CC base URL, with {placeholders}")
    target_table: str
    is_active: bool = True
    is_valid: bool = True
    invalid_reason: str | None = None
    requires_parameters: bool = False
    parameter_source_table: str | None = None
    #: placeholder name -> JSON path in the parent's ``data`` (e.g. {"studyId": "study.id"})
    parameters: dict[str, str] = Field(default_factory=dict)
    primary_key: tuple[str, ...] = ("id",)
    timestamp_field: str = "modifiedDate"
    incremental: bool | None = None
    #: incremental runs of a parameterized job: ask every parent, or only the changed ones (None = setting);
    #: ``assumed``: as ``changed``, trusted from the start on the operator's word (no verification
    #: night) -- evidence against still breaks it
    fanout_incremental: Literal["all", "changed", "assumed"] | None = None
    #: fan-out jobs: the declared cheaper source, and whether this installation reads it
    list_source: ListSource | None = None
    source: Literal["parents", "list"] = "parents"
    category: Category = "core"
    paging: Paging = "none"
    page_size: int = Field(default=1000, ge=1, le=1000)
    priority: int = 5
    timeout_seconds: int | None = Field(default=None, gt=0)
    depends_on: tuple[int, ...] = ()
    schedule: str | None = None
    source_type: Literal["cc_api", "csv"] = "cc_api"
    source_options: dict[str, Any] = Field(default_factory=dict)
    fix_reasons: tuple[str, ...] = ()
    last_status: str | None = None
    last_records: int | None = None

    @field_validator("target_table", "parameter_source_table")
    @classmethod
    def _identifier(cls, v: str | None) -> str | None:
        return None if v is None else check_identifier(v)

    @field_validator("primary_key")
    @classmethod
    def _key_paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("primary_key needs at least one path")
        for p in v:
            if not KEY_PATH_RE.match(p):
                raise ValueError(f"primary key path {p!r} is not a dotted key, $value or $param.<name>")
        return v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            validate_cron(v)
        return v

    @model_validator(mode="after")
    def _parameters_match_endpoint(self) -> Job:
        if not self.is_valid:
            return self
        placeholders = set(self.placeholders)
        if self.requires_parameters:
            if not self.parameter_source_table:
                raise ValueError(f"job {self.id} requires parameters but has no parameter_source_table")
            missing = placeholders - set(self.parameters)
            if missing:
                raise ValueError(f"job {self.id}: endpoint placeholders {sorted(missing)} have no parameter mapping")
        elif placeholders and self.source_type == "cc_api":
            raise ValueError(
                f"job {self.id}: endpoint {self.endpoint} has placeholders {sorted(placeholders)} "
                "but the job is not parameterized"
            )
        for p in self.primary_key:
            if p.startswith("$param.") and p.removeprefix("$param.") not in self.parameters:
                raise ValueError(f"job {self.id}: primary key {p} names no parameter of the job")
        if self.list_source is not None:
            missing = set(self.parameters) - set(self.list_source.parameters)
            if missing:
                raise ValueError(f"job {self.id}: its list source gives no path for parameters {sorted(missing)}")
        if self.source == "list" and self.list_source is None:
            raise ValueError(f"job {self.id} ({self.name}) has no cheaper list source declared: `source: list` "
                             "applies only to jobs listed under list_sources in the catalog fixes")
        return self

    @property
    def placeholders(self) -> list[str]:
        return PLACEHOLDER_RE.findall(self.endpoint)

    @property
    def paging_description(self) -> str:
        return PAGING_STYLES[self.fetch_paging]

    @property
    def reads_list(self) -> bool:
        """This installation reads the job's records from its list across parents."""
        return self.source == "list" and self.list_source is not None and self.requires_parameters

    @property
    def asks_per_parent(self) -> bool:
        """One request (or paged stream) per parent: the fan-out policies, sweep and budget apply."""
        return self.requires_parameters and not self.reads_list

    @property
    def fetch_endpoint(self) -> str:
        """The path the run asks (with placeholders when it asks per parent)."""
        return self.list_source.endpoint if self.reads_list and self.list_source else self.endpoint

    @property
    def fetch_paging(self) -> Paging:
        return self.list_source.paging if self.reads_list and self.list_source else self.paging

    @property
    def runnable(self) -> bool:
        """Active and pointing at an endpoint that exists."""
        return self.is_active and self.is_valid

    @property
    def supports_incremental(self) -> bool:
        """Incremental loads need ``$filter``, which only endpoints with OData paging accept."""
        if self.incremental is not None:
            return self.incremental and self.fetch_paging == "odata"
        return self.fetch_paging == "odata"

    def render_endpoint(self, params: dict[str, Any]) -> str:
        """Substitute parameter values into the endpoint path (values are URL-quoted)."""
        from urllib.parse import quote

        def sub(m: re.Match[str]) -> str:
            return quote(str(params[m.group(1)]), safe="")

        return PLACEHOLDER_RE.sub(sub, self.endpoint)


def validate_cron(expr: str) -> str:
    """Validate a 5-field cron expression; raise CatalogError quoting it when it is wrong."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != CRON_FIELDS:
        raise CatalogError(
            f"cron expression {expr!r} has {len(fields)} fields; expected 5 "
            "(minute hour day-of-month month day-of-week), e.g. '0 2 * * *'"
        )
    try:
        CronTrigger.from_crontab(expr)
    except ValueError as e:
        raise CatalogError(f"cron expression {expr!r} is invalid: {e}") from None
    return expr


class JobOverride(BaseModel):
    """One entry of config/jobs.yaml: what an operator may change about a job."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    schedule: str | None = None
    priority: int | None = None
    depends_on: list[int | str] = Field(default_factory=list)
    timeout_seconds: int | None = Field(default=None, gt=0)
    incremental: bool | None = None
    fanout_incremental: Literal["all", "changed", "assumed"] | None = None
    paging: Paging | None = None
    #: the record field incremental runs filter on (``modifiedDate``, ``lastUpdatedOn``, ...)
    timestamp_field: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    #: fan-out jobs with a declared list source: read it (``list``) or ask each parent (``parents``)
    source: Literal["parents", "list"] | None = None
    page_size: int | None = Field(default=None, ge=1, le=1000)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None:
            validate_cron(v)
        return v


class FileSource(BaseModel):
    """A non-API source declared in config/jobs.yaml (seed 004: a CSV file)."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(gt=0)
    name: str
    source_type: Literal["csv"] = "csv"
    path: str
    target_table: str
    key_column: str
    delimiter: str = ","
    timestamp_field: str | None = None
    enabled: bool = True
    schedule: str | None = None
    depends_on: list[int | str] = Field(default_factory=list)


class OverridesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: dict[int | str, JobOverride] = Field(default_factory=dict)
    sources: list[FileSource] = Field(default_factory=list)


def parse_export(text: str, origin: str = "export") -> list[dict[str, Any]]:
    """Parse the ``|``-separated export into raw job dicts; malformed rows raise CatalogError."""
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != len(EXPORT_COLUMNS):
            raise CatalogError(
                f"{origin} line {lineno}: expected {len(EXPORT_COLUMNS)} '|'-separated fields "
                f"({'|'.join(EXPORT_COLUMNS)}), got {len(cells)}"
            )
        rec = dict(zip(EXPORT_COLUMNS, cells, strict=True))
        try:
            job_id = int(rec["id"])
        except ValueError:
            raise CatalogError(f"{origin} line {lineno}: job id {rec['id']!r} is not an integer") from None
        if job_id in seen:
            raise CatalogError(f"{origin} line {lineno}: duplicate job id {job_id}")
        seen.add(job_id)
        if rec["status"] not in ("Active", "Disabled"):
            raise CatalogError(f"{origin} line {lineno}: status {rec['status']!r} is not Active or Disabled")
        if rec["requires_params"] not in ("Yes", "No"):
            raise CatalogError(f"{origin} line {lineno}: requires_params {rec['requires_params']!r} is not Yes or No")
        check_identifier(rec["target_table"], f"{origin} line {lineno}: target table")
        job: dict[str, Any] = {
            "id": job_id,
            "name": rec["name"],
            "endpoint": rec["endpoint"],
            "target_table": rec["target_table"],
            "is_active": rec["status"] == "Active",
            "requires_parameters": rec["requires_params"] == "Yes",
            "last_status": None if rec["last_status"] in ("-", "") else rec["last_status"],
            "last_records": int(rec["last_records"]) if rec["last_records"].isdigit() else None,
        }
        if job["requires_parameters"] and rec["param_source_table"] != "-":
            job["parameter_source_table"] = rec["param_source_table"]
            job["parameters"] = {rec["param_name"]: legacy_column_to_path(rec["param_source_column"])}
        rows.append(job)
    return rows


def apply_fixes(rows: list[dict[str, Any]], fixes: dict[str, Any]) -> list[dict[str, Any]]:
    """Apply catalog_fixes.yaml to the raw export rows (pure; returns new dicts)."""
    by_id = {r["id"]: dict(r) for r in rows}

    def get(job_id: int, where: str) -> dict[str, Any]:
        if job_id not in by_id:
            raise CatalogError(f"catalog fixes ({where}) name job {job_id}, which is not in the export")
        return by_id[job_id]

    for status, ids in (fixes.get("invalid_endpoints") or {}).items():
        for job_id in ids:
            job = get(job_id, "invalid_endpoints")
            job["is_valid"] = False
            job["is_active"] = False
            job["invalid_reason"] = f"endpoint answers HTTP {status} on the real API"
    for job_id, reason in (fixes.get("keep_disabled") or {}).items():
        job = get(int(job_id), "keep_disabled")
        job["is_active"] = False
        job["fix_reasons"] = (*job.get("fix_reasons", ()), f"kept disabled: {reason}")
    for job_id, change in (fixes.get("jobs") or {}).items():
        job = get(int(job_id), "jobs")
        change = dict(change)
        reason = change.pop("reason", None)
        job.update(change)
        if reason:
            job["fix_reasons"] = (*job.get("fix_reasons", ()), reason)
    for job_id, key in (fixes.get("primary_keys") or {}).items():
        get(int(job_id), "primary_keys")["primary_key"] = tuple(key)
    for job_id, src in (fixes.get("list_sources") or {}).items():
        get(int(job_id), "list_sources")["list_source"] = dict(src)
    for style, ids in (fixes.get("paging") or {}).items():
        for job_id in ids:
            get(job_id, "paging")["paging"] = style
    for field, ids in (fixes.get("timestamp_fields") or {}).items():
        for job_id in ids:
            get(job_id, "timestamp_fields")["timestamp_field"] = field
    categorized: dict[int, str] = {}
    for category, ids in (fixes.get("categories") or {}).items():
        for job_id in ids:
            if job_id in categorized:
                raise CatalogError(f"job {job_id} is in two categories: {categorized[job_id]} and {category}")
            categorized[job_id] = category
            get(job_id, "categories")["category"] = category
    missing = sorted(set(by_id) - set(categorized))
    if missing:
        raise CatalogError(f"catalog fixes give no category to jobs {missing}")
    return [by_id[k] for k in sorted(by_id)]


class JobCatalog:
    """All jobs, validated, with the helpers the orchestrator needs (lookup, DAG, topological order)."""

    def __init__(self, jobs: Iterable[Job]):
        self.jobs: dict[int, Job] = {}
        for job in jobs:
            if job.id in self.jobs:
                raise CatalogError(f"duplicate job id {job.id}")
            self.jobs[job.id] = job

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, overrides_path: Path | str | None = None, export_text: str | None = None) -> JobCatalog:
        text = export_text if export_text is not None else EXPORT_FILE.read_text(encoding="utf-8")
        fixes = yaml.safe_load(FIXES_FILE.read_text(encoding="utf-8")) or {}
        rows = apply_fixes(parse_export(text), fixes)
        jobs: list[Job] = []
        for row in rows:
            try:
                jobs.append(Job(**row))
            except ValidationError as e:
                raise CatalogError(f"job {row.get('id')}: {_first_error(e)}") from None
        catalog = cls(jobs)
        if overrides_path is not None and Path(overrides_path).exists():
            catalog = catalog.with_overrides(load_overrides(overrides_path))
        catalog.validate_dag()
        return catalog

    def with_overrides(self, overrides: OverridesFile) -> JobCatalog:
        jobs = dict(self.jobs)
        for ref, ov in overrides.jobs.items():
            job = self.resolve(ref)
            change: dict[str, Any] = {}
            if ov.enabled is not None:
                if ov.enabled and not job.is_valid:
                    raise CatalogError(f"config/jobs.yaml enables job {job.id} ({job.name}), but its endpoint is invalid: {job.invalid_reason}")
                change["is_active"] = ov.enabled
            if ov.fanout_incremental is not None and not job.requires_parameters:
                raise CatalogError(f"config/jobs.yaml sets fanout_incremental for job {job.id} ({job.name}), "
                                   "which is not parameterized: remove it (it only applies to fan-out jobs)")
            if ov.source == "list" and job.list_source is None:
                raise CatalogError(f"config/jobs.yaml sets `source: list` for job {job.id} ({job.name}), which has no "
                                   "cheaper list source (docs/extraction.md lists the jobs that have one)")
            for f in ("schedule", "priority", "timeout_seconds", "incremental", "fanout_incremental", "paging",
                      "timestamp_field", "source", "page_size"):
                v = getattr(ov, f)
                if v is not None:
                    change[f] = v
            if ov.depends_on:
                change["depends_on"] = tuple(self.resolve(d).id for d in ov.depends_on)
            jobs[job.id] = job.model_copy(update=change)
        for src in overrides.sources:
            if src.id in jobs:
                raise CatalogError(f"config/jobs.yaml source {src.name!r} uses id {src.id}, which is already job {jobs[src.id].name!r}")
            try:
                jobs[src.id] = Job(
                    id=src.id, name=src.name, endpoint=src.path, target_table=src.target_table,
                    is_active=src.enabled, source_type="csv", category="file",
                    primary_key=(src.key_column,), timestamp_field=src.timestamp_field or "modifiedDate",
                    incremental=False, schedule=src.schedule,
                    depends_on=tuple(self.resolve(d).id for d in src.depends_on),
                    source_options={"delimiter": src.delimiter, "path": src.path},
                )
            except ValidationError as e:
                raise CatalogError(f"config/jobs.yaml source {src.name!r}: {_first_error(e)}") from None
        return JobCatalog(jobs.values())

    # -- lookup --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs[k] for k in sorted(self.jobs))

    def __len__(self) -> int:
        return len(self.jobs)

    def get(self, job_id: int) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise CatalogError(
                f"unknown job id {job_id}: run `trialsync jobs list` to see the {len(self.jobs)} configured jobs"
            ) from None

    def resolve(self, ref: int | str) -> Job:
        """Find a job by id (int or digits) or by name (case-insensitive, spaces/underscores equal)."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            return self.get(int(ref))
        exact = [j for j in self.jobs.values() if j.name == ref]
        if len(exact) == 1:
            return exact[0]
        norm = _norm_name(ref)
        matches = [j for j in self.jobs.values() if _norm_name(j.name) == norm]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise CatalogError(f"job name {ref!r} is ambiguous: it matches jobs "
                               f"{', '.join(str(j.id) for j in sorted(matches, key=lambda j: j.id))}; use the id")
        raise CatalogError(f"unknown job {ref!r}: use a job id or one of the names in `trialsync jobs list`")

    @property
    def runnable(self) -> list[Job]:
        return [j for j in self if j.runnable]

    @property
    def target_tables(self) -> list[str]:
        return sorted({j.target_table for j in self.jobs.values()})

    def by_category(self, category: str) -> list[Job]:
        cats = {j.category for j in self.jobs.values()}
        if category not in cats:
            raise CatalogError(f"unknown category {category!r}: one of {', '.join(sorted(cats))}")
        return [j for j in self if j.category == category]

    # -- dependency DAG ------------------------------------------------------------------------
    @cached_property
    def _producers_of(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for j in self:
            if j.runnable and not j.requires_parameters:
                out.setdefault(j.target_table, []).append(j.id)
        for j in self:  # parameterized producers count only when no plain job fills the table
            if j.runnable and j.requires_parameters and j.target_table not in out:
                out.setdefault(j.target_table, []).append(j.id)
        return out

    def parents(self, job: Job) -> list[int]:
        """Jobs that must have *loaded* before ``job`` runs: its parameter source's producers + depends_on."""
        deps: list[int] = list(job.depends_on)
        if job.requires_parameters and job.parameter_source_table:
            for pid in self._producers_of.get(job.parameter_source_table, []):
                if pid != job.id and pid not in deps:
                    deps.append(pid)
        return deps

    def validate_dag(self) -> None:
        for j in self:
            for d in j.depends_on:
                if d not in self.jobs:
                    raise CatalogError(f"job {j.id} ({j.name}) depends on unknown job {d}")
        self.topological_order(list(self.jobs))

    def topological_order(self, job_ids: Iterable[int]) -> list[list[int]]:
        """Kahn levels restricted to ``job_ids``: each level's jobs may run in parallel."""
        wanted = set(job_ids)
        indeg: dict[int, int] = {j: 0 for j in wanted}
        children: dict[int, list[int]] = {j: [] for j in wanted}
        for j in wanted:
            for p in self.parents(self.jobs[j]):
                if p in wanted:
                    indeg[j] += 1
                    children[p].append(j)
        levels: list[list[int]] = []
        ready = sorted((j for j, d in indeg.items() if d == 0), key=lambda x: (self.jobs[x].priority, x))
        done = 0
        while ready:
            levels.append(ready)
            done += len(ready)
            nxt: list[int] = []
            for j in ready:
                for c in children[j]:
                    indeg[c] -= 1
                    if indeg[c] == 0:
                        nxt.append(c)
            ready = sorted(nxt, key=lambda x: (self.jobs[x].priority, x))
        if done != len(wanted):
            cycle = self._find_cycle({j for j, d in indeg.items() if d > 0})
            raise CatalogError("dependency cycle: " + " -> ".join(f"{c} ({self.jobs[c].name})" for c in cycle))
        return levels

    def with_ancestors(self, job_ids: Iterable[int]) -> list[int]:
        out: set[int] = set()
        stack = list(job_ids)
        while stack:
            j = stack.pop()
            if j in out:
                continue
            out.add(j)
            stack.extend(self.parents(self.get(j)))
        return sorted(out)

    def _find_cycle(self, nodes: set[int]) -> list[int]:
        for start in sorted(nodes):
            path: list[int] = []
            seen: set[int] = set()
            node = start
            while node not in seen:
                seen.add(node)
                path.append(node)
                nxt = [p for p in self.parents(self.jobs[node]) if p in nodes]
                if not nxt:
                    break
                node = nxt[0]
            else:
                return [*path[path.index(node):], node]
        return sorted(nodes)


def load_overrides(path: Path | str) -> OverridesFile:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CatalogError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}: the top level must be a mapping with `jobs:` and/or `sources:` "
                           f"(found a {type(raw).__name__}): indent the entries under `jobs:` as in the "
                           "file's header comment")
    try:
        return OverridesFile(**raw)
    except ValidationError as e:
        raise CatalogError(f"{path}: {_first_error(e)}") from None
    except CatalogError as e:
        raise CatalogError(f"{path}: {e}") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    inp = err.get("input")
    shown = "" if isinstance(inp, dict) else f" (got {inp!r})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def _norm_name(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name).lower()
