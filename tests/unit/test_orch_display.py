"""The live view and the summary show what the runner knows."""

from __future__ import annotations

from rich.console import Console

from orchestrator.dag import build_plan
from orchestrator.display import LiveDisplay, summary_notes, summary_table
from orchestrator.retry import RetryPolicy
from orchestrator.runner import Runner, RunnerOptions
from tests.unit.orch_fakes import FakeClock, FakeWorld, Script, small_catalog


def _render(renderable: object, width: int = 160) -> str:
    c = Console(width=width, record=True, force_terminal=False)
    c.print(renderable)
    return c.export_text()


def test_live_view_and_summary() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(1, 1): Script(status="failed", error="HTTP 500 from the API",
                                                      error_class="ServerError")}, default=Script(duration=3))
    runner = Runner(build_plan(small_catalog(), [1, 2, 3, 4, 5]), world, world, RunnerOptions(policy=RetryPolicy(max_retries=0)), clock=clock,
                    wall=clock.wall, wait=clock.wait)
    frames: list[str] = []
    display = LiveDisplay(Console(width=160, force_terminal=False), "test run", refresh_per_second=1000)
    runner.on_tick = lambda r: frames.append(_render(display.render(r)))
    res = runner.run()
    assert any("extracting" in f for f in frames)
    assert "5/5 jobs done" in frames[-1]
    wide = _render(summary_table(res, width=200), 200)
    for name in ("Studies", "Subjects", "Visits", "Docs", "Sites"):
        assert name in wide
    assert "HTTP 500 from the API" in wide and "parent job 1 (Studies) failed" in wide
    narrow = _render(summary_table(res, width=100), 100)
    assert "HTTP 500" not in narrow
    notes = summary_notes(res)
    assert any(n.startswith("job 1 (Studies): HTTP 500") for n in notes)
    assert any(n.startswith("job 2 (Subjects): skipped: parent job 1 (Studies) failed") for n in notes)


def test_summary_never_cuts_a_number_at_80_columns_or_narrower() -> None:
    """At 80 columns (and when piped, which rich treats as 80) the run summary used to print
    ``11,4…`` and headers like ``extr…``; names shorten instead, and below what any table fits the
    caller prints one line per job (None)."""
    import re

    from orchestrator.display import print_result_lines

    clock = FakeClock()
    world = FakeWorld(clock, default=Script(duration=3, records=112_288_411))
    res = Runner(build_plan(small_catalog(), [1, 2, 3, 4, 5]), world, world, RunnerOptions(), clock=clock,
                 wall=clock.wall, wait=clock.wait).run()
    for width in (80, 72):
        table = summary_table(res, width=width)
        assert table is not None, width
        text = _render(table, width)
        assert max(len(line) for line in text.splitlines()) <= width
        assert "112,288,411" in text and "561,442,055" in text  # a job's records and the total
        assert not re.search(r"[\d,]…", text) and "extracted" in text and "loaded" in text, text
    assert summary_table(res, width=40) is None
    c = Console(width=40, record=True, force_terminal=False)
    print_result_lines(res, c)
    assert "112288411 extracted" in c.export_text()
