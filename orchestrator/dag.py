"""The dependency DAG of a run: which jobs, which of them wait for which, in what order to start.

The graph itself comes from :class:`schemas.jobs.JobCatalog`: a job's parents are the jobs that
fill its ``parameter_source_table`` plus its ``depends_on`` (config/jobs.yaml). The catalog
validates the whole graph when it loads (a cycle or an unknown dependency stops every command
with one line naming it); this module narrows it to the jobs one run executes and decides the
start order among jobs that are ready at the same time.

Why not run level by level: a level barrier makes every job wait for the slowest job of the level
before it. The runner instead starts a job the moment all of *its* parents are loaded; levels are
kept only for display and for ordering.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from schemas.jobs import CatalogError, Job, JobCatalog


class SelectionError(CatalogError):
    """What to run was not stated correctly (none or several of --all/--category/--job, a disabled job)."""


@dataclass(frozen=True)
class Plan:
    """The jobs of one run and the edges between them (only edges inside the run)."""

    catalog: JobCatalog
    job_ids: tuple[int, ...]
    levels: tuple[tuple[int, ...], ...]
    parents: Mapping[int, tuple[int, ...]]
    children: Mapping[int, tuple[int, ...]]
    #: parents a job has in the catalog that are not part of this run: not waited for, their
    #: current staging rows are used as they are (``run --job 10`` without ``--with-deps``)
    external_parents: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.job_ids)

    def job(self, job_id: int) -> Job:
        return self.catalog.get(job_id)

    def descendants(self, job_id: int) -> set[int]:
        out: set[int] = set()
        stack = list(self.children.get(job_id, ()))
        while stack:
            j = stack.pop()
            if j not in out:
                out.add(j)
                stack.extend(self.children.get(j, ()))
        return out

    def critical_path(self, costs: Mapping[int, float] | None = None, default: float = 1.0) -> dict[int, float]:
        """Per job: its expected cost plus the most expensive chain of expected costs below it.

        Starting the job with the longest remaining chain first (the classic critical-path /
        longest-processing-time rule) keeps the long fan-out chains (studies -> subjects ->
        patient visits) and the big fan-out jobs from starting last and running alone at the end.
        Costs are API calls: from the job's previous run, or for a parameterized job about to
        start, the number of rows in its parameter source table; ``default`` otherwise.
        """
        costs = costs or {}
        weight: dict[int, float] = {}
        for level in reversed(self.levels):
            for j in level:
                below = max((weight[c] for c in self.children.get(j, ())), default=0.0)
                weight[j] = max(float(costs.get(j, default)), 0.0) + below
        return weight

    def start_order(self, costs: Mapping[int, float] | None = None) -> list[int]:
        """Preference among jobs ready at the same moment: operator priority (lower first), then
        the most expensive remaining critical path, then the job id (deterministic)."""
        cp = self.critical_path(costs)
        return sorted(self.job_ids, key=lambda j: (self.job(j).priority, -cp[j], j))


def select_jobs(catalog: JobCatalog, *, all_jobs: bool = False, category: str | None = None,
                job_refs: Sequence[int | str] = (), with_deps: bool = False) -> list[int]:
    """The job ids one run executes (``--all`` | ``--category C`` | ``--job ID`` [``--with-deps``]).

    ``--all`` and ``--category`` take the active, valid jobs; a job named with ``--job`` must be
    active and valid (the error says how to enable it). ``--with-deps`` adds every ancestor.
    """
    chosen = sum(bool(x) for x in (all_jobs, category, job_refs))
    if chosen != 1:
        raise SelectionError("choose what to run: --all, --category C, or --job ID (repeatable)")
    if all_jobs:
        ids = [j.id for j in catalog.runnable]
    elif category:
        ids = [j.id for j in catalog.by_category(category) if j.runnable]
        if not ids:
            raise SelectionError(f"category {category!r} has no active jobs")
    else:
        ids = []
        for ref in job_refs:
            job = catalog.resolve(ref)
            _require_runnable(job)
            if job.id not in ids:
                ids.append(job.id)
    if with_deps:
        ids = catalog.with_ancestors(ids)
        for j in ids:
            _require_runnable(catalog.get(j), why="it is a dependency of the selected jobs")
    return sorted(ids)


def _require_runnable(job: Job, why: str = "") -> None:
    suffix = f" ({why})" if why else ""
    if not job.is_valid:
        raise SelectionError(f"job {job.id} ({job.name}) cannot run{suffix}: {job.invalid_reason}")
    if not job.is_active:
        raise SelectionError(
            f"job {job.id} ({job.name}) is disabled{suffix}: enable it in config/jobs.yaml "
            f"(jobs: {{{job.id}: {{enabled: true}}}}) and run `trialsync jobs sync`")


def build_plan(catalog: JobCatalog, job_ids: Iterable[int]) -> Plan:
    """Narrow the catalog's DAG to ``job_ids``; raises CatalogError naming a cycle or unknown job."""
    ids = sorted(set(job_ids))
    for j in ids:
        catalog.get(j)  # unknown id -> CatalogError naming it
    for j in ids:
        for d in catalog.get(j).depends_on:
            if d not in catalog.jobs:
                raise CatalogError(f"job {j} ({catalog.get(j).name}) depends on unknown job {d}")
    levels = catalog.topological_order(ids)  # cycle -> CatalogError "dependency cycle: a -> b -> a"
    wanted = set(ids)
    parents: dict[int, tuple[int, ...]] = {}
    external: dict[int, tuple[int, ...]] = {}
    children: dict[int, list[int]] = {j: [] for j in ids}
    for j in ids:
        ps = catalog.parents(catalog.get(j))
        parents[j] = tuple(p for p in ps if p in wanted)
        ext = tuple(p for p in ps if p not in wanted)
        if ext:
            external[j] = ext
        for p in parents[j]:
            children[p].append(j)
    return Plan(catalog=catalog, job_ids=tuple(ids), levels=tuple(tuple(level) for level in levels),
                parents=parents, children={k: tuple(v) for k, v in children.items()}, external_parents=external)

