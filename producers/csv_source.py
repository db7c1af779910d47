"""CSV files as a source (seed 004: the clinical-trials CSV pipeline), through the same
extract -> topic -> load path as the API jobs.

A CSV source is declared under ``sources:`` in config/jobs.yaml (``schemas.jobs.FileSource``):
a local path or an http(s) URL, the key column, the delimiter. Each row is published as a JSON
object ``{column: text}`` keyed by ``<instance>:<key column value>``; a row whose key cell is empty
gets a null key, so the loader dead-letters it with the reason instead of dropping it silently.

Values stay text, exactly as in the file (no type guessing in Bronze); a row with more cells than
the header keeps the extras under ``_extra`` so nothing is lost; a short row has ``null`` for the
missing cells. The file is read as UTF-8 (a BOM is accepted). A URL is fetched without the CC API
key: it is a different server.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from producers.pages import Page
from schemas.jobs import Job

PAGE_ROWS = 1000
REPO = Path(__file__).resolve().parent.parent


class CsvSourceError(ValueError):
    """The CSV cannot be read or lacks its key column; the message names the file and the fix."""


def source_location(job: Job) -> str:
    return str(job.source_options.get("path") or job.endpoint)


def _resolve_local(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO / p  # config paths are relative to the repository, wherever the command runs
    return alt if alt.exists() else p


def _open_text(location: str, timeout: float) -> io.TextIOBase:
    if location.startswith(("http://", "https://")):
        import requests

        try:
            r = requests.get(location, timeout=(min(10.0, timeout), timeout))
        except requests.RequestException as e:
            raise CsvSourceError(f"cannot download CSV {location}: {type(e).__name__}") from None
        if r.status_code != 200:
            raise CsvSourceError(f"cannot download CSV {location}: HTTP {r.status_code}")
        return io.StringIO(r.content.decode("utf-8-sig"), newline="")
    p = _resolve_local(location)
    try:
        return open(p, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise CsvSourceError(f"CSV file {location} does not exist (paths are relative to the repository "
                             "or the working directory)") from None
    except OSError as e:
        raise CsvSourceError(f"cannot read CSV file {location}: {e.strerror}") from None


def read_pages(job: Job, timeout: float = 30.0, page_rows: int = PAGE_ROWS) -> Iterator[Page]:
    """Yield the file's rows as pages of dicts (``page_rows`` per page)."""
    location = source_location(job)
    delimiter = str(job.source_options.get("delimiter", ","))
    key_column = job.primary_key[0]
    f = _open_text(location, timeout)
    try:
        reader = csv.DictReader(f, delimiter=delimiter, restkey="_extra")
        try:
            header = reader.fieldnames
        except UnicodeDecodeError:
            raise CsvSourceError(f"CSV {location} is not UTF-8 text") from None
        except csv.Error as e:
            raise CsvSourceError(f"CSV {location} is malformed: {e}") from None
        if not header:
            raise CsvSourceError(f"CSV {location} is empty (no header row)")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise CsvSourceError(f"CSV {location} repeats header columns {dupes}: rename them")
        if key_column not in header:
            raise CsvSourceError(f"CSV {location} has no key column {key_column!r} (columns: {', '.join(header)}); "
                                 f"fix key_column in config/jobs.yaml or the delimiter ({delimiter!r})")
        rows: list[dict[str, Any]] = []
        try:
            for row in reader:
                rows.append(row)
                if len(rows) >= page_rows:
                    yield Page(rows, shape="array")
                    rows = []
        except csv.Error as e:
            raise CsvSourceError(f"CSV {location} line {reader.line_num}: {e}") from None
        except UnicodeDecodeError:
            raise CsvSourceError(f"CSV {location} near line {reader.line_num} is not UTF-8 text") from None
        if rows:
            yield Page(rows, shape="array")
    finally:
        f.close()


def describe(job: Job) -> list[str]:
    """Dry-run lines: where the file is, its columns and row count (local files only)."""
    location = source_location(job)
    out = [f"source: CSV {location} (delimiter {job.source_options.get('delimiter', ',')!r}, "
           f"key column {job.primary_key[0]!r})"]
    if location.startswith(("http://", "https://")):
        out.append("  (a URL: downloaded at run time)")
        return out
    try:
        pages = list(read_pages(job))
    except CsvSourceError as e:
        out.append(f"  problem: {e}")
        return out
    n = sum(len(p.records) for p in pages)
    cols = list(pages[0].records[0]) if n else []
    out.append(f"  {n} rows, columns: {', '.join(cols)}")
    return out
