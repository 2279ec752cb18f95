"""Redis Streams of the fleet: key names, the envelopes that travel on them, and the JSON codec.

Every stream entry has exactly one field, ``m``, holding the JSON of one versioned pydantic model
(``protocol.messages`` or the envelopes below). Nothing is pickled.

Streams and keys (``PREFIX`` = ``pf:`` unless PAGEDFLEET_REDIS_PREFIX overrides it):

=========================  ==========================================================  ===================
key                        entries / value                                             readers
=========================  ==========================================================  ===================
``pf:requests``            ``RequestCommand`` (add a GenerationRequest, or abort one)  scheduler, group ``scheduler``
``pf:plan:{worker_id}``    ``StepPlan``                                                that worker, group ``worker``
``pf:results``             ``StepResult``                                              scheduler, group ``scheduler``
``pf:out:{request_id}``    ``RequestOutputDelta``                                      gateways (plain XREAD)
``pf:dead``                ``DeadLetter`` (entries delivered too many times)           humans, tests
``pf:workers``             hash worker_id -> ``WorkerRegistration``                    scheduler, gateway
``pf:hb:{worker_id}``      the worker's incarnation, with a TTL (its heartbeat)        scheduler
``pf:job:{job_id}``        hash: ``meta`` (JobMeta), ``status``, ``result``, ``error`` gateways, scheduler
``pf:jobs:finished``       zset job_id -> finish time (for TTL expiry)                 housekeeping
``pf:active``              hash request_id -> ``ActiveRequest`` (recovery)             scheduler
=========================  ==========================================================  ===================
"""

from __future__ import annotations

import os
import time
from enum import Enum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import PROTOCOL_VERSION, GenerationRequest, WorkerInfo
from protocol.sampling import SamplingParams

PREFIX = os.environ.get("PAGEDFLEET_REDIS_PREFIX", "pf:")

REQUESTS = PREFIX + "requests"
RESULTS = PREFIX + "results"
DEAD_LETTER = PREFIX + "dead"
WORKERS = PREFIX + "workers"
ACTIVE = PREFIX + "active"
JOBS_FINISHED = PREFIX + "jobs:finished"
SCHEDULER_INFO = PREFIX + "scheduler"

SCHEDULER_GROUP = "scheduler"
WORKER_GROUP = "worker"
FIELD = "m"
VERSION_FIELD = "v"  # the protocol version travels beside the body, which omits default values

# Streams are trimmed to about this many entries, never past an unacknowledged one.
REQUESTS_MAXLEN = 10_000
RESULTS_MAXLEN = 10_000
PLAN_MAXLEN = 1_000
DEAD_MAXLEN = 10_000


def plan_stream(worker_id: str) -> str:
    return f"{PREFIX}plan:{worker_id}"


def output_stream(request_id: str) -> str:
    return f"{PREFIX}out:{request_id}"


def heartbeat_key(worker_id: str) -> str:
    return f"{PREFIX}hb:{worker_id}"


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


# ----------------------------------------------------------------------------------------------
# envelopes


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestCommand(_Msg):
    """An entry of the requests stream: add a request, or abort one."""

    version: int = PROTOCOL_VERSION
    op: Literal["add", "abort"]
    request_id: str
    request: GenerationRequest | None = None
    job_id: str | None = Field(None, description="set when the request belongs to a job (status updates)")
    deliveries: int = Field(0, description="times an earlier copy of this entry was delivered (reclaim)")
    reason: str | None = None


class WorkerRegistration(_Msg):
    """What a worker writes into ``pf:workers`` when it starts."""

    version: int = PROTOCOL_VERSION
    info: WorkerInfo
    incarnation: str = Field(description="new at every start: a restarted worker is a new worker")
    metrics_url: str | None = Field(None, description="host:port of its Prometheus /metrics")
    host: str = ""
    pid: int = 0
    registered_at: float = Field(default_factory=time.time)


class ActiveRequest(_Msg):
    """A request the scheduler accepted and has not finished (kept in ``pf:active`` for recovery)."""

    version: int = PROTOCOL_VERSION
    request: GenerationRequest
    job_id: str | None = None
    worker_id: str | None = None
    resumes: int = 0


