"""The autoscaling gauge pagedfleet_desired_workers (scheduler/server/autoscale.py): its formula, and what the
scheduler exports from its live workers (draining ones left out)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from protocol import GenerationRequest, SamplingParams, WorkerInfo
from protocol import streams as S
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.server.autoscale import desired_workers
from scheduler.server.config import SchedulerSettings
from scheduler.server.metrics import SchedulerMetrics
from scheduler.server.state import ReqState, WorkerHandle
from scheduler.server.stats_log import fleet_load
from scheduler.service import SchedulerService


def test_idle_fleet_wants_one_worker():
    assert desired_workers([0, 0], [100, 100], waiting=0) == 1
    assert desired_workers([], [], waiting=0) == 1


def test_kv_at_target_keeps_the_count_and_above_it_asks_for_more():
    # 2 workers of 100 blocks at 80 % (the target): 2; at 90 %: ceil(180 / 80) = 3
    assert desired_workers([80, 80], [100, 100], waiting=0, target_kv_utilization=0.8) == 2
    assert desired_workers([90, 90], [100, 100], waiting=0, target_kv_utilization=0.8) == 3
    assert desired_workers([40, 40], [100, 100], waiting=0, target_kv_utilization=0.8) == 1  # half the load: 1


def test_queue_lag_adds_workers_per_target_queue():
    assert desired_workers([80], [100], waiting=1, target_queue_per_worker=4) == 2
    assert desired_workers([80], [100], waiting=9, target_queue_per_worker=4) == 1 + 3
    assert desired_workers([], [], waiting=9, target_queue_per_worker=4) == 3  # no worker yet: the queue decides


def _handle(wid: str, blocks: int = 64, draining: bool = False) -> WorkerHandle:
    info = WorkerInfo(worker_id=wid, model="m", num_gpu_blocks=blocks, num_cpu_blocks=0, max_model_len=2048,
                      vocab_size=1000, eos_token_ids=[2])
    reg = S.WorkerRegistration(info=info, incarnation=wid + "-1", draining=draining)
    return WorkerHandle(reg, Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048), info))


def test_scheduler_exports_the_gauge_from_its_workers_and_skips_draining_ones():
    m = SchedulerMetrics(CollectorRegistry())
    svc = SchedulerService(SchedulerSettings(target_queue_per_worker=2), m)
    for h in (_handle("a"), _handle("b", draining=True)):
        svc.workers[h.wid] = h
    for i in range(5):  # queued on a (placement skips the draining b)
        st = ReqState(GenerationRequest(request_id=f"r{i}", prompt_token_ids=list(range(3, 40)),
                                        sampling=SamplingParams(temperature=0, max_tokens=8)))
        svc.requests[st.request_id] = st
        assert asyncio.run(svc.placement.place(st))
        assert st.worker_id == "a"
    load = fleet_load(svc)
    assert load["waiting"] == 5 and load["blocks"] == [64] and load["draining"] == 1
    assert svc.stats_log.desired(load) == 3  # ceil(5 / 2) for the queue, none for KV (nothing runs yet)
    assert "Pending: 5 reqs" in svc.stats_log.line(load, 0.0, 0.0)


def test_all_workers_draining_requests_wait_instead_of_failing():
    svc = SchedulerService(SchedulerSettings(), None)
    h = _handle("a", draining=True)
    svc.workers[h.wid] = h
    st = ReqState(GenerationRequest(request_id="r", prompt_token_ids=[3, 4, 5],
                                    sampling=SamplingParams(temperature=0, max_tokens=4)))
    assert asyncio.run(svc.placement.place(st)) and svc.orphans == [st] and st.worker_id is None
