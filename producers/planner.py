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
from typing import Any, Protocol
from urllib.parse import quote

import numpy as np
import psycopg
from psycopg import sql

from common.config import ConfigError, Settings
from common.logging import get_logger
from producers import parents as parents_mod
from producers import watermarks as wm_mod
from producers.keys import parent_key
from producers.page_publisher import ChangeWatch, StagingContent
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
            st = Stream(0, self.job.fetch_endpoint, None, self._filter(""))
        else:
            params = dict(zip(self.names, self.values[i], strict=True))
            st = Stream(i, self._render(params), params, self._filter(parent_key(params)) if self.watermarks else None)
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[i] = st
        return st


@dataclass
class FanoutHistory:
    """What earlier runs of a fan-out job left for the next one (from ``dw_etl_runs.run_context``)."""

    #: read point of the last successful run that asked every changed parent ("changed since")
    since: datetime | None = None
    #: the newest parent timestamp that run saw ("the parent's own timestamp moved since")
    ts_since: datetime | None = None
    #: the sweep slice the latest run used, and whether it asked all of it
    last_slice: int | None = None
    slice_done: bool = True
    #: the first complete pass over the parents: done, or the last parent reached so far
    first_pass_done: bool = False
    first_pass_after: tuple[str, ...] | None = None
    #: what the job's runs have shown of the assumption the `changed` policy relies on (CC moves a
    #: parent's timestamp when a child changes): ``unverified`` until a complete verification run
    #: saw nothing unannounced (its changes announced, or none at all); ``holds``; ``broken`` once a
    #: change was found under a parent not marked changed (the guard) -- until a complete run of the
    #: guard finds nothing unannounced
    assumption: str = "unverified"
    #: API calls per parent of the last run that asked parents (a parent with many pages costs more)
    calls_per_parent: float = 1.0

    @classmethod
    def load(cls, conn: psycopg.Connection, job_id: int) -> FanoutHistory:
        row = conn.execute(
            """SELECT
                 (SELECT array[(run_context->>'parents_as_of')::timestamptz,
                               (run_context->>'parents_ts_as_of')::timestamptz] FROM etl.dw_etl_runs
                   WHERE job_id = %(j)s AND run_status = 'success' AND run_context ? 'parents_as_of'
                   ORDER BY id DESC LIMIT 1),
                 (SELECT run_context->'fanout' FROM etl.dw_etl_runs
                   WHERE job_id = %(j)s AND run_context->'fanout' ? 'sweep_slice' ORDER BY id DESC LIMIT 1),
                 (SELECT run_context->'fanout'->'first_pass' FROM etl.dw_etl_runs
                   WHERE job_id = %(j)s AND run_context->'fanout' ? 'first_pass' ORDER BY id DESC LIMIT 1),
                 (SELECT run_context->'fanout'->>'assumption_after' FROM etl.dw_etl_runs
                   WHERE job_id = %(j)s AND run_context->'fanout' ? 'assumption_after' ORDER BY id DESC LIMIT 1),
                 (SELECT api_calls::float / parents_done FROM etl.dw_etl_runs
                   WHERE job_id = %(j)s AND parents_done > 0 AND api_calls > 0 ORDER BY id DESC LIMIT 1),
                 EXISTS (SELECT 1 FROM etl.dw_etl_runs WHERE job_id = %(j)s AND run_status = 'success'
                          AND mode <> 'retry' AND coalesce(run_context->>'limit', '') = '')""",
            {"j": job_id}).fetchone()
        assert row is not None
        since_pair, sweep, first_pass, assumption, cpp, any_success = row
        since, ts_since = since_pair if since_pair else (None, None)
        h = cls(since=since, ts_since=ts_since, assumption=assumption or "unverified", calls_per_parent=max(1.0, float(cpp or 1.0)))
        if sweep:
            h.last_slice = int(sweep["sweep_slice"])
            h.slice_done = bool(sweep.get("sweep_done", True))
        if first_pass is not None:
            h.first_pass_done = bool(first_pass.get("done"))
            after = first_pass.get("after")
            h.first_pass_after = tuple(after) if after else None
        else:
            # installations from before first-pass tracking: a successful run asked every parent
            h.first_pass_done = bool(any_success)
        return h


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
    #: parameterized runs: the database clock when the parents were read, recorded when the run
    #: asked every changed parent (the next run's "changed since")
    parents_as_of: datetime | None = None
    #: ... and the newest parent timestamp that read saw
    parents_ts_as_of: datetime | None = None
    #: the fan-out selection (recorded in run_context and logged)
    fanout: dict[str, Any] = field(default_factory=dict)
    #: streams [0, marked) are parents marked changed; the others are checked for changes the
    #: parent's own timestamp did not announce (the guard)
    marked: int = 0
    #: the first-pass parents this run asks, in order: stream index -> position in the pass
    first_pass: tuple[int, int] = (0, 0)
    first_pass_values: list[tuple[str, ...]] = field(default_factory=list)
    #: a retry that continues a failed run of a paged stream: {"from_run", "key", "after", "cap"}
    resume: dict[str, Any] = field(default_factory=dict)


