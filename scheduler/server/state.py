"""What the scheduler service keeps per request and per worker (in memory; ``pf:active`` has the rest)."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from protocol import GenerationRequest, StepPlan, StepResult
from protocol import streams as S
from protocol.jobs import JobStatus
from scheduler.scheduler import Scheduler
from scheduler.server.config import SchedulerSettings
from scheduler.server.metrics import SchedulerMetrics
from scheduler.server.stats_log import Throughput


class WorkerDead(Exception):
    pass


@dataclass
class ReqState:
    request: GenerationRequest
    job_id: str | None = None
    gateway: str | None = None  # the gateway instance its client is on (interactive requests; jobs: None)
    worker_id: str | None = None
    generated: dict[int, list[int]] = field(default_factory=dict)
    finished_idx: set[int] = field(default_factory=set)
    resumes: int = 0
    status: JobStatus = JobStatus.QUEUED  # its job's status as last written (jobs only)
    aborted: bool = False
    started: bool = False
    received_at: float = field(default_factory=time.time)  # when this scheduler read it (wall clock)
    queue_observed: bool = False  # its queue time (arrival to first StepPlan) is in the histogram
    publishing: asyncio.Future | None = None  # the Redis writes of its latest deltas, while still running

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def record_tokens(self, index: int, token_ids: list[int], finished: bool) -> None:
        """Record one sequence's new tokens (a resume recomputes from them)."""
        if token_ids:
            self.generated.setdefault(index, []).extend(token_ids)
        if finished:
            self.finished_idx.add(index)

    def active_record(self) -> S.ActiveRequest:
        """What ``pf:active`` keeps of it, for a restarted scheduler."""
        return S.ActiveRequest(request=self.request, job_id=self.job_id, gateway=self.gateway, worker_id=self.worker_id,
                               resumes=self.resumes)


@dataclass
class InFlightStep:
    """A StepPlan sent to a worker, waiting for its StepResult (matched by the plan's wire step id)."""

    plan: StepPlan
    wire_step: int  # the id on the wire, unique across scheduler restarts
    internal_step: int  # the Scheduler's own step id, which update() expects back
    result: asyncio.Future[tuple[StepResult, str]]  # (the StepResult, its entry id on pf:results)
    schedule_s: float  # time schedule() took
    sent_at: float  # perf_counter() when it was sent


class WorkerHandle:
    """A live worker: its registration, its Scheduler (block ledger), its requests and its steps in flight."""

    def __init__(self, reg: S.WorkerRegistration, sched: Scheduler, max_in_flight: int = 1):
        self.reg = reg
        # plans this worker may have in flight at once: 1 (plan, wait, update), or 1 + lookahead pipelined
        self.max_in_flight = max_in_flight
        self.wid = reg.info.worker_id
        self.sched = sched
        self.requests: set[str] = set()
        self.wake = asyncio.Event()
        # wire step ids are unique across scheduler restarts, so a stale StepResult never matches
        self.step_offset = int(time.time() * 1000) * 1000 + random.randrange(1000)
        self.in_flight: collections.deque[InFlightStep] = collections.deque()  # oldest first
        self.last_result_at = 0.0  # perf_counter() when its last StepResult was taken
        self.dead = False
        self.task: asyncio.Task | None = None
        self.steps = 0
        # the Redis writes of this worker's last step (its deltas and the StepResult ack), running while the
        # worker executes the next step; awaited before the next step's writes, so they stay in order
        self.publishing: asyncio.Future | None = None

    def next_wire_step(self) -> int:
        wire_step = self.step_offset + self.steps
        self.steps += 1
        return wire_step

    def awaiting(self, wire_step: int) -> InFlightStep | None:
        """The in-flight step a StepResult with this step id answers (None: stale, or already answered)."""
        for step in self.in_flight:
            if step.wire_step == wire_step:
                return None if step.result.done() else step
        return None

    def fail_in_flight(self, exc: BaseException) -> None:
        for step in self.in_flight:
            if not step.result.done():
                step.result.set_exception(exc)
                step.result.exception()  # retrieved: the loop awaiting it may be cancelled already


class ServiceState:
    """What every part of the service shares: the settings, the Redis client, the metrics, the live
    workers, the requests it tracks and the ones waiting for a worker."""

    def __init__(self, settings: SchedulerSettings, metrics: SchedulerMetrics | None = None,
                 freeze_pools: bool = False):
        self.settings = settings
        # the scheduler process's own (`python -m scheduler.service`): each worker's block pools, once built,
        # leave the full garbage collections (protocol/heap.py); a service inside a test's process does not
        self.freeze_pools = freeze_pools
        self.r: aioredis.Redis | None = None  # connected in SchedulerService.run
        self.metrics = metrics
        self.workers: dict[str, WorkerHandle] = {}
        self.requests: dict[str, ReqState] = {}
        self.orphans: list[ReqState] = []  # unfinished requests waiting for a live worker
        self.stopping = asyncio.Event()
        self.have_worker = asyncio.Event()
        self.expected_workers: set[str] = set()  # workers of a previous scheduler, expected back
        self.started_at = time.time()
        self.throughput = Throughput()  # tokens per step, for the periodic throughput line

    def forget(self, st: ReqState) -> None:
        self.requests.pop(st.request_id, None)
        if st.worker_id and st.worker_id in self.workers:
            self.workers[st.worker_id].requests.discard(st.request_id)
