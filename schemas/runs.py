"""What one extraction run reports, typed: the contract between the extractor and whoever started it.

The orchestrator runs each extraction in a child process (``orchestrator/launcher.py``); these
models are what crosses that boundary over a pipe, so both sides agree on field names and types
instead of reading ``dict.get("records_extracted")`` and hoping. The CLI prints the same models
(``trialsync extract --json``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RunResult(BaseModel):
    """The outcome of one run of one job (``producers.extractor.run_job``)."""

    model_config = ConfigDict(extra="forbid")

    job_id: int
    #: success | partial | failed | dry-run
    status: str
    run_id: int | None = None
    mode: str = "full"
    topic: str | None = None
    records_extracted: int = 0
    records_published: int = 0
    records_missing_key: int = 0
    api_calls: int = 0
    pages: int = 0
    parents_total: int | None = None
    parents_done: int | None = None
    parents_failed: int | None = None
    #: parameter dicts of the parents that failed (``trialsync retry`` redoes exactly these)
    failed_parents: list[dict[str, str]] = Field(default_factory=list)
    records_per_partition: dict[int, int] = Field(default_factory=dict)
    end_offsets: dict[int, int] = Field(default_factory=dict)
    watermark_from: datetime | None = None
    watermark_to: datetime | None = None
    error: str | None = None
    error_class: str | None = None
    duration_s: float = 0.0
    #: seconds from the first request to the last delivery report (the run's steady-state work)
    fetch_s: float = 0.0
    warnings: list[str] = Field(default_factory=list)
    #: dry runs: the requests the run would make, one line each
    plan: list[str] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps as ISO strings)."""
        return self.model_dump(mode="json")


class RunProgress(BaseModel):
    """Live counters of a running extraction (a few times a second)."""

    model_config = ConfigDict(extra="forbid")

    records: int = 0
    pages: int = 0
    api_calls: int = 0
    parents_total: int | None = None
    parents_done: int | None = None
    parents_failed: int | None = None


class LaunchFailure(BaseModel):
    """An attempt that produced no :class:`RunResult`: there was no run to record (bad configuration,
    a disabled job, the database unreachable) or the extraction process was interrupted."""

    model_config = ConfigDict(extra="forbid")

    error_class: str
    message: str
    #: whether the orchestrator should record a failed run row for it
    record: bool = True


#: what an extraction child sends over its pipe
ChildMessage = tuple[Literal["progress"], RunProgress] | tuple[Literal["result"], RunResult] \
    | tuple[Literal["error"], LaunchFailure]
