"""``trialsync report``: one self-contained HTML page about one orchestration (a run of jobs).

Why a page: operators would rather look than read log lines. The page needs nothing but a browser:
no script, no CDN, no font download; charts are inline SVG drawn here. It shows the job timeline by
dependency level (a Gantt: each attempt's extraction, then the wait until its records were loaded),
records and API calls per job, extract-to-load lag, failures and skips with their reasons, and the
quality-check results of the transforms that ran during the orchestration.

Data: ``etl.dw_orchestrations``, the orchestration's ``etl.dw_etl_runs`` rows (every attempt and every
skipped job carries its id), ``etl.dw_quality_results`` since it started, and the job DAG (levels)
from the catalog. Every text that comes from the database is HTML-escaped.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, SupportsInt

import psycopg

STATUS_COLOURS = {"success": "#2e7d32", "partial": "#f9a825", "failed": "#c62828", "skipped": "#9e9e9e",
                  "running": "#1565c0", "cancelled": "#6d4c41", "pending": "#90a4ae"}
LOAD_COLOUR = "#80cbc4"


class ReportError(RuntimeError):
    """No such orchestration, or none yet: the message says what to run."""


@dataclass
class JobRow:
    job_id: int
    name: str
    level: int
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.attempts[-1]

    def total(self, key: str) -> int:
        return sum(int(a.get(key) or 0) for a in self.attempts)

    @property
    def lag_seconds(self) -> float | None:
        """Extract-to-load lag of the last attempt that loaded: extraction finished -> all records in staging."""
        for a in reversed(self.attempts):
            if a["run_status"] in ("success", "partial") and a["completed_at"] and a["load_completed_at"]:
                return max(0.0, (a["load_completed_at"] - a["completed_at"]).total_seconds())
        return None


@dataclass
class ReportData:
    orchestration: dict[str, Any]
    jobs: list[JobRow]
    quality: list[dict[str, Any]]
    generated_at: datetime


# -- data -----------------------------------------------------------------------------------------

def find_orchestration(conn: psycopg.Connection, run: str | None) -> dict[str, Any]:
    """The orchestration ``run`` (its uuid or a unique prefix of it), or the latest one."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    if run:
        rows = cur.execute("SELECT * FROM etl.dw_orchestrations WHERE id::text LIKE %s ORDER BY started_at DESC LIMIT 2",
                           (run.lower().strip() + "%",)).fetchall()
        if not rows:
            raise ReportError(f"no orchestration {run!r}: `trialsync history` lists runs; omit --run for the latest")
        if len(rows) > 1:
            raise ReportError(f"{run!r} matches several orchestrations: give more of the id")
        return rows[0]
    row = cur.execute("SELECT * FROM etl.dw_orchestrations ORDER BY started_at DESC LIMIT 1").fetchone()
    if row is None:
        raise ReportError("no orchestration yet: run `trialsync run --all` (or `trialsync demo`) first")
    return row


def gather(conn: psycopg.Connection, run: str | None = None) -> ReportData:
    orch = find_orchestration(conn, run)
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    runs = cur.execute(
        """SELECT r.id, r.job_id, coalesce(j.name, 'job ' || r.job_id) AS name, r.run_status, r.mode, r.attempt,
                  r.records_extracted, r.records_published, r.records_loaded, r.records_rejected, r.api_calls,
                  r.parents_total, r.parents_failed, r.error_class, r.error_message, r.started_at, r.completed_at,
                  r.load_completed_at, r.duration_seconds
             FROM etl.dw_etl_runs r LEFT JOIN etl.dw_etl_jobs j ON j.id = r.job_id
            WHERE r.orchestration_id = %s ORDER BY r.job_id, r.attempt, r.id""", (orch["id"],)).fetchall()
    end = orch["completed_at"] or datetime.now(orch["started_at"].tzinfo)
    quality = cur.execute(
        """SELECT DISTINCT ON (check_name) check_name, target_table, severity, status, failed_rows, checked_at,
                  error_message
             FROM etl.dw_quality_results WHERE checked_at >= %s
            ORDER BY check_name, checked_at DESC, id DESC""", (orch["started_at"],)).fetchall()
    levels = _levels(sorted({r["job_id"] for r in runs}))
    jobs: dict[int, JobRow] = {}
    for r in runs:
        jobs.setdefault(r["job_id"], JobRow(r["job_id"], r["name"], levels.get(r["job_id"], 0))).attempts.append(r)
    ordered = sorted(jobs.values(), key=lambda j: (j.level, _start(j) or end, j.job_id))
    return ReportData(orchestration=orch, jobs=ordered, quality=quality, generated_at=datetime.now(end.tzinfo))


