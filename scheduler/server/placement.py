"""Placement: which live worker a request goes to, and adding it to that worker's Scheduler."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from protocol import FinishReason
from protocol import streams as S
from protocol.jobs import JobStatus
from scheduler.server.state import ReqState, ServiceState, WorkerHandle

log = logging.getLogger("pagedfleet.scheduler")

FinishLocally = Callable[[ReqState, FinishReason, "str | None"], Awaitable[None]]


class Placement:
    def __init__(self, state: ServiceState, finish_locally: FinishLocally):
        self.state = state
        self.finish_locally = finish_locally

    def rank_workers(self, st: ReqState) -> list[WorkerHandle]:
        """Live workers in order of preference for a request: those where it fits in the free blocks
        first; among them the longest prefix-cache hit, unless that worker's queue is more than
        ``max_queue_imbalance`` requests longer than the shortest; then the shortest queue; then the
        most free blocks. Workers whose context is too short for it, and draining ones, are left out."""
        tokens = st.request.prompt_token_ids
        length = len(tokens) + max((len(v) for v in st.generated.values()), default=0)
        rows = []
        for h in self.state.workers.values():
            if h.dead or h.reg.draining or length >= h.reg.info.max_model_len:
                continue
            bs = h.reg.info.block_size
            need = math.ceil((length + 1) / bs) + (st.request.sampling.n - 1)
            free = h.sched.num_free_blocks  # cached-but-evictable blocks included
            hit_blocks = h.sched.cached_prefix_tokens(tokens) // bs
            rows.append((h, free >= need, hit_blocks, h.sched.get_num_unfinished_requests(), free))
        if not rows:
            return []
        min_q = min(r[3] for r in rows)
        cap = self.state.settings.max_queue_imbalance

        def key(r):
            _h, fits, hit, q, free = r
            return (fits, hit if q <= min_q + cap else 0, -q, free)

        return [r[0] for r in sorted(rows, key=key, reverse=True)]

    async def place(self, st: ReqState, resume: bool = False) -> bool:
        """Add the request to the best worker's Scheduler that takes it. Returns False if it failed for good."""
        ranked = self.rank_workers(st)
        if not ranked:
            if all(h.dead or h.reg.draining for h in self.state.workers.values()):  # none, or all draining: wait
                self.state.orphans.append(st)
                return True
            await self.finish_locally(st, FinishReason.ERROR, "prompt does not fit the context of any live worker")
            return False
        error = None
        for h in ranked:
            try:
                if resume and st.generated:
                    # recompute from the prompt and the tokens it already generated
                    generated = [st.generated.get(i, []) for i in range(st.request.sampling.n)]
                    h.sched.resume_request(st.request, generated, sorted(st.finished_idx))
                else:
                    h.sched.add_request(st.request)
            except ValueError as e:
                error = error or str(e)
                continue
            st.worker_id = h.wid
            h.requests.add(st.request_id)
            if st.job_id and st.status != JobStatus.QUEUED:
                st.status = JobStatus.QUEUED
            h.wake.set()
            if resume:
                await self.state.r.hset(S.ACTIVE, st.request_id, st.active_record().model_dump_json())
                log.info("request %s resumed on %s (%d tokens already generated)", st.request_id, h.wid,
                         sum(len(v) for v in st.generated.values()))
            return True
        await self.finish_locally(st, FinishReason.ERROR, error)
        return False

    async def place_orphans(self) -> None:
        """Place requests that wait for a worker. Right after a restart, wait (a few seconds at most) for the
        workers that were there before to come back, so the requests spread over all of them."""
        s = self.state
        if not s.orphans or not s.workers:
            return
        missing = s.expected_workers - set(s.workers)
        if missing and time.time() < s.started_at + s.settings.rejoin_grace:
            return
        orphans, s.orphans = s.orphans, []
        for st in orphans:
            await self.place(st, resume=True)
