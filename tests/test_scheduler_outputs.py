"""The scheduler service writes each step's output deltas to Redis in the background, while the worker runs
the next step. Against a real redis-server: a request's deltas reach its output stream in order, and none
is lost when the worker's loop is cancelled in the middle of a write or the request is finished locally
(an abort) while its last deltas are still being written. Writes are slowed on purpose (a delay before
the real MULTI) so that the interleavings happen every time."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from fleet_harness import RedisServer
from protocol import GenerationRequest, RequestOutputDelta, SequenceOutputDelta, WorkerInfo
from protocol import streams as S
from scheduler.server.config import SchedulerSettings
from scheduler.server.state import ReqState, WorkerHandle
from scheduler.service import SchedulerService


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


class _SlowWrites:
    """A redis.asyncio client whose MULTI pipelines wait `delays.pop(0)` seconds (0 once empty) first."""

    def __init__(self, client, delays):
        self._client, self.delays = client, list(delays)

    def __getattr__(self, name):
        return getattr(self._client, name)

    def pipeline(self, *a, **kw):
        pipe, delay = self._client.pipeline(*a, **kw), self.delays.pop(0) if self.delays else 0.0
        execute = pipe.execute

        async def slow_execute(*ea, **ekw):
            await asyncio.sleep(delay)
            return await execute(*ea, **ekw)

        pipe.execute = slow_execute
        return pipe


class _NoAbort:
    def abort_request(self, request_id):  # the worker's Scheduler no longer has it: finished locally
        return False


def _setup(url, delays, request_ids):
    svc = SchedulerService(SchedulerSettings())
    svc.r = _SlowWrites(aioredis.Redis.from_url(url, decode_responses=True), delays)
    info = WorkerInfo(worker_id="w1", model="m", num_gpu_blocks=8, max_model_len=64, vocab_size=100)
    h = WorkerHandle(S.WorkerRegistration(info=info, incarnation="i1"), _NoAbort())
    svc.workers[h.wid] = h
    states = {}
    for rid in request_ids:
        st = ReqState(request=GenerationRequest(request_id=rid, prompt_token_ids=[1, 2, 3]), worker_id=h.wid)
        svc.requests[rid] = h_st = st
        h.requests.add(rid)
        states[rid] = h_st
    return svc, h, states


def _delta(rid, tokens, finished=False):
    out = SequenceOutputDelta(index=0, token_ids=tokens, finish_reason="stop" if finished else None)
    return RequestOutputDelta(request_id=rid, outputs=[out], finished=finished)


async def _stream(svc, rid):
    entries = await svc.r.xrange(S.output_stream(rid))
    return [S.decode(fields, RequestOutputDelta) for _, fields in entries]


def test_cancelled_worker_loop_loses_no_step(redis_server):
    async def run():
        svc, h, states = _setup(redis_server.url, [0.2, 0.0], ["a"])
        await svc.publisher.apply_deltas(h, [_delta("a", [7])], None)  # step 1: its write is slow
        step2 = asyncio.ensure_future(svc.publisher.apply_deltas(h, [_delta("a", [8], finished=True)], None))
        await asyncio.sleep(0.05)
        step2.cancel()  # the loop is stopped (worker declared dead, shutdown) while it waits for step 1
        await asyncio.gather(step2, return_exceptions=True)
        await svc.publisher.flush(h)
        deltas = await _stream(svc, "a")
        assert [d.outputs[0].token_ids for d in deltas] == [[7], [8]]
        assert deltas[-1].finished and "a" not in svc.requests and not h.requests
        assert states["a"].generated == {0: [7, 8]}
        await svc.r.aclose()

    asyncio.run(run())


def test_local_finish_waits_for_the_requests_pending_deltas(redis_server):
    async def run():
        svc, h, _ = _setup(redis_server.url, [0.2, 0.0], ["b"])
        await svc.publisher.apply_deltas(h, [_delta("b", [7, 9])], None)  # still being written when the abort comes
        await svc.intake.abort("b", "client went away")
        deltas = await _stream(svc, "b")
        assert [d.outputs[0].token_ids for d in deltas] == [[7, 9], []]
        assert [d.finished for d in deltas] == [False, True]
        assert deltas[-1].outputs[0].finish_reason == "abort"
        assert "b" not in svc.requests
        await svc.r.aclose()

    asyncio.run(run())


def test_a_failed_write_keeps_finished_requests_tracked_and_fails_the_next_step(redis_server):
    async def run():
        svc, h, _ = _setup(redis_server.url, [], ["c"])
        broken = svc.r.pipeline

        def failing_pipeline(*a, **kw):
            pipe = broken(*a, **kw)

            async def fail(*ea, **ekw):
                raise ConnectionError("redis went away")

            pipe.execute = fail
            return pipe

        svc.r.pipeline = failing_pipeline
        await svc.publisher.apply_deltas(h, [_delta("c", [5], finished=True)], None)
        await asyncio.sleep(0.05)
        assert "c" in svc.requests and "c" in h.requests  # not forgotten: a resume can still finish it
        with pytest.raises(ConnectionError):
            await svc.publisher.apply_deltas(h, [], "1-0")  # the worker's loop fails on its next step
        await svc.r.aclose()

    asyncio.run(run())


def test_abort_of_a_request_whose_final_delta_is_being_written_adds_nothing(redis_server):
    async def run():
        svc, h, _ = _setup(redis_server.url, [0.2, 0.0], ["d"])
        await svc.publisher.apply_deltas(h, [_delta("d", [3], finished=True)], None)  # finished on the worker
        await svc.intake.abort("d", "client went away")  # arrives while that final delta is still being written
        deltas = await _stream(svc, "d")
        assert [(d.outputs[0].token_ids, d.finished) for d in deltas] == [([3], True)]
        assert "d" not in svc.requests
        await svc.r.aclose()

    asyncio.run(run())