def _start(j: JobRow) -> datetime | None:
    starts = [a["started_at"] for a in j.attempts if a["started_at"] and a["run_status"] != "skipped"]
    return min(starts) if starts else None


def _levels(job_ids: list[int]) -> dict[int, int]:
    """Dependency level of each job within this run (0 = no parent in the run); {} if the catalog fails."""
    try:
        from common.catalog import load_catalog
        from orchestrator.dag import build_plan

        cat = load_catalog()
        plan = build_plan(cat, [j for j in job_ids if j in cat.jobs])
        return {j: i for i, level in enumerate(plan.levels) for j in level}
    except Exception:  # noqa: BLE001 - a report without levels beats no report
        return {}


# -- rendering ------------------------------------------------------------------------------------

def esc(v: object) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def fmt_int(n: SupportsInt | None) -> str:
    return f"{int(n or 0):,}"


def fmt_s(sec: float | None) -> str:
    if sec is None:
        return "-"
    if sec < 60:
        return f"{sec:.1f} s"
    m, s = divmod(int(round(sec)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def gantt_svg(data: ReportData) -> str:
    """Each job a row, grouped by dependency level; per attempt a bar for extraction (status colour)
    and a pale bar from the end of extraction until its records were loaded."""
    orch = data.orchestration
    t0 = orch["started_at"]
    ends = [a[k] for j in data.jobs for a in j.attempts for k in ("completed_at", "load_completed_at") if a[k]]
    t_end = max([orch["completed_at"] or t0, *ends])
    span = max((t_end - t0).total_seconds(), 1.0)
    label_w, width, row_h, top = 260, 1100, 18, 30
    plot_w = width - label_w - 20
    rows: list[str] = []
    y = top
    level = None
    for j in data.jobs:
        if j.level != level:
            level = j.level
            rows.append(f'<text x="4" y="{y + 13}" class="lvl">level {level}</text>')
            y += row_h
        rows.append(f'<text x="14" y="{y + 13}" class="lbl">{esc(j.job_id)} · {esc(j.name[:32])}</text>')
        for a in j.attempts:
            if a["run_status"] == "skipped" or not a["started_at"]:
                rows.append(f'<text x="{label_w}" y="{y + 13}" class="skip">{esc(_skip_text(a["error_message"]))}</text>')
                continue
            x1 = label_w + plot_w * (a["started_at"] - t0).total_seconds() / span
            done = a["completed_at"] or t_end
            x2 = label_w + plot_w * (done - t0).total_seconds() / span
            colour = STATUS_COLOURS.get(a["run_status"], "#607d8b")
            tip = (f'job {a["job_id"]} attempt {a["attempt"]}: {a["run_status"]}, {fmt_int(a["records_extracted"])} records, '
                   f'{fmt_s((done - a["started_at"]).total_seconds())}')
            rows.append(f'<rect x="{x1:.1f}" y="{y + 3}" width="{max(x2 - x1, 1.5):.1f}" height="{row_h - 6}" '
                        f'fill="{colour}"><title>{esc(tip)}</title></rect>')
            if (a["run_status"] in ("success", "partial") and a["completed_at"] and a["load_completed_at"]
                    and a["load_completed_at"] > a["completed_at"]):
                x3 = label_w + plot_w * (a["load_completed_at"] - t0).total_seconds() / span
                lag = (a["load_completed_at"] - a["completed_at"]).total_seconds()
                rows.append(f'<rect x="{x2:.1f}" y="{y + 6}" width="{max(x3 - x2, 1):.1f}" height="{row_h - 12}" '
                            f'fill="{LOAD_COLOUR}"><title>{esc(f"loaded {fmt_s(lag)} after extraction")}</title></rect>')
        y += row_h
    ticks = []
    for i in range(6):
        x = label_w + plot_w * i / 5
        ticks.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{y}" class="grid"/>'
                     f'<text x="{x:.1f}" y="{top - 10}" class="tick" text-anchor="middle">{esc(fmt_s(span * i / 5))}</text>')
    height = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="job timeline" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}">{"".join(ticks)}{"".join(rows)}</svg>')


