"""What a run will ask for: its streams (one per parent, or one), their ``$filter``s, and why.

Step 3 of a run (``producers.extractor``). A plain job has one stream. A parameterized job has one
stream per distinct parameter dict read from its parent's staging table (``producers.parents``):
every live parent, or -- incremental run under the ``changed`` fan-out policy, with a complete
earlier run to start from -- the parents changed since that run plus one sweep slice. ``retry``
runs ask exactly the failed parents they were given. Incremental streams carry
``$filter=<timestamp field> gt <watermark - overlap>`` from their own watermark
(``producers.watermarks``); the sweep asks its parents unfiltered, which also refreshes records
whose embedded previews changed without their own timestamp moving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import psycopg

from common.config import ConfigError, Settings
from common.logging import get_logger
from producers import parents as parents_mod
from producers import watermarks as wm_mod
from producers.keys import parent_key
from producers.paging import Stream
from schemas.jobs import PLACEHOLDER_RE, Job

log = get_logger("planner")


def endpoint_renderer(job: Job) -> Callable[[dict[str, Any]], str]:
    """``job.render_endpoint`` compiled once: parents are rendered 10^5-10^6 times per run, and
    plain ids (the usual case) need no URL quoting."""
    parts = PLACEHOLDER_RE.split(job.endpoint)  # literal, name, literal, name, ..., literal

    def render(params: dict[str, Any]) -> str:
        out = []
        for i, p in enumerate(parts):
            if i % 2:
                v = str(params[p])
                out.append(v if v.isascii() and v.isalnum() else quote(v, safe=""))
            else:
                out.append(p)
        return "".join(out)

    return render


class StreamPlan(Sequence[Stream]):
    """The run's streams, built on access from compact parent tuples.

    A patient-visit fan-out has ~2.3 M parents: as tuples they cost ~120 bytes each; as Stream
    objects with a rendered path, a parameter dict and a parent key, ~4x that. Recently used
    streams are cached (each is touched a few times while its pages are fetched and published).
    Picklable (worker processes receive it).
    """

    def __init__(self, job: Job, values: list[tuple[str, ...]] | None, names: list[str],
                 watermarks: dict[str, datetime] | None = None, overlap_seconds: float = 0.0):
        self.job, self.values, self.names = job, values, names
        self.watermarks, self.overlap = watermarks or None, overlap_seconds
        self._setup()

    def _setup(self) -> None:
        self._render = endpoint_renderer(self.job)
        self._cache: dict[int, Stream] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_render", "_cache")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def _filter(self, pk: str) -> str | None:
        wm = self.watermarks.get(pk) if self.watermarks else None
        return None if wm is None else wm_mod.filter_expression(self.job.timestamp_field, wm, self.overlap)

    def __len__(self) -> int:
        return 1 if self.values is None else len(self.values)

    def __getitem__(self, i: int | slice) -> Any:  # Sequence's overloads: an int gives a Stream, a slice a list
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        st = self._cache.get(i)
        if st is not None:
            return st
        if self.values is None:
            if i != 0:
                raise IndexError(i)
            st = Stream(0, self.job.endpoint, None, self._filter(""))
        else:
            params = dict(zip(self.names, self.values[i], strict=True))
            st = Stream(i, self._render(params), params, self._filter(parent_key(params)) if self.watermarks else None)
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[i] = st
        return st


@dataclass
class RunPlan:
    """The streams of one run and what they were planned from."""

    streams: Sequence[Stream]
    #: parameterized jobs: how many parents are asked
    parents_total: int | None = None
    #: the job's stored watermarks when the run started (parent key -> timestamp)
    previous_watermarks: dict[str, datetime] = field(default_factory=dict)
    #: how many streams carry a ``$filter``, and the oldest watermark used (the run's watermark_from)
    filtered_streams: int = 0
    watermark_from: datetime | None = None
    #: parameterized runs: the database clock when the parents were read (complete runs only)
    parents_as_of: datetime | None = None
    #: the fan-out policy's selection (recorded in run_context and logged)
    fanout: dict[str, Any] = field(default_factory=dict)


def fanout_policy(job: Job, settings: Settings) -> str:
    return job.fanout_incremental or settings.etl_fanout_incremental


def plan_run(conn: psycopg.Connection, job: Job, settings: Settings, *, incremental: bool, requested_mode: str,
             only_parents: list[dict[str, Any]] | None, limit: int | None, track_watermarks: bool) -> RunPlan:
    """Read the parents and watermarks the run needs and build its streams (module docstring)."""
    names = job.placeholders or list(job.parameters)
    values: list[tuple[str, ...]] | None = None
    plan = RunPlan(streams=[])
    swept: list[tuple[str, ...]] = []
    if job.requires_parameters:
        if only_parents is not None:
            values = []
            for p in only_parents:
                missing = [n for n in names if n not in p]
                if missing:
                    raise ConfigError(f"parent {p} for job {job.id} lacks parameters {missing}")
                values.append(tuple(str(p[n]) for n in names))
        else:
            values, swept = _select_parents(conn, job, settings, plan, requested_mode=requested_mode, limit=limit)
        plan.parents_total = len(values)
    if track_watermarks:
        plan.previous_watermarks = wm_mod.load(conn, settings, job.id)
    wms = plan.previous_watermarks if incremental else {}
    if wms:
        if values is None or only_parents is not None:
            used = [wms[pk] for pk in (parent_key(dict(zip(names, v, strict=True))) for v in (values or [()]))
                    if pk in wms]
        else:
            used = list(wms.values())
        plan.watermark_from = min(used) if used else None
        plan.filtered_streams = len(used)
        if swept:
            # the sweep asks its parents without a filter: it also refreshes what moved without the
            # child's timestamp moving (a renamed arm inside a subject's `arm` preview)
            swept_keys = {parent_key(dict(zip(names, v, strict=True))) for v in swept}
            wms = {pk: v for pk, v in wms.items() if pk not in swept_keys}
    plan.streams = StreamPlan(job, values, names, wms or None, settings.cc_incremental_overlap_seconds)
    return plan


def _select_parents(conn: psycopg.Connection, job: Job, settings: Settings, plan: RunPlan, *, requested_mode: str,
                    limit: int | None) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Every parent, or -- incremental run, ``changed`` policy, a complete earlier run to start
    from -- the parents changed since that run plus this run's sweep slice. Returns (parents to
    ask, the swept ones among them); sets the plan's ``parents_as_of`` and ``fanout``.

    The reference is the last *successful* run that read its parents (every stream asked and
    answered): a partial run's failed parents stay inside the next run's "changed since" window.
    Its time is ``parents.read_point()``, which no row written after that read can predate.
    """
    if requested_mode == "incremental" and fanout_policy(job, settings) == "changed" and limit is None \
            and job.source_type == "cc_api":
        # the last complete run's read point, and the sweep slice the latest run used
        row = conn.execute(
            """SELECT (SELECT (run_context->>'parents_as_of')::timestamptz FROM etl.dw_etl_runs
                        WHERE job_id = %(j)s AND run_status = 'success' AND run_context ? 'parents_as_of'
                        ORDER BY id DESC LIMIT 1),
                      (SELECT (run_context->'fanout'->>'sweep_slice')::int FROM etl.dw_etl_runs
                        WHERE job_id = %(j)s AND run_context->'fanout' ? 'sweep_slice'
                        ORDER BY id DESC LIMIT 1)""", {"j": job.id}).fetchone()
        since, last_slice = row if row is not None else (None, None)
        if since is not None:
            n = settings.etl_fanout_sweep_runs
            slice_ = 0 if last_slice is None else (last_slice + 1) % n
            sel = parents_mod.select_changed_parents(conn, job, since=since, sweep_runs=n, sweep_slice=slice_)
            plan.parents_as_of = sel.as_of
            plan.fanout = {"policy": "changed", "asked": "changed", "since": since.isoformat(),
                           "parents_changed": sel.changed, "parents_swept": sel.swept,
                           "parent_rows": sel.parent_rows, "sweep_slice": slice_, "sweep_runs": n}
            log.info("fanout_parents_selected", job_id=job.id,
                     **{k: v for k, v in plan.fanout.items() if k not in ("policy", "asked")})
            return sel.values, sel.swept_values
        plan.fanout = {"policy": "changed", "asked": "all", "reason": "no complete earlier run to start from"}
    plan.parents_as_of = parents_mod.read_point(conn)
    return parents_mod.load_parent_values(conn, job), []
