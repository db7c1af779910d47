"""Machine facts and the Markdown rendering of a ``bench/run.py`` result.

Why machine facts in every result: numbers from a 2-core laptop shared with test suites and from a
quiet 16-core server are different facts; a result file must say where it was measured (CPU model,
cores, RAM, load average before/after, Python, PostgreSQL, git sha, date) to be comparable.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_facts(pg_version: str | None = None) -> dict[str, Any]:
    import sys

    facts: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu_model": cpu_model(), "cores": os.cpu_count(), "ram_gib": ram_gib(),
        "os": f"{platform.system()} {platform.release()}", "python": sys.version.split()[0],
        "postgresql": pg_version, "git_sha": git_sha(), "load_avg_before": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import dlt

        facts["dlt"] = dlt.__version__
    except ImportError:
        facts["dlt"] = None
    return facts


# -- Markdown --------------------------------------------------------------------------------------

def _n(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int | float):
        return f"{v:,.{digits}f}" if digits else f"{round(v):,}"
    return str(v)


def _mem(procs: dict[str, Any]) -> str:
    parts = []
    for kind, p in procs.items():
        if kind != "machine":
            parts.append(f"{kind} {p['peak_total_mib']:.0f}"
                         + (f" ({p['max_processes']} proc)" if p["max_processes"] > 1 else ""))
    return "; ".join(parts)


def _cpu(procs: dict[str, Any]) -> str:
    parts = [f"{kind} {p['cpu_s']:.0f}" for kind, p in procs.items() if kind != "machine"]
    m = procs.get("machine")
    if m:
        ours = sum(p["cpu_s"] for kind, p in procs.items() if kind != "machine")
        parts.append(f"other processes {max(0.0, m['cpu_s'] - ours):.0f} (of {m['cpu_s']:.0f} CPU s in "
                     f"{m['wall_s']:.0f} s on {m['cores']} cores)")
    return "; ".join(parts)


def to_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# TrialSync benchmark {m.get('date', '')}", "",
             *(["**Partial result**: the run was still going (or was stopped) when this was written.", ""]
               if res.get("partial") else []),
             f"`python -m bench.run {' '.join(res['argv'])}` -- {_n(res.get('wall_s'))} s in all.", "",
             "| machine | |", "|---|---|"]
    for k in ("cpu_model", "cores", "ram_gib", "os", "python", "postgresql", "dlt", "git_sha", "load_avg_before",
              "load_avg_after"):
        lines.append(f"| {k} | {m.get(k)} |")
    cfg = res.get("config", {})
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), ""]

    if res.get("targets"):
        lines += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for name, t in res["targets"].items():
            lines.append(f"| {name} | {_n(t['value'], 2)} | {t['goal']} | {_n(t['met'])} |")
        lines.append("")

    if res.get("e2e"):
        lines += ["## End-to-end full load (`trialsync run --all --full`, loader + transformer services)", "",
                  "| scale | jobs ok | records loaded | staging rows | API calls | first request -> last commit (s) "
                  "| records/s | CLI wall (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for scale, e in res["e2e"].items():
            lines.append(f"| {scale} | {e['runs_succeeded']}/{e['jobs']} | {_n(e['records_loaded'])} | "
                         f"{_n(e['staging_rows'])} | {_n(e['api_calls'])} | {_n(e['first_request_to_last_commit_s'], 1)} | "
                         f"**{_n(e['records_per_s'])}** | {_n(e['cli_wall_s'], 1)} |")
        lines += ["", "| scale | peak memory MiB per process type (PSS of the tree) | CPU seconds per process type |",
                  "|---|---|---|"]
        for scale, e in res["e2e"].items():
            lines.append(f"| {scale} | {_mem(e['procs'])} | {_cpu(e['procs'])} |")
        lines.append("")

    if res.get("limit"):
        lines += ["## Limit: the loader vs plain COPY of the same records (largest table, empty tables)", "",
                  "| scale | table | rows | plain COPY rows/s | loader records/s | ratio (goal >= 0.6) "
                  "| CPU µs per row: COPY's PostgreSQL / loader's PostgreSQL + loader process |",
                  "|---|---|---|---|---|---|---|"]
        for scale, x in res["limit"].items():
            pp = (x["loader"].get("per_process") or [{}])[0]
            lines.append(f"| {scale} | {x['table']} | {_n(x['copy']['rows'])} | {_n(x['copy']['rows_per_s'])} | "
                         f"{_n(x['loader']['records_per_s'])} | **{_n(x['ratio'], 2)}** | "
                         f"{_n(x['copy'].get('postgres_cpu_us_per_row'), 1)} / "
                         f"{_n(pp.get('postgres_backend_cpu_us_per_record'), 1)} + "
                         f"{_n(pp.get('loader_process_cpu_us_per_record'), 1)} |")
        lines.append("")

    if res.get("peer"):
        lines += ["## Peer: dlt `rest_api` -> `postgres` vs TrialSync on the non-parameterized jobs", "",
                  "TrialSync warm = topics exist (every night after the first); cold = a new installation "
                  "(topics created during the run, found by the running loader within its 5 s metadata refresh).",
                  "", "| scale | jobs | records (TrialSync / dlt) | TrialSync warm s | warm records/s | cold records/s "
                  "| dlt s | dlt records/s | ratio warm (goal >= 3) | ratio cold |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for scale, p in res["peer"].items():
            t, c, d = p["trialsync"], p["trialsync_cold"], p["dlt"]
            lines.append(f"| {scale} | {p['jobs']} | {_n(t['records_loaded'])} / {_n(d['records'])} | "
                         f"{_n(t['first_request_to_last_commit_s'], 1)} | {_n(t['records_per_s'])} | "
                         f"{_n(c['records_per_s'])} | {_n(d['wall_s'], 1)} | {_n(d['records_per_s'])} | "
                         f"**{_n(p['ratio'], 2)}** | {_n(p['ratio_cold'], 2)} |")
        lines += ["", "| scale | side | CPU seconds per process type |", "|---|---|---|"]
        for scale, p in res["peer"].items():
            lines.append(f"| {scale} | TrialSync warm | {_cpu(p['trialsync']['procs'])} |")
            lines.append(f"| {scale} | dlt | {_cpu(p['dlt']['procs'])} |")
        lines.append("")

    if res.get("paged"):
        lines += ["## Paged tables: TrialSync vs dlt (jobs 2, 3, 9, 25), empty and populated, A B A B", "",
                  "`trialsync run -j 2 -j 3 -j 9 -j 25 --full --wait-load` with a loader service running vs dlt "
                  "`rest_api` -> `postgres` (merge on the primary key, 4 extract threads, 2 normalize workers); "
                  "seconds from command start to exit (CLI start-up included); populated = the same command again "
                  "into the tables it filled. Ratio = dlt seconds / TrialSync seconds.", "",
                  "| scale | round | tables | records (TrialSync / dlt) | TrialSync s | dlt s | ratio (goal >= 3.5) "
                  "| load avg before |", "|---|---|---|---|---|---|---|---|"]
        for scale, x in res["paged"].items():
            for i, rd in enumerate(x["rounds"], 1):
                for state in ("empty", "populated"):
                    t, d = rd[f"trialsync_{state}"], rd[f"dlt_{state}"]
                    lines.append(f"| {scale} | {i} | {state} | {_n(t['records_loaded'])} / {_n(d['records'])} | "
                                 f"{_n(t['cli_wall_s'], 1)} | {_n(d['process_wall_s'], 1)} | "
                                 f"**{_n(rd[f'ratio_{state}'], 2)}** | {rd['loadavg_before'][0]} |")
        lines += ["", "| scale | round | side | CPU seconds per process type |", "|---|---|---|---|"]
        for scale, x in res["paged"].items():
            for i, rd in enumerate(x["rounds"], 1):
                for state in ("empty", "populated"):
                    lines.append(f"| {scale} | {i} | TrialSync {state} | {_cpu(rd[f'trialsync_{state}']['procs'])} |")
                    lines.append(f"| {scale} | {i} | dlt {state} | {_cpu(rd[f'dlt_{state}']['procs'])} |")
        lines.append("")

    if res.get("loader"):
        lines += ["## Loader vs plain COPY of the same records (patient visits of the paged run), A B A B", "",
                  "| scale | round | rows | plain COPY rows/s | first load records/s (ratio, goal >= 0.7) | "
                  "re-load, 1 % changed, records/s (ratio, goal >= 0.6) | loader CPU µs/record first / re-load | "
                  "PostgreSQL CPU µs/row: COPY / first / re-load |", "|---|---|---|---|---|---|---|---|"]
        for scale, x in res["loader"].items():
            for i, rd in enumerate(x["rounds"], 1):
                f, r = rd["first_load"], rd["reload_1pct_changed"]
                fp, rp = (f.get("per_process") or [{}])[0], (r.get("per_process") or [{}])[0]
                lines.append(
                    f"| {scale} | {i} | {_n(rd['copy']['rows'])} | {_n(rd['copy']['rows_per_s'])} | "
                    f"{_n(f['records_per_s'])} (**{_n(f.get('ratio_to_copy'), 2)}**) | "
                    f"{_n(r['records_per_s'])} (**{_n(r.get('ratio_to_copy'), 2)}**) | "
                    f"{_n(fp.get('loader_process_cpu_us_per_record'), 1)} / {_n(rp.get('loader_process_cpu_us_per_record'), 1)} | "
                    f"{_n(rd['copy'].get('postgres_cpu_us_per_row'), 1)} / "
                    f"{_n(fp.get('postgres_backend_cpu_us_per_record'), 1)} / "
                    f"{_n(rp.get('postgres_backend_cpu_us_per_record'), 1)} |")
        lines.append("")

    if res.get("incremental"):
        lines += ["## Incremental run after changing 1% of the records", "",
                  "Fan-out policy `all` asks every parent again; `changed` asks parents changed since the last "
                  "complete run plus a 1/30 sweep slice, after a change where the simulated CC also moved the "
                  "parents' modifiedDate (docs/extraction.md). Each run is reconciled against the simulator; "
                  "'embedded refs' are rows whose own timestamp is current but which embed a preview of another "
                  "record that changed (a renamed arm inside a subject): no timestamp filter sees those, a full run "
                  "or the `changed` policy's unfiltered sweep does.", "",
                  "| scale | fan-out | records changed | full s | incremental s | ratio (goal <= 0.1) | full API calls "
                  "| incremental API calls | records extracted | missing / dup / stale (of which only embedded refs) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for scale, x in res["incremental"].items():
            for policy, p in x["policies"].items():
                r = p.get("reconciliation") or {}
                lines.append(f"| {scale} | {policy} | {_n(p['records_changed'])} | {_n(x['full_s'], 1)} | "
                             f"{_n(p['incremental_s'], 1)} | **{_n(p['time_ratio'], 3)}** | {_n(x['full_api_calls'])} | "
                             f"{_n(p['api_calls'])} | {_n(p['records_extracted'])} | "
                             f"{r.get('missing')} / {r.get('duplicated')} / {r.get('stale')} ({r.get('stale_refs')}) |")
        lines.append("")

    f = res.get("fanout")
    if f:
        lines += [f"## Fan-out: job {f['job']} ({f['name']}), {f['endpoint']}", "",
                  "| latency | in flight (C) | parents | requests/s | reference | share (goal >= 0.8) |",
                  "|---|---|---|---|---|---|"]
        for r in f["runs"]:
            lines.append(f"| {r['latency_ms']} ms | {r['workers']} | {_n(r['parents'])} | {_n(r['requests_per_s'])} | "
                         f"{r['reference']} = {_n(r['reference_requests_per_s'])} | **{_n(r['share'], 2)}** |")
        lines.append("")

    s = res.get("scaling")
    if s:
        lines += ["## Scaling", "", "| what | 1 | 2 | speed-up |", "|---|---|---|---|"]
        for x in s.values():
            lines.append(f"| {x['what']} | {_n(x['one'])} {x['unit']} | {_n(x['two'])} {x['unit']} | "
                         f"**{_n(x['speedup'], 2)}x** |")
        lines.append("")
    if res.get("errors"):
        lines += ["## Errors", ""] + [f"* {k}: {v}" for k, v in res["errors"].items()] + [""]
    return "\n".join(lines)