def describe_filter(plan: RunPlan) -> dict[str, Any]:
    """The ``$filter`` a run sends, for its run row and its ``run_started`` log line."""
    streams = plan.streams
    if len(streams) == 1 and plan.parents_total is None:
        return {"filter": streams[0].filter_expr, "watermark_from": plan.watermark_from}
    return {"filtered_streams": plan.filtered_streams, "unfiltered_streams": len(streams) - plan.filtered_streams,
            "watermark_from": plan.watermark_from}


def fanout_policy(job: Job, settings: Settings) -> str:
    return job.fanout_incremental or settings.etl_fanout_incremental


def plan_run(conn: psycopg.Connection, job: Job, settings: Settings, *, incremental: bool, requested_mode: str,
             only_parents: list[dict[str, Any]] | None, limit: int | None, track_watermarks: bool,
             budget: CallBudget | None = None, resume_from: int | None = None) -> RunPlan:
    """Read the parents and watermarks the run needs and build its streams (module docstring)."""
    names = job.placeholders or list(job.parameters)
    values: list[tuple[str, ...]] | None = None
    plan = RunPlan(streams=[])
    swept: list[tuple[str, ...]] = []
    per_parent = job.asks_per_parent
    if track_watermarks:
        plan.previous_watermarks = wm_mod.load(conn, settings, job.id)
    if job.reads_list:
        plan.fanout = {"source": "list", "endpoint": job.fetch_endpoint}
    elif per_parent:
        if only_parents is not None:
            values = []
            for p in only_parents:
                missing = [n for n in names if n not in p]
                if missing:
                    raise ConfigError(f"parent {p} for job {job.id} lacks parameters {missing}")
                values.append(tuple(str(p[n]) for n in names))
        elif requested_mode == "incremental" and limit is None and job.source_type == "cc_api":
            values, swept = _select_parents(conn, job, settings, plan, budget=budget)
        else:  # --full, --limit: every parent, in order
            plan.parents_as_of = parents_mod.read_point(conn)
            plan.parents_ts_as_of = parents_mod.newest_parent_ts(conn, job, plan.parents_as_of)
            values = parents_mod.load_parent_values(conn, job)
            plan.fanout = {"policy": fanout_policy(job, settings), "asked": "all", "reason": requested_mode
                           if limit is None else "--limit"}
        plan.parents_total = len(values)
    wms = plan.previous_watermarks if incremental else {}
    if job.reads_list:
        wms = {"": wms[""]} if "" in wms else {}
    if wms:
        if values is None:  # one stream: a plain job, or a fan-out job reading its list ('' key)
            used = [wms[""]] if "" in wms else []
        elif only_parents is not None:
            used = [wms[pk] for pk in (parent_key(dict(zip(names, v, strict=True))) for v in values) if pk in wms]
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
    if resume_from is not None and values is None and limit is None:
        plan.resume = _resume_point(conn, job, resume_from)
        if plan.resume:
            st = plan.streams[0]
            cond = f"{plan.resume['key']} gt {odata_value(plan.resume['after'])}"
            plan.streams = [Stream(0, st.path, None, f"{st.filter_expr} and {cond}" if st.filter_expr else cond)]
            log.info("run_resumes", job_id=job.id, from_run=resume_from, after=plan.resume["after"],
                     records_before=plan.resume.get("records"))
    return plan


def change_watch(conn: psycopg.Connection, job: Job, plan: RunPlan) -> ChangeWatch | None:
    """What an incremental fan-out run judges its records against (the ``changed`` policy's
    evidence), or None for a run that judges nothing (not a fan-out run, or its first pass: every
    record is new there). A job that keeps no watermarks (its endpoint takes no filter, or its records
    carry no timestamp) is judged by content: what staging holds of its records, as fingerprints
    (:func:`staging_content`)."""
    asked = plan.fanout.get("asked")
    if asked in (None, "first_pass"):
        return None
    watch = ChangeWatch(plan.marked, plan.previous_watermarks)
    if not plan.previous_watermarks:
        watch.content = staging_content(conn, job)
    return watch


