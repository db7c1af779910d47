"""Can a fan-out job's cheaper source be trusted on *this* Clinical Conductor instance?

A list across parents (``Job.list_source``, e.g. ``/api/v1/subjects/odata`` for the per-study
``/studies/{studyId}/subjects/odata``) returns the same *model* per the spec; whether it returns
the same *records* -- every child of every parent, the parent reference filled in, nothing hidden
by a default filter -- is an assumption until checked. ``trialsync doctor --sources`` checks it:

1. read the whole list (paged, like a run would) and group its records by the parent each one
   names (the list source's parameter paths);
2. pick a sample of parents from the parent's Bronze table (the list's own parents when Bronze is
   empty), evenly spread: three quarters among the parents the list shows children for, the rest
   among those it shows none for, and ask each one the per-parent way;
3. compare per parent: keys only per-parent (the list hides them), keys only in the list (the
   per-parent endpoint hides them), same key with different content. A mismatch is asked once
   more before it counts (the instance may have changed between the two reads).

A job's list is *trusted* when every sampled parent matches; then ``source: list`` in
config/jobs.yaml is safe for it. The check costs one full read of the list plus one call per
sampled parent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from common.config import Settings
from producers import parents as parents_mod
from producers.cc_client import CCClient
from producers.engines import run_async
from producers.fetch import Fetch, fetch_pages
from producers.keys import key_builder, path_getter
from producers.pages import Page
from producers.paging import Stream, paginator_for
from producers.planner import endpoint_renderer
from schemas.jobs import Job

ParentKey = tuple[str, ...]


@dataclass
class ParentDiff:
    params: dict[str, str]
    only_per_parent: list[str] = field(default_factory=list)
    only_in_list: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.only_per_parent or self.only_in_list or self.different)


@dataclass
class SourceVerdict:
    """The outcome for one job."""

    job_id: int
    name: str
    list_endpoint: str
    per_parent_endpoint: str
    trusted: bool = False
    parents_sampled: int = 0
    records_compared: int = 0
    list_records: int = 0
    list_parents: int = 0
    list_calls: int = 0
    #: parents in Bronze (what one per-parent pass costs, in calls)
    parent_rows: int = 0
    records_without_parent: int = 0
    differences: list[ParentDiff] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "differences"}
        d["differences"] = [{"params": x.params, "only_per_parent": x.only_per_parent[:5],
                             "only_in_list": x.only_in_list[:5], "different": x.different[:5]}
                            for x in self.differences[:10]]
        return d


def _canonical(rec: Any) -> bytes:
    return orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)


def read_list(job: Job, client: CCClient, concurrency: int) -> tuple[dict[ParentKey, dict[str, bytes]], int, int]:
    """The whole list, grouped by parent: parent values -> key -> canonical record; also the
    records naming no parent and the calls it took."""
    assert job.list_source is not None
    listing = job.model_copy(update={"source": "list"})
    names = job.placeholders or list(job.parameters)
    getters = [path_getter(job.list_source.parameters[n]) for n in names]
    keyfn = key_builder(job.primary_key, "")
    grouped: dict[ParentKey, dict[str, bytes]] = {}
    orphans = 0

    def on_page(i: int, url: str, page: Page) -> None:
        nonlocal orphans
        for rec in page.records:
            values = tuple(g(rec, None) for g in getters)
            if any(v is None for v in values):
                orphans += 1
                continue
            params = dict(zip(names, values, strict=True))
            key = keyfn(rec, params)
            if key is not None:
                grouped.setdefault(values, {})[key] = _canonical(rec)  # type: ignore[arg-type]  # None filtered above

    failures: list[BaseException] = []
    stop = threading.Event()
    fetch = Fetch([Stream(0, listing.fetch_endpoint)], paginator_for(listing, client.urls), policy=client.policy,
                  limiter=client.limiter, stop=stop, on_page=on_page, on_done=lambda i: None,
                  on_fail=lambda i, e: failures.append(e))
    calls0 = client.api_calls
    run_async(fetch, client, concurrency=concurrency, stop=stop)
    if failures:
        raise failures[0]
    return grouped, orphans, client.api_calls - calls0


def read_parent(job: Job, client: CCClient, params: dict[str, str],
                render: Callable[[dict[str, Any]], str]) -> dict[str, bytes]:
    """One parent, the per-parent way: key -> canonical record."""
    keyfn = key_builder(job.primary_key, "")
    out: dict[str, bytes] = {}
    perparent = job.model_copy(update={"source": "parents"})
    for _, page in fetch_pages(client, paginator_for(perparent, client.urls), Stream(0, render(params), params)):
        for rec in page.records:
            key = keyfn(rec, params)
            if key is not None:
                out[key] = _canonical(rec)
    return out


def _diff(params: dict[str, str], per_parent: dict[str, bytes], listed: dict[str, bytes]) -> ParentDiff:
    d = ParentDiff(params)
    d.only_per_parent = sorted(set(per_parent) - set(listed))
    d.only_in_list = sorted(set(listed) - set(per_parent))
    d.different = sorted(k for k in set(per_parent) & set(listed) if per_parent[k] != listed[k])
    return d


def _sample(values: list[ParentKey], n: int) -> list[ParentKey]:
    """``n`` parents spread evenly over the (sorted) list: deterministic, so a re-check asks the same."""
    if len(values) <= n:
        return values
    step = len(values) / n
    return [values[int(i * step)] for i in range(n)]


def check_job(conn: psycopg.Connection, job: Job, settings: Settings, *, sample: int = 20,
              concurrency: int = 8) -> SourceVerdict:
    """Compare the job's list source with its per-parent endpoint on the live API (module docstring)."""
    assert job.list_source is not None
    v = SourceVerdict(job.id, job.name, job.list_source.endpoint, job.endpoint)
    names = job.placeholders or list(job.parameters)
    client = CCClient.from_settings(settings, pool_size=concurrency + 2)
    try:
        grouped, v.records_without_parent, v.list_calls = read_list(job, client, concurrency)
        v.list_records = sum(len(g) for g in grouped.values())
        v.list_parents = len(grouped)
        try:
            bronze = parents_mod.load_parent_values(conn, job)
        except parents_mod.ParentsError:
            bronze = []
        v.parent_rows = len(bronze)
        # most of the sample from parents the list shows children for (their records are compared),
        # the rest from parents it shows none for (would the per-parent endpoint show some?)
        known = set(bronze) if bronze else set(grouped)
        with_children = sorted(k for k in grouped if k in known)
        without = sorted(known - set(grouped))
        first = min(len(with_children), max(1, (sample * 3) // 4))
        chosen = _sample(with_children, first) + _sample(without, sample - first)
        render = endpoint_renderer(job)
        for values in chosen:
            params = dict(zip(names, values, strict=True))
            d = _diff(params, read_parent(job, client, params, render), grouped.get(values, {}))
            if not d.equal:  # the instance may have changed between the two reads: ask both again
                again, _, _ = read_list(job, client, concurrency)
                d = _diff(params, read_parent(job, client, params, render), again.get(values, {}))
            v.parents_sampled += 1
            v.records_compared += len(grouped.get(values, {}))
            if not d.equal:
                v.differences.append(d)
        v.trusted = v.parents_sampled > 0 and not v.differences and v.records_without_parent == 0
    except Exception as e:  # noqa: BLE001 - reported as the job's verdict, the other jobs are still checked
        v.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        client.close()
    return v


def check_sources(conn: psycopg.Connection, jobs: list[Job], settings: Settings, *, sample: int = 20,
                  progress: Callable[[Job], None] | None = None) -> list[SourceVerdict]:
    out = []
    for job in jobs:
        if job.list_source is None:
            continue
        if progress is not None:
            progress(job)
        out.append(check_job(conn, job, settings, sample=sample))
    return out
