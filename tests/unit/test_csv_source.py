"""The CSV source: the shipped clinical-trials file, key column checks, ragged rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.csv_source import CsvSourceError, describe, read_pages
from producers.keys import key_builder
from schemas.jobs import FileSource, JobCatalog, OverridesFile

REPO = Path(__file__).resolve().parents[2]


def csv_job(path: str, key: str = "nct_number", delimiter: str = ","):
    ov = OverridesFile(sources=[FileSource(id=1001, name="Clinical Trials CSV", path=path,
                                           target_table="raw_clinical_trials_staging", key_column=key,
                                           delimiter=delimiter)])
    return JobCatalog.load().with_overrides(ov).get(1001)


def test_shipped_clinical_trials_csv() -> None:
    job = csv_job("data/clinical_trials.csv")
    rows = [r for p in read_pages(job) for r in p.records]
    assert len(rows) == 50
    keys = [key_builder(job.primary_key, "cc1")(r, None) for r in rows]
    assert len(set(keys)) == 50 and all(k and k.startswith("cc1:NCT") for k in keys)
    assert {"title", "status", "phase", "sponsor", "enrollment", "start_date"} <= set(rows[0])
    assert all(len(r["nct_number"]) == 11 for r in rows)
    assert "50 rows" in " ".join(describe(job))


def test_pages_of_at_most_n_rows(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("id;name\n" + "".join(f"{i};n{i}\n" for i in range(25)), encoding="utf-8")
    pages = list(read_pages(csv_job(str(f), key="id", delimiter=";"), page_rows=10))
    assert [len(p.records) for p in pages] == [10, 10, 5]
    assert pages[0].records[0] == {"id": "0", "name": "n0"}


def test_missing_key_column_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(CsvSourceError, match="no key column 'nct_number'.*columns: a, b"):
        list(read_pages(csv_job(str(f))))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CsvSourceError, match="does not exist"):
        list(read_pages(csv_job(str(tmp_path / "nope.csv"))))


def test_ragged_rows_lose_nothing_and_bom_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_bytes("\ufeffnct_number,title\nNCT01,a,EXTRA\nNCT02\n,blank key\n".encode())
    rows = [r for p in read_pages(csv_job(str(f))) for r in p.records]
    assert rows[0] == {"nct_number": "NCT01", "title": "a", "_extra": ["EXTRA"]}
    assert rows[1] == {"nct_number": "NCT02", "title": None}
    assert key_builder(("nct_number",), "cc1")(rows[2], None) is None