class DeadLetter(_Msg):
    version: int = PROTOCOL_VERSION
    stream: str
    group: str
    entry_id: str
    deliveries: int
    payload: str
    reason: str
    at: float = Field(default_factory=time.time)


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


class JobMeta(_Msg):
    """The immutable part of a job, written once by the gateway that accepted it."""

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


# ----------------------------------------------------------------------------------------------
# codec

M = TypeVar("M", bound=BaseModel)


def encode(msg: BaseModel) -> dict[str, str]:
    """Fields of a stream entry for one message.

    Default values are left out of the body (a decode step's plan is mostly empty lists and False),
    so the version goes in its own field and is checked on decode.
    """
    return {FIELD: msg.model_dump_json(exclude_defaults=True),
            VERSION_FIELD: str(getattr(msg, "version", PROTOCOL_VERSION))}


def decode(fields: dict, model: type[M]) -> M:
    """The message of one stream entry (raises pydantic.ValidationError / KeyError on bad entries)."""
    raw = fields.get(FIELD) if FIELD in fields else fields.get(FIELD.encode())
    if raw is None:
        raise KeyError(f"stream entry has no {FIELD!r} field")
    if isinstance(raw, bytes):
        raw = raw.decode()
    version = fields.get(VERSION_FIELD, fields.get(VERSION_FIELD.encode()))
    if version is not None and int(version) != PROTOCOL_VERSION:
        raise ValueError(f"protocol version {int(version)} is not ours ({PROTOCOL_VERSION})")
    return model.model_validate_json(raw)


def raw_payload(fields: dict) -> str:
    raw = fields.get(FIELD) if FIELD in fields else fields.get(FIELD.encode(), b"")
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


# ----------------------------------------------------------------------------------------------
# Lua: job status changes that never leave a terminal state

SET_JOB_STATUS_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
if cur == 'completed' or cur == 'failed' or cur == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
if ARGV[1] == 'completed' or ARGV[1] == 'failed' or ARGV[1] == 'cancelled' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
end
return 1
"""


def set_job_status(r, job_id: str, status: JobStatus | str, error: str | None = None):
    """Set a job's status unless it is already terminal (sync or asyncio redis client: returns its reply)."""
    status = JobStatus(status).value
    return r.eval(SET_JOB_STATUS_LUA, 2, job_key(job_id), JOBS_FINISHED, status, repr(time.time()), error or "", job_id)


# ----------------------------------------------------------------------------------------------
# bounded streams without dropping unacknowledged entries


def _id_tuple(entry_id) -> tuple[int, int]:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = str(entry_id).partition("-")
    return int(ms), int(seq or 0)


def safe_trim_minid(r, stream: str, maxlen: int) -> str | None:
    """Trim ``stream`` (sync client) to about ``maxlen`` entries, never past an entry that some consumer
    group has not yet been delivered or has not acknowledged. Returns the MINID used, or None."""
    try:
        length = r.xlen(stream)
    except Exception:
        return None
    if length <= maxlen:
        return None
    # the id of the entry that keeps the newest `maxlen` entries
    tail = r.xrevrange(stream, "+", "-", count=maxlen)
    if not tail:
        return None
    floor = _id_tuple(tail[-1][0])
    try:
        groups = r.xinfo_groups(stream)
    except Exception:
        groups = []
    for g in groups:
        name = g["name"]
        last = g.get("last-delivered-id")
        if last is not None:
            # entries after last-delivered are unread: keep them (their id > last)
            lt = _id_tuple(last)
            nxt = (lt[0], lt[1] + 1)
            floor = min(floor, nxt)
        if int(g.get("pending", 0)):
            summary = r.xpending(stream, name)
            if summary and summary.get("min"):
                floor = min(floor, _id_tuple(summary["min"]))
    minid = f"{floor[0]}-{floor[1]}"
    r.xtrim(stream, minid=minid, approximate=False)
    return minid
