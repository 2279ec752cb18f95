"""Redis Streams of the fleet: key names, the envelopes that travel on them, and the JSON codec.

Every stream entry holds the JSON of one versioned message (a pydantic model or a msgspec Struct of
``protocol.messages``, or an envelope below) in the field ``m`` and its protocol version in ``v``. Nothing
is pickled. The Redis operations on these keys live with the services that run them
(``scheduler/server/``, ``gpu_worker/service.py``, ``gateway/fleet.py``; the job-status transition that
all of them run is ``protocol/job_store.py``).

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
``pf:gw:{instance}``       a gateway process's lease (a TTL it refreshes)              scheduler (orphans)
``pf:job:{job_id}``        hash: ``meta`` (JobMeta), ``status``, ``result``, ``error`` gateways, scheduler
``pf:jobs:finished``       zset job_id -> finish time (for TTL expiry)                 housekeeping
``pf:active``              hash request_id -> ``ActiveRequest`` (recovery)             scheduler
``pf:housekeeping:stats`` hash ``reclaimed:{stream}:{group}``, ``dead:{stream}`` totals scheduler (metrics)
=========================  ==========================================================  ===================
"""

from __future__ import annotations

import os
import time
from typing import Literal, TypeVar

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from protocol import wire
from protocol.messages import PROTOCOL_VERSION, GenerationRequest, WorkerInfo

PREFIX = os.environ.get("PAGEDFLEET_REDIS_PREFIX", "pf:")

REQUESTS = PREFIX + "requests"
RESULTS = PREFIX + "results"
DEAD_LETTER = PREFIX + "dead"
WORKERS = PREFIX + "workers"
ACTIVE = PREFIX + "active"
JOBS_FINISHED = PREFIX + "jobs:finished"
SCHEDULER_INFO = PREFIX + "scheduler"
HOUSEKEEPING_STATS = PREFIX + "housekeeping:stats"  # hash of totals Celery housekeeping keeps

SCHEDULER_GROUP = "scheduler"
WORKER_GROUP = "worker"
FIELD = "m"
VERSION_FIELD = "v"  # the protocol version travels beside the body, which omits default values

# Streams are trimmed to about this many entries, never past an unacknowledged one.
REQUESTS_MAXLEN = 10_000
RESULTS_MAXLEN = 10_000
PLAN_MAXLEN = 1_000
DEAD_MAXLEN = 10_000

# Lifetimes and delivery bounds every service shares (the settings models take their defaults from here).
OUTPUT_TTL_S = 600  # a finished request's output stream is kept this long
JOB_TTL_S = 24 * 3600  # a finished job (its hash, result and output stream) is kept this long
MAX_DELIVERIES = 5  # a request entry delivered more often (its consumer kept dying on it) is dead-lettered
RECLAIM_IDLE_S = 60.0  # an entry pending this long on one consumer is reclaimed (that consumer died)
# A gateway refreshes its lease key every TTL/4; the scheduler aborts the requests of a gateway whose lease
# stayed missing for a TTL while Redis answered (its clients are gone with it).
GATEWAY_LEASE_TTL_S = float(os.environ.get("PAGEDFLEET_GATEWAY_LEASE_TTL_S", "2.0"))


def plan_stream(worker_id: str) -> str:
    return f"{PREFIX}plan:{worker_id}"


def output_stream(request_id: str) -> str:
    return f"{PREFIX}out:{request_id}"


def heartbeat_key(worker_id: str) -> str:
    return f"{PREFIX}hb:{worker_id}"


def gateway_lease_key(instance: str) -> str:
    return f"{PREFIX}gw:{instance}"


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
    gateway: str | None = Field(None, description="the gateway instance whose client follows it (interactive "
                                                  "requests): aborted when that gateway's lease is gone")
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
    draining: bool = Field(False, description="shutting down: takes no new requests, finishes its running ones")


class ActiveRequest(_Msg):
    """A request the scheduler accepted and has not finished (kept in ``pf:active`` for recovery)."""

    version: int = PROTOCOL_VERSION
    request: GenerationRequest
    job_id: str | None = None
    gateway: str | None = None
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


# ----------------------------------------------------------------------------------------------
# codec

M = TypeVar("M", bound=BaseModel | msgspec.Struct)


def encode(msg: BaseModel | msgspec.Struct) -> dict[str, str]:
    """Fields of a stream entry for one message (a pydantic model or a msgspec Struct).

    Default values are left out of the body (a decode step's plan is mostly empty lists and False; a
    Struct does so when its class sets ``omit_defaults``), so the version goes in its own field and is
    checked on decode.
    """
    if isinstance(msg, msgspec.Struct):
        body = wire.encode(msg).decode()
    else:
        body = msg.model_dump_json(exclude_defaults=True)
    return {FIELD: body, VERSION_FIELD: str(getattr(msg, "version", PROTOCOL_VERSION))}


def decode(fields: dict, model: type[M]) -> M:
    """The message of one stream entry (raises pydantic.ValidationError or msgspec.ValidationError, or
    KeyError, on bad entries)."""
    raw = fields.get(FIELD) if FIELD in fields else fields.get(FIELD.encode())
    if raw is None:
        raise KeyError(f"stream entry has no {FIELD!r} field")
    version = fields.get(VERSION_FIELD, fields.get(VERSION_FIELD.encode()))
    if version is not None and int(version) != PROTOCOL_VERSION:
        raise ValueError(f"protocol version {int(version)} is not ours ({PROTOCOL_VERSION})")
    if issubclass(model, msgspec.Struct):
        return wire.decode(raw, model)
    if isinstance(raw, bytes):
        raw = raw.decode()
    return model.model_validate_json(raw)


def raw_payload(fields: dict) -> str:
    raw = fields.get(FIELD) if FIELD in fields else fields.get(FIELD.encode(), b"")
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
