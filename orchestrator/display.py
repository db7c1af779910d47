"""Live progress of an orchestration on a terminal, and the end-of-run summary table.

The live view is redrawn by the runner's loop (``on_tick``), never by a thread of its own, so it
always shows a consistent state: a header with overall counts and the record rate, a bar of jobs
done, the jobs extracting / waiting for a lock / backing off / waiting for their load, and the
last jobs that finished. 72 rows would not fit a terminal; the summary after the run has them all.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from orchestrator.runner import (
    BACKOFF,
    DONE,
    LOADING,
    LOCKWAIT,
    RUNNING,
    WAITING,
    OrchestrationResult,
    Runner,
)
from orchestrator.status import fmt_duration, fmt_int, styled

ACTIVE_ROWS = 12
RECENT_ROWS = 6
PHASE_LABEL = {RUNNING: "[cyan]extracting[/]", LOADING: "[blue]loading[/]", BACKOFF: "[yellow]retry wait[/]",
               LOCKWAIT: "[magenta]lock wait[/]"}


class LiveDisplay:
    """``with LiveDisplay(console, title) as d: run_plan(..., on_tick=d.tick)``."""

    def __init__(self, console: Console, title: str, refresh_per_second: float = 4.0):
        self.console = console
        self.title = title
        self.min_interval = 1.0 / refresh_per_second
        self._last = 0.0
        self.live = Live(console=console, auto_refresh=False, transient=False, redirect_stderr=False,
                         redirect_stdout=False)
        self.t0 = time.monotonic()
        self._rate_window: list[tuple[float, int]] = []

    def __enter__(self) -> LiveDisplay:
        self.live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.live.__exit__(exc_type, exc, tb)

    def tick(self, runner: Runner) -> None:
        now = time.monotonic()
        if now - self._last < self.min_interval and not all(s.phase == DONE for s in runner.states.values()):
            return
        self._last = now
        self.live.update(self.render(runner), refresh=True)

    def _rate(self, records: int) -> float:
        now = time.monotonic()
        self._rate_window.append((now, records))
        while len(self._rate_window) > 2 and now - self._rate_window[0][0] > 10:
            self._rate_window.pop(0)
        t0, r0 = self._rate_window[0]
        return (records - r0) / (now - t0) if now - t0 > 0.5 else 0.0

    def render(self, runner: Runner) -> Group:
        states = list(runner.states.values())
        total = len(states)
        done = [s for s in states if s.phase == DONE]
        by_status: dict[str, int] = {}
        for s in done:
            by_status[s.status or "?"] = by_status.get(s.status or "?", 0) + 1
        extracted = sum(s.records_extracted + s.live.records for s in states)
        loaded = sum(s.records_loaded for s in states)
        calls = sum(s.api_calls + s.live.api_calls for s in states)
        rate = self._rate(extracted)
        counts = runner.counts()
        head = Text.from_markup(
            f"[bold]{self.title}[/]  {fmt_duration(time.monotonic() - self.t0)}  ·  "
            f"{len(done)}/{total} jobs done ({', '.join(f'{styled(k)} {v}' for k, v in sorted(by_status.items())) or '-'})"
            f"  ·  {counts[RUNNING]} extracting, {counts[LOADING]} loading, {counts[WAITING]} waiting"
            + (f", {counts[BACKOFF]} retrying" if counts[BACKOFF] else "")
            + (f", {counts[LOCKWAIT]} locked elsewhere" if counts[LOCKWAIT] else "")
            + f"\nrecords extracted {fmt_int(extracted)} · loaded {fmt_int(loaded)} · API calls {fmt_int(calls)}"
            f" · {fmt_int(int(rate))} records/s")
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=max(total, 1), completed=len(done), width=60),
                    f"{100 * len(done) // max(total, 1)}%")
        active = [s for s in states if s.phase in (RUNNING, LOCKWAIT, BACKOFF, LOADING)]
        active.sort(key=lambda s: (s.phase != RUNNING, s.started_at or 0))
        t = Table(expand=False, box=None, padding=(0, 1), show_edge=False)
        for col, kw in (("job", {"justify": "right"}), ("name", {"max_width": 28, "overflow": "ellipsis"}),
                        ("state", {}), ("try", {"justify": "right"}), ("parents", {"justify": "right"}),
                        ("records", {"justify": "right"}), ("loaded", {"justify": "right"}),
                        ("time", {"justify": "right"})):
            t.add_column(col, **kw)
        for s in active[:ACTIVE_ROWS]:
            parents = "-"
            if s.parents_total is not None:
                parents = f"{fmt_int(s.parents_done or 0)}/{fmt_int(s.parents_total)}"
                if s.parents_failed:
                    parents += f" [red]({s.parents_failed}✗)[/]"
            t.add_row(str(s.job_id), s.name, PHASE_LABEL.get(s.phase, s.phase), str(s.attempt or "-"), parents,
                      fmt_int(s.records_extracted + s.live.records), fmt_int(s.records_loaded),
                      fmt_duration(s.duration))
        if len(active) > ACTIVE_ROWS:
            t.add_row("", f"[dim]… {len(active) - ACTIVE_ROWS} more[/]", "", "", "", "", "", "")
        recent = sorted(done, key=lambda s: s.finished_at or 0, reverse=True)[:RECENT_ROWS]
        for s in recent:
            t.add_row(str(s.job_id), f"[dim]{s.name}[/]", styled(s.status), str(s.attempt or "-"),
                      "-" if s.parents_total is None else fmt_int(s.parents_total),
                      fmt_int(s.records_extracted), fmt_int(s.records_loaded), fmt_duration(s.duration))
        return Group(head, bar, t)


def summary_table(result: OrchestrationResult, title: str | None = None, width: int = 200) -> Table | None:
    """Every job of the run: status, records extracted/loaded, duration; totals in the footer.

    On a wide console (>= 140 columns) API calls and each job's note (error, skip reason) are
    columns; otherwise :func:`summary_notes` prints the notes below the table. Numbers are never
    cut (names shorten instead, :mod:`orchestrator.tables`); None when no table fits ``width`` --
    the caller prints :func:`print_result_lines`.
    """
    from orchestrator.tables import Column, fitted_table

    wide = width >= 140
    c = result.counts
    cols = [Column("job", "right"), Column("name", flexible=True, max_width=34, footer="total"),
            Column("status", footer=f"{c['success']}/{len(result.jobs)} ok"), Column("try", "right"),
            Column("extracted", "right", footer=fmt_int(c["records_extracted"])),
            Column("loaded", "right", footer=fmt_int(c["records_loaded"]))]
    if wide:
        cols.append(Column("API calls", "right", footer=fmt_int(c["api_calls"])))
    cols.append(Column("duration", "right", footer=fmt_duration(result.duration)))
    if wide:
        cols.append(Column("note", flexible=True, max_width=60))
    rows = []
    for j in [j for level in result.plan.levels for j in level]:
        s = result.jobs[j]
        cells = [str(j), s.name, styled(s.status), str(s.attempt or "-"), fmt_int(s.records_extracted),
                 fmt_int(s.records_loaded)]
        if wide:
            cells.append(fmt_int(s.api_calls))
        cells.append(fmt_duration(s.duration))
        if wide:
            from rich.markup import escape

            cells.append(escape(_note(s)[:240]))
        rows.append(cells)
    return fitted_table(cols, rows, width, show_footer=True,
                        title=title or f"run {result.orchestration_id[:8]}: {result.status} in "
                                       f"{fmt_duration(result.duration)}")


def _note(s: Any) -> str:
    note = s.error or s.reason or ""
    if s.status in ("success", "partial") and s.loaded is False and not note:
        note = "not loaded yet"
    return note


def summary_notes(result: OrchestrationResult) -> list[str]:
    """Errors and skip reasons, one line per job that has one (for narrow consoles)."""
    return [f"job {j} ({result.jobs[j].name}): {_note(result.jobs[j])}"
            for level in result.plan.levels for j in level if _note(result.jobs[j])]


def print_result_lines(result: OrchestrationResult, console: Console) -> None:
    """Non-terminal output: one line per job, then the totals."""
    for level in result.plan.levels:
        for j in level:
            s = result.jobs[j]
            console.print(f"job {j} ({s.name}): {s.status} -- {s.records_extracted} extracted, {s.records_loaded} loaded"
                          f", {fmt_duration(s.duration)}" + (f" -- {s.error or s.reason}" if (s.error or s.reason) else ""),
                          highlight=False, soft_wrap=True, markup=False)
    c = result.counts
    console.print(f"orchestration {result.orchestration_id}: {result.status} in {fmt_duration(result.duration)}; "
                  f"{c['success']} success, {c['partial']} partial, {c['failed']} failed, {c['skipped']} skipped; "
                  f"{c['records_extracted']} records extracted, {c['records_loaded']} loaded", highlight=False)

