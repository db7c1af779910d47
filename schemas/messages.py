"""Messages on the control and state topics.

The control topic is the contract between extraction and loading/transform: ``run_finished``
names, per partition, the last offset the run published, so "are this run's records in?" is a
comparison of committed consumer-group offsets against those numbers -- no new channel, no
ListOffsets call (unreliable on the embedded broker).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

RunStatus = Literal["running", "success", "partial", "failed", "skipped", "cancelled"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


class RunStarted(_Msg):
    type: Literal["run_started"] = "run_started"
    run_id: int
    job_id: int
    target_table: str
    topic: str
    instance_id: str
    mode: Literal["full", "incremental", "retry", "replay"] = "full"
    started_at: datetime = Field(default_factory=utcnow)
    parents_total: int | None = None


class RunFinished(_Msg):
    type: Literal["run_finished"] = "run_finished"
    run_id: int
    job_id: int
    target_table: str
    topic: str
    instance_id: str
    status: RunStatus
    records_published: int = 0
    #: partition -> number of records this run published to it
    records_per_partition: dict[int, int] = Field(default_factory=dict)
    #: partition -> offset of the last record this run published to it (the loader is done with the
    #: run when its committed offset, i.e. next offset to read, is > this for every partition)
    end_offsets: dict[int, int] = Field(default_factory=dict)
    error: str | None = None
    finished_at: datetime = Field(default_factory=utcnow)
    watermark: datetime | None = None


ControlMessage = Annotated[RunStarted | RunFinished, Field(discriminator="type")]
_control = TypeAdapter(ControlMessage)


def parse_control(raw: bytes | str) -> RunStarted | RunFinished:
    """Parse a control-topic value; raises pydantic.ValidationError when it is not one."""
    return _control.validate_json(raw)


class Watermark(_Msg):
    """Incremental state of one job (and parent, for parameterized jobs), on the compacted topic."""

    type: Literal["watermark"] = "watermark"
    job_id: int
    parent_key: str = ""
    field: str
    value: datetime
    run_id: int
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def key(self) -> bytes:
        return f"{self.job_id}:{self.parent_key}".encode()


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)