def staging_content(conn: psycopg.Connection, job: Job) -> StagingContent:
    """Fingerprints of what ``job``'s staging table holds (:class:`StagingContent`), computed by
    the database: one row scan, 8 bytes a row back."""
    from common.db import staging_table

    q = sql.SQL("""
        SELECT coalesce(array_agg(('x' || left(md5(source_id || ':' || replace(content_hash::text, '-', '')),
                                             16))::bit(64)::bigint)
                          FILTER (WHERE etl_job_id = %(job)s AND content_hash IS NOT NULL), '{{}}'),
               coalesce(array_agg(('x' || left(md5(source_id), 16))::bit(64)::bigint)
                          FILTER (WHERE etl_job_id IS DISTINCT FROM %(job)s OR content_hash IS NULL), '{{}}')
          FROM {} WHERE NOT is_deleted""").format(staging_table(job.target_table))
    row = conn.execute(q, {"job": job.id}, binary=True).fetchone()
    assert row is not None
    return StagingContent(np.sort(np.array(row[0], dtype=np.int64)), np.sort(np.array(row[1], dtype=np.int64)))


def resumable(job: Job) -> str | None:
    """The key a paged run of ``job`` can resume after (a plain or list stream with OData paging
    ordered by a single top-level key), else None."""
    from producers.paging import stable_orderby

    if job.asks_per_parent:
        return None
    return stable_orderby(job)


