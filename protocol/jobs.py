"""Jobs (the gateway's asynchronous completions): their status, their metadata, and the final status a
finished request gives its job. One owner: the scheduler and the gateway both decide it here."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import PROTOCOL_VERSION, FinishReason
from protocol.sampling import SamplingParams


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PREEMPTED = "preempted"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


TERMINAL_JOB_STATUSES = tuple(s.value for s in JobStatus if s.terminal)


class JobMeta(BaseModel):
    """The immutable part of a job, written once by the gateway that accepted it."""

    model_config = ConfigDict(extra="forbid")

    version: int = PROTOCOL_VERSION
    job_id: str
    kind: Literal["completion", "chat"]
    model: str
    body: dict[str, Any] = Field(description="the completion or chat request body as accepted")
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    include_stop_str_in_output: bool = False
    want_logprobs: bool = False
    created_at: float
    ttl_s: int


def final_job_status(error: str | None, finish_reasons: Sequence[FinishReason | str | None]) -> JobStatus:
    """The status a job ends in once its request finished: failed on an error, cancelled when every
    sequence was aborted, else completed."""
    if error:
        return JobStatus.FAILED
    if finish_reasons and all(r == FinishReason.ABORT for r in finish_reasons):
        return JobStatus.CANCELLED
    return JobStatus.COMPLETED