def _skip_text(msg: str | None) -> str:
    text = (msg or "").strip()
    text = text if text.lower().startswith("skipped") else f"skipped: {text}"
    return text if len(text) <= 110 else text[:109] + "…"


def bars_svg(items: list[tuple[str, list[tuple[str, int, str]]]], title: str) -> str:
    """Horizontal grouped bars: per item a few (label, value, colour) bars on one shared scale."""
    if not items:
        return ""
    label_w, width, bar_h = 260, 1100, 9
    plot_w = width - label_w - 110
    vmax = max([v for _, bars in items for _, v, _ in bars] + [1])
    out: list[str] = []
    y = 10
    for name, bars in items:
        out.append(f'<text x="4" y="{y + bar_h * len(bars) / 2 + 4:.0f}" class="lbl">{esc(name[:40])}</text>')
        for label, v, colour in bars:
            w = plot_w * v / vmax
            out.append(f'<rect x="{label_w}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar_h}" fill="{colour}">'
                       f'<title>{esc(f"{name}: {fmt_int(v)} {label}")}</title></rect>'
                       f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 1}" class="val">{fmt_int(v)}</text>')
            y += bar_h + 1
        y += 6
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{esc(title)}" width="{width}" '
            f'height="{y + 4}" viewBox="0 0 {width} {y + 4}">{"".join(out)}</svg>')


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#212121;max-width:1160px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555} .cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:20px} table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #eee;padding:3px 6px;text-align:left} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.st{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-size:12px}
svg text{font:11px system-ui,sans-serif;fill:#333} svg .lvl{font-weight:bold;fill:#000} svg .skip{fill:#757575;font-style:italic}
svg .grid{stroke:#e0e0e0} svg .tick{fill:#757575} .legend span{margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-2px}
.empty{color:#757575;font-style:italic}
"""


QUALITY_COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "error": "#6d4c41"}


def _pill(text: object, colour: str) -> str:
    return f'<span class="st" style="background:{colour}">{esc(text)}</span>'


def _status(s: object) -> str:
    return _pill(s, STATUS_COLOURS.get(str(s), "#607d8b"))


def render(data: ReportData) -> str:
    o = data.orchestration
    jobs = data.jobs
    calls = sum(j.total("api_calls") for j in jobs)
    lags = [j.lag_seconds for j in jobs if j.lag_seconds is not None]
    cards = [("status", _status(o["status"])), ("jobs", f'{len(jobs)}'),
             ("succeeded", fmt_int(o["jobs_succeeded"])), ("partial", fmt_int(o["jobs_partial"])),
             ("failed", fmt_int(o["jobs_failed"])), ("skipped", fmt_int(o["jobs_skipped"])),
             ("records extracted", fmt_int(o["records_extracted"])), ("records loaded", fmt_int(o["records_loaded"])),
             ("API calls", fmt_int(calls)), ("duration", esc(fmt_s(float(o["duration_seconds"]))
                                                               if o["duration_seconds"] is not None else "running")),
             ("max extract→load lag", esc(fmt_s(max(lags)) if lags else "-"))]
    legend = "".join(f'<span><i style="background:{c}"></i>{esc(k)}</span>' for k, c in STATUS_COLOURS.items()
                     if k in {"success", "partial", "failed", "running"})
    legend += f'<span><i style="background:{LOAD_COLOUR}"></i>waiting until loaded</span>'
    volume = [(f"{j.job_id} · {j.name}", [("records extracted", j.total("records_extracted"), "#1565c0"),
                                           ("records loaded", j.total("records_loaded"), "#2e7d32")])
              for j in jobs if j.total("records_extracted") or j.total("records_loaded")]
    api = [(f"{j.job_id} · {j.name}", [("API calls", j.total("api_calls"), "#6a1b9a")])
           for j in sorted(jobs, key=lambda j: -j.total("api_calls")) if j.total("api_calls")]
    table_rows = []
    for j in jobs:
        f = j.final
        table_rows.append(
            f'<tr><td class="n">{j.level}</td><td class="n">{j.job_id}</td><td>{esc(j.name)}</td><td>{_status(f["run_status"])}</td>'
            f'<td class="n">{len([a for a in j.attempts if a["run_status"] != "skipped"])}</td>'
            f'<td class="n">{fmt_int(j.total("records_extracted"))}</td><td class="n">{fmt_int(j.total("records_loaded"))}</td>'
            f'<td class="n">{fmt_int(j.total("records_rejected"))}</td><td class="n">{fmt_int(j.total("api_calls"))}</td>'
            f'<td class="n">{esc(fmt_s(sum(float(a["duration_seconds"] or 0) for a in j.attempts)))}</td>'
            f'<td class="n">{esc(fmt_s(j.lag_seconds))}</td></tr>')
    problems = [a for j in jobs for a in j.attempts if a["run_status"] in ("failed", "partial", "skipped", "cancelled")]
    prob_rows = "".join(
        f'<tr><td class="n">{a["job_id"]}</td><td>{esc(a["name"])}</td><td class="n">{a["attempt"]}</td>'
        f'<td>{_status(a["run_status"])}</td><td>{esc(a["error_class"] or "")}</td><td>{esc(a["error_message"] or "")}</td></tr>'
        for a in problems)
    q_rows = "".join(
        f'<tr><td>{esc(q["check_name"])}</td><td>{esc(q["target_table"])}</td><td>{esc(q["severity"])}</td>'
        f'<td>{_pill(q["status"], QUALITY_COLOURS.get(q["status"], "#607d8b"))}</td>'
        f'<td class="n">{fmt_int(q["failed_rows"])}</td><td>{esc(q["error_message"] or "")}</td></tr>'
        for q in data.quality)
    started = o["started_at"].strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>TrialSync run {esc(str(o["id"])[:8])} -- {esc(o["status"])}</title>
<style>{CSS}</style></head>
<body>
<h1>TrialSync run report</h1>
<div class="meta">orchestration <code>{esc(o["id"])}</code> · trigger {esc(o["trigger"])} · mode {esc(o["mode"])} ·
started {esc(started)} · report generated {esc(data.generated_at.strftime("%Y-%m-%d %H:%M:%S %Z"))}</div>
<div class="cards">{"".join(f'<div class="card">{esc(k)}<b>{v}</b></div>' for k, v in cards)}</div>
{f'<p><b>error:</b> {esc(o["error_message"])}</p>' if o.get("error_message") else ""}
<h2 id="timeline">Job timeline by dependency level</h2>
<div class="legend">{legend}</div>
{gantt_svg(data) if jobs else '<p class="empty">no job ran</p>'}
<h2 id="jobs">Jobs</h2>
<table><thead><tr><th class="n">level</th><th class="n">job</th><th>name</th><th>status</th><th class="n">attempts</th>
<th class="n">extracted</th><th class="n">loaded</th><th class="n">rejected</th><th class="n">API calls</th>
<th class="n">extract time</th><th class="n">extract→load lag</th></tr></thead>
<tbody>{"".join(table_rows)}</tbody></table>
<h2 id="records">Records per job</h2>
<div class="legend"><span><i style="background:#1565c0"></i>extracted</span><span><i style="background:#2e7d32"></i>loaded</span></div>
{bars_svg(volume, "records per job") or '<p class="empty">no records</p>'}
<h2 id="api">API calls per job</h2>
{bars_svg(api, "API calls per job") or '<p class="empty">no API calls</p>'}
<h2 id="problems">Failures and skips</h2>
{f'<table><thead><tr><th class="n">job</th><th>name</th><th class="n">attempt</th><th>status</th><th>error</th><th>reason</th></tr></thead><tbody>{prob_rows}</tbody></table>' if problems else '<p class="empty">none: every attempt succeeded</p>'}
<h2 id="quality">Quality checks</h2>
{f'<table><thead><tr><th>check</th><th>table</th><th>severity</th><th>result</th><th class="n">failed rows</th><th>error</th></tr></thead><tbody>{q_rows}</tbody></table>' if data.quality else '<p class="empty">no quality check ran since this orchestration started</p>'}
</body></html>
"""


def write_report(conn: psycopg.Connection, out: Path | None, run: str | None = None,
                 state_dir: Path | None = None) -> tuple[Path, ReportData]:
    """Gather, render and write; the default path is ``<state_dir>/reports/run-<id8>.html``."""
    data = gather(conn, run)
    if out is None:
        base = state_dir or Path(".trialsync")
        out = base / "reports" / f"run-{str(data.orchestration['id'])[:8]}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(render(data), encoding="utf-8")
    tmp.replace(out)
    return out, data