def odata_value(v: Any) -> str:
    """An OData literal: numbers as they are, text quoted (quotes doubled)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "'" + str(v).replace("'", "''") + "'"
    return str(v)


def _resume_point(conn: psycopg.Connection, job: Job, run_id: int) -> dict[str, Any]:
    """Where a retry of run ``run_id`` continues: its resume point, when it has one for this job
    and key; {} = start at page 1. ``cap``: the lowest largest-timestamp of every attempt so far
    (the watermark the chain of attempts may commit at most)."""
    key = resumable(job)
    row = conn.execute("SELECT job_id, run_context->'resume' FROM etl.dw_etl_runs WHERE id = %s",
                       (run_id,)).fetchone()
    if key is None or row is None or row[0] != job.id or not row[1]:
        return {}
    point = dict(row[1])
    if point.get("key") != key or point.get("after") is None:
        return {}
    caps = [c for c in (point.get("cap"), point.get("max_ts")) if c]
    return {"from_run": run_id, "key": key, "after": point["after"], "records": point.get("records", 0),
            "cap": min(caps) if caps else None}


@dataclass(frozen=True)
class SelectionRule:
    """Which parents an incremental run of a fan-out job asks, from its history:

    * ``changed`` policy, first pass done, the assumption shown to hold: changed + one sweep slice;
    * first pass not done: changed + the parents the pass has not reached (keyset order);
    * ``all`` policy, the assumption not (or no longer) shown to hold, or no complete run to start
      from: every parent -- each with its own filter, so every change arrives, and the run sees
      whether each came under a parent marked changed (the evidence for, or against, the policy).
    """

    since: datetime | None
    ts_since: datetime | None
    use_sweep: bool
    sweep_slice: int
    sweep_runs: int
    everything: bool
    first_pass_done: bool
    first_pass_after: tuple[str, ...] | None

    @classmethod
    def of(cls, job: Job, settings: Settings, h: FanoutHistory) -> SelectionRule:
        policy = fanout_policy(job, settings)
        n = settings.etl_fanout_sweep_runs
        # `assumed`: the operator vouches for the assumption (records without a timestamp cannot show it)
        trusted = h.assumption == "holds" or (policy == "assumed" and h.assumption != "broken")
        use_sweep = policy != "all" and h.first_pass_done and trusted and h.since is not None
        slice_ = 0 if h.last_slice is None else ((h.last_slice + 1) % n if h.slice_done else h.last_slice % n)
        everything = (policy == "all" or not trusted or h.since is None) and h.first_pass_done
        return cls(h.since, h.ts_since, use_sweep, slice_, n, everything, h.first_pass_done, h.first_pass_after)

    def select(self, conn: psycopg.Connection, job: Job, count_only: bool = False) -> parents_mod.ParentSelection:
        return parents_mod.select_parents(
            conn, job, since=self.since, sweep_runs=self.sweep_runs if self.use_sweep else 0,
            sweep_slice=self.sweep_slice, after=self.first_pass_after, first_pass_done=self.first_pass_done,
            everything=self.everything, count_only=count_only, ts_since=self.ts_since)


class CallBudget(Protocol):
    """Where a run's share of a night's API calls comes from (``producers.call_plan``)."""

    def claim(self, job: Job, *, changed: float, others: float) -> int | None: ...


class FixedBudget:
    """``trialsync extract --max-calls N``: this run may make N calls."""

    def __init__(self, calls: int):
        self.calls = calls

    def claim(self, job: Job, *, changed: float, others: float) -> int | None:
        return self.calls


def _select_parents(conn: psycopg.Connection, job: Job, settings: Settings, plan: RunPlan, *,
                    budget: CallBudget | None) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The parents an incremental run asks (:class:`SelectionRule`), in the order a budget spends
    calls: changed, the sweep slice, the first pass's unfinished parents, the rest. Returns (parents
    to ask, the swept ones among them); fills the plan's ``fanout`` record, ``marked``,
    ``first_pass`` and ``parents_as_of``.

    "Changed since" is the read point of the last successful run that asked every changed parent
    (a partial run's failed parents stay inside the next window); ``parents.read_point()`` is a
    time no row written after that read can predate.
    """
    policy = fanout_policy(job, settings)
    h = FanoutHistory.load(conn, job.id)
    rule = SelectionRule.of(job, settings, h)
    use_sweep, slice_, n = rule.use_sweep, rule.sweep_slice, rule.sweep_runs
    sel = rule.select(conn, job)
    groups = {"changed": sel.changed, "swept": sel.swept, "unfinished": sel.unfinished, "rest": sel.rest}
    left = {k: 0 for k in groups}
    max_calls = None
    if budget is not None:
        max_calls = budget.claim(job, changed=len(sel.changed) * h.calls_per_parent,
                                 others=(len(sel.swept) + len(sel.unfinished) + len(sel.rest)) * h.calls_per_parent)
    if max_calls is not None:
        room = max(0, int(max_calls // h.calls_per_parent))
        for k, vals in groups.items():
            take = min(len(vals), room)
            left[k] = len(vals) - take
            del vals[take:]
            room -= take
    ordered = sel.ordered()
    plan.marked = len(sel.changed)
    start = len(sel.changed) + len(sel.swept)
    plan.first_pass = (start, start + len(sel.unfinished))
    plan.first_pass_values = sel.unfinished
    if not h.first_pass_done:
        asked = "first_pass"
    elif use_sweep:
        asked = "changed"
    elif policy != "all" and h.since is not None:
        asked = "guard" if h.assumption == "broken" else "verify"
    else:
        asked = "all"
    plan.fanout = {
        "policy": policy, "asked": asked, "since": h.since.isoformat() if h.since else None,
        "parents_changed": len(sel.changed), "parents_swept": len(sel.swept),
        "parents_unfinished": len(sel.unfinished), "parents_rest": len(sel.rest), "parent_rows": sel.parent_rows,
        # changed content without a moved parent timestamp (an embedded preview): not asked for it
        "parents_content_only": sel.content_only,
        "assumption": h.assumption, "changed_complete": left["changed"] == 0,
        "first_pass": {"done": h.first_pass_done, "after": list(h.first_pass_after) if h.first_pass_after else None},
    }
    if use_sweep:
        plan.fanout.update({"sweep_slice": slice_, "sweep_runs": n, "sweep_done": left["swept"] == 0})
    if max_calls is not None:
        plan.fanout["budget"] = {"max_calls": max_calls, "calls_per_parent": round(h.calls_per_parent, 3),
                                 "parents_left": left}
    if left["changed"] == 0:
        plan.parents_as_of, plan.parents_ts_as_of = sel.as_of, sel.ts_as_of
    log.info("fanout_parents_selected", job_id=job.id, asked=asked, parents=len(ordered),
             **{k: v for k, v in plan.fanout.items() if k.startswith("parents_")},
             **({"parents_left": left} if any(left.values()) else {}))
    return ordered, sel.swept


def export_fanout_state(conn: psycopg.Connection, jobs: Sequence[Job]) -> int:
    """Export every fan-out job's standing from its latest run -- guard on or off, parents the call
    budget left, the unannounced-change counter (at 0 until one is found) -- so a long-running
    service shows them from its start (a restarted scheduler, a night whose fan-out jobs were
    skipped) instead of the dashboard's panels staying empty. Returns how many jobs it exported."""
    from common.metrics import CALLS_BUDGET_LEFT, FANOUT_GUARD, FANOUT_UNANNOUNCED

    fan_out = [j for j in jobs if j.asks_per_parent]
    if not fan_out:
        return 0
    latest: dict[int, dict[str, Any]] = dict(conn.execute(
        """SELECT DISTINCT ON (job_id) job_id, run_context->'fanout' FROM etl.dw_etl_runs
            WHERE job_id = ANY(%s) AND run_context ? 'fanout' ORDER BY job_id, id DESC""",
        ([j.id for j in fan_out],)).fetchall())
    for job in fan_out:
        f = latest.get(job.id) or {}
        jid = str(job.id)
        FANOUT_UNANNOUNCED.labels(jid)
        FANOUT_GUARD.labels(jid).set(1 if f.get("guard_after") else 0)
        left = f.get("budget", {}).get("parents_left", {})
        for reason in ("changed", "swept", "unfinished", "rest"):
            CALLS_BUDGET_LEFT.labels(jid, reason).set(int(left.get(reason, 0)))
    return len(fan_out)
