"""Recovery: a dead worker's requests resume elsewhere (recompute from their tokens); a restarted
scheduler asks the workers of its predecessor to register again and resumes the requests in ``pf:active``."""

from __future__ import annotations

import contextlib
import logging

from protocol import FinishReason, RequestOutputDelta
from protocol import streams as S
from scheduler.server.placement import Placement
from scheduler.server.publishing import Publisher
from scheduler.server.state import ReqState, ServiceState, WorkerDead, WorkerHandle

log = logging.getLogger("pagedfleet.scheduler")

# deletes a worker's registration only if it is still the one given (compare and delete)
_DELETE_IF_SAME = ("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then "
                   "return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0")


class Recovery:
    def __init__(self, state: ServiceState, placement: Placement, publisher: Publisher):
        self.state = state
        self.placement = placement
        self.publisher = publisher

    async def declare_dead(self, h: WorkerHandle, why: str) -> None:
        if h.dead:
            return
        s = self.state
        h.dead = True
        log.warning("worker %s declared dead (%s); resuming its %d requests elsewhere", h.wid, why, len(h.requests))
        s.workers.pop(h.wid, None)
        if not s.workers:
            s.have_worker.clear()
        h.fail_in_flight(WorkerDead(h.wid))
        h.wake.set()
        if h.task is not None:
            h.task.cancel()
            with contextlib.suppress(BaseException):
                await h.task
        with contextlib.suppress(Exception):  # its last step's deltas reach the clients before any resume
            await self.publisher.flush(h)  # (a failure was logged when it happened)
        await self._forget_registration(h)
        if s.metrics is not None:
            s.metrics.set_worker_up(h.wid, h.reg.info.model, False)
        for rid in sorted(h.requests, key=lambda x: s.requests[x].request.arrival_time if x in s.requests else 0):
            st = s.requests.get(rid)
            if st is not None:
                await self._resume_elsewhere(h, st)
        h.requests.clear()

    async def _forget_registration(self, h: WorkerHandle) -> None:
        """Forget it in Redis (only if that registration is still the dead one)."""
        cur = await self.state.r.hget(S.WORKERS, h.wid)
        async with self.state.r.pipeline(transaction=True) as p:
            if cur is not None and S.WorkerRegistration.model_validate_json(cur).incarnation == h.reg.incarnation:
                p.hdel(S.WORKERS, h.wid)
                p.delete(S.plan_stream(h.wid))
            await p.execute()

    async def _resume_elsewhere(self, h: WorkerHandle, st: ReqState) -> None:
        st.worker_id = None
        if st.aborted:
            await self.publisher.finish_locally(st, FinishReason.ABORT, None)
            return
        st.resumes += 1
        if st.resumes > self.state.settings.max_resumes:
            await self.publisher.finish_locally(st, FinishReason.ERROR,
                                                f"request lost {st.resumes} workers (last: {h.wid}); giving up")
            return
        if st.started and self.state.metrics is not None:
            # it ran there and resumes elsewhere by recompute: a preemption of the lost worker
            self.state.metrics.inc_preemption(h.wid, "recompute", "worker_lost", model=h.reg.info.model)
        await self.placement.place(st, resume=True)

    async def bounce_workers(self) -> None:
        """Workers registered before this scheduler started hold sequences of a previous scheduler: remove
        their registrations; they notice, drop every sequence and register again as new incarnations."""
        r = self.state.r
        for wid, v in (await r.hgetall(S.WORKERS)).items():
            try:
                reg = S.WorkerRegistration.model_validate_json(v)
            except Exception:
                reg = None
            if reg is None or reg.registered_at < self.state.started_at:
                await r.eval(_DELETE_IF_SAME, 1, S.WORKERS, wid, v)
                self.state.expected_workers.add(wid)
                log.info("worker %s predates this scheduler: asked it to register again", wid)

    async def recover_active(self) -> None:
        """Requests a previous scheduler accepted and did not finish: resume them (from their outputs)."""
        r = self.state.r
        raw = await r.hgetall(S.ACTIVE)
        if not raw:
            return
        log.warning("recovering %d unfinished requests of a previous scheduler", len(raw))
        for rid, v in raw.items():
            try:
                act = S.ActiveRequest.model_validate_json(v)
            except Exception:
                await r.hdel(S.ACTIVE, rid)
                continue
            st = ReqState(request=act.request, job_id=act.job_id, gateway=act.gateway, resumes=act.resumes + 1)
            finished = False
            started = False
            for _id, fields in await r.xrange(S.output_stream(rid)):
                d = S.decode(fields, RequestOutputDelta)
                started = True  # the previous scheduler scheduled it (and observed its queue time)
                for o in d.outputs:  # (an empty token list still marks the sequence as resumed)
                    st.generated.setdefault(o.index, []).extend(o.token_ids)
                    if o.finish_reason is not None:
                        st.finished_idx.add(o.index)
                finished = finished or d.finished
            if finished:
                await r.hdel(S.ACTIVE, rid)
                continue
            st.queue_observed = started
            self.state.requests[rid] = st
            self.state.orphans.append(st)
