"""Scheduler-side Prometheus metrics: the block ledger, scheduling, the Redis queue and worker liveness.

No torch here. Every metric is named ``pagedfleet_*`` and carries ``worker`` and ``model`` labels where
they apply (``pool`` is ``gpu`` or ``cpu`` for the block pools). docs/observability.md lists them all.

How the scheduler service uses it (one ``SchedulerMetrics`` per process; pass a ``CollectorRegistry`` in
tests, or nothing for the default registry that ``prometheus_client`` serves)::

    m = scheduler_metrics()                                    # process-wide, default registry
    m.register_worker(info)                                    # WorkerInfo: capacity, block bytes, model
    ...                                                        # every step of worker w:
    plan = sched.schedule()
    m.observe_plan(w, plan)                                    # swap / copy-on-write traffic it orders
    ...                                                        # send it, wait for the StepResult
    m.observe_step(w, schedule_s, transport_s, execute_s, batch_size=len(plan.scheduled),
                   batched_tokens=plan.num_batched_tokens)
    m.update_ledger(w, info.model, sched.stats())              # gauges + cumulative counters
    ...                                                        # liveness / queue, every second or so:
    m.set_worker_up(w, info.model, up=True, heartbeat_age_s=now - last_heartbeat)
    m.poll_redis_streams(redis_client, {"pagedfleet:requests": "schedulers", ...})
    ...                                                        # per request / event:
    m.observe_queue_time(w, seconds)                           # arrival -> its first StepPlan
    m.inc_preemption(dead_w, "recompute", "worker_lost")       # a request resumed after its worker died

``transport_s`` is the plan's round trip minus the worker's own ``StepResult.execute_ms``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from scheduler.server.stream_metrics import CumulativeTotals, StreamMetrics

# Buckets ------------------------------------------------------------------------------------------
STEP_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
QUEUE_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                         120.0, 300.0, 600.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCHED_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

WORKER_LABELS = ("worker", "model")
POOL_LABELS = ("worker", "model", "pool")

# Scheduler.stats() keys -> what they feed (scheduler/scheduler.py, Scheduler.stats()). Each metric takes the
# first key of its tuple that is present. Note the ledger's "gpu_blocks_free" excludes cached blocks while
# pagedfleet_kv_blocks_free includes them (free = ref count 0 = "gpu_blocks_available"), so that
# used + free = capacity, cached is a subset of free and shared a subset of used.
# Cumulative counters are totals since the Scheduler was created; the Prometheus counter advances by the
# difference (a total that goes down means a new Scheduler, and counts from zero again).
GAUGE_KEYS: dict[str, tuple[str, ...]] = {
    "gpu_total": ("num_gpu_blocks",),
    "gpu_free": ("gpu_blocks_available",),
    "gpu_used": ("gpu_blocks_used",),
    "gpu_cached": ("gpu_blocks_cached",),
    "gpu_shared": ("gpu_blocks_shared",),
    "cpu_total": ("num_cpu_blocks",),
    "cpu_free": ("cpu_blocks_available", "cpu_blocks_free"),  # the CPU pool caches nothing
    "cpu_used": ("cpu_blocks_used",),
    "cpu_cached": ("cpu_blocks_cached",),
    "cpu_shared": ("cpu_blocks_shared",),
    "waiting": ("num_waiting",),
    "running": ("num_running",),
    "preempted": ("num_swapped",),  # preempted by swap, waiting to swap in (recomputed ones wait again)
    "waste_tokens": ("kv_waste_tokens",),
    "waste_ratio": ("kv_waste_ratio",),
    "allocated_slots": ("kv_slots_allocated",),
    "block_size": ("block_size",),
    "kv_block_bytes": ("kv_block_bytes",),
}
COUNTER_KEYS: dict[str, tuple[str, ...]] = {
    "cow_copies": ("cow_copies",),
    "swap_out_blocks": ("swap_out_blocks",),
    "swap_in_blocks": ("swap_in_blocks",),
    "prefix_queries": ("prefix_cache_query_tokens",),
    "prefix_hits": ("prefix_cache_hit_tokens",),
    "evictions": ("evictions",),
}
# Preemptions: a dict {mode: {reason: total}} under "preemptions_by_reason" when the scheduler keeps one;
# else the totals per mode, with reason "out_of_blocks" (the only reason this scheduler preempts for: a
# running decode, a prefill or a swap-in needs GPU blocks that are not free).
# The scheduler service adds reason "worker_lost" itself (``inc_preemption``): mode recompute, on the dead
# worker, once per request that had run there and resumes on another worker.
PREEMPTION_KEYS = ("preemptions_by_reason",)
PREEMPTION_MODE_KEYS = {
    "swap": ("preemptions_swap",),
    "recompute": ("preemptions_recompute",),
}
DEFAULT_PREEMPTION_REASON = "out_of_blocks"
REASON_OUT_OF_BLOCKS = DEFAULT_PREEMPTION_REASON
REASON_WORKER_LOST = "worker_lost"

# (mode, reason) preemption series created at 0 for every worker (others appear when they happen).
PREEMPTION_SERIES = (("swap", REASON_OUT_OF_BLOCKS), ("recompute", REASON_OUT_OF_BLOCKS),
                     ("recompute", REASON_WORKER_LOST))


def _gauge(reg: CollectorRegistry):
    return lambda name, doc, labels=WORKER_LABELS: Gauge(name, doc, labels, registry=reg)


def _counter(reg: CollectorRegistry):
    return lambda name, doc, labels=WORKER_LABELS: Counter(name, doc, labels, registry=reg)


def _first(stats: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for k in keys:
        if k in stats and stats[k] is not None:
            return stats[k]
    return None


class SchedulerMetrics:
    """All scheduler-side metrics, registered in ``registry`` (the default one when None)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        self.totals = CumulativeTotals()
        self._workers: dict[str, dict[str, Any]] = {}
        self._plan_counted: set[str] = set()

        self._declare_ledger(reg)
        self._declare_scheduling(reg)
        self.streams = StreamMetrics(reg, self.totals)
        self.worker_up = Gauge("pagedfleet_worker_up", "1 while the worker is registered and heartbeating.",
                               WORKER_LABELS, registry=reg)
        self.heartbeat_age = Gauge("pagedfleet_worker_heartbeat_age_seconds", "Seconds since the last heartbeat.",
                                   WORKER_LABELS, registry=reg)
        # autoscaling (KEDA: deploy/kubernetes/components/keda); the formula: scheduler/server/autoscale.py
        self.desired_workers = Gauge("pagedfleet_desired_workers",
                                     "Workers the load asks for: KV blocks in use over the target utilisation "
                                     "of one worker's blocks, plus waiting requests over the target queue.",
                                     registry=reg)

    def _declare_ledger(self, reg: CollectorRegistry) -> None:
        g, c = _gauge(reg), _counter(reg)
        self.blocks_capacity = g("pagedfleet_kv_blocks_capacity", "Blocks in the pool.", POOL_LABELS)
        self.blocks_free = g("pagedfleet_kv_blocks_free",
                             "Blocks with ref count 0 (including cached ones, which are reusable).",
                             POOL_LABELS)
        self.blocks_used = g("pagedfleet_kv_blocks_used", "Blocks held by at least one sequence (ref >= 1).",
                             POOL_LABELS)
        self.blocks_cached = g("pagedfleet_kv_blocks_cached",
                               "Free blocks that still hold a reusable prefix-cache entry (subset of free).",
                               POOL_LABELS)
        self.blocks_shared = g("pagedfleet_kv_blocks_shared",
                               "Blocks held by more than one sequence, ref > 1 (subset of used).", POOL_LABELS)
        self.cache_used_bytes = g("pagedfleet_kv_cache_used_bytes", "Bytes of KV cache in used blocks.",
                                  POOL_LABELS)
        self.cache_capacity_bytes = g("pagedfleet_kv_cache_capacity_bytes", "Bytes of KV cache in the pool.",
                                      POOL_LABELS)
        self.utilization = g("pagedfleet_kv_cache_utilization_ratio", "Used / total GPU blocks (0..1).")
        self.waste_ratio = g("pagedfleet_kv_waste_ratio",
                             "Internal waste: unfilled token slots / token slots of used GPU blocks (0..1).")
        self.waste_tokens = g("pagedfleet_kv_waste_tokens", "Internal waste: unfilled token slots in used blocks.")
        self.used_slots = g("pagedfleet_kv_used_slots",
                            "Token slots of used GPU blocks (the waste ratio's denominator).")
        self.cow_copies = c("pagedfleet_kv_cow_copies", "Copy-on-write block copies ordered.")
        self.swap_blocks = c("pagedfleet_kv_swap_blocks", "Blocks swapped (direction out: GPU->CPU, in: CPU->GPU).",
                             ("worker", "model", "direction"))
        self.swap_bytes = c("pagedfleet_kv_swap_bytes", "Bytes swapped (direction out: GPU->CPU, in: CPU->GPU).",
                            ("worker", "model", "direction"))
        self.prefix_queries = c("pagedfleet_prefix_cache_query_tokens",
                                "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = c("pagedfleet_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.")
        self.evictions = c("pagedfleet_kv_evictions", "Cached blocks evicted from the prefix cache for reuse.")


    def _declare_scheduling(self, reg: CollectorRegistry) -> None:
        g, c = _gauge(reg), _counter(reg)
        self.waiting = g("pagedfleet_requests_waiting", "Requests waiting to be scheduled.")
        self.running = g("pagedfleet_requests_running", "Requests running.")
        self.preempted = g("pagedfleet_requests_preempted", "Requests preempted and not yet resumed.")
        self.preemptions = c("pagedfleet_preemptions", "Preemptions by mode (swap, recompute) and reason.",
                             ("worker", "model", "mode", "reason"))
        self.batch_size = Histogram("pagedfleet_step_batch_size", "Sequences scheduled per step.",
                                    WORKER_LABELS, buckets=BATCH_SIZE_BUCKETS, registry=reg)
        self.batched_tokens = Histogram("pagedfleet_step_batched_tokens", "Tokens computed per step.",
                                        WORKER_LABELS, buckets=BATCHED_TOKENS_BUCKETS, registry=reg)
        self.step_seconds = Histogram("pagedfleet_step_phase_seconds",
                                      "Step time by phase: schedule, transport (plan/result round trip minus "
                                      "execute), execute (the worker's own time), update (the Scheduler's "
                                      "update and handing the deltas on, waiting for the last step's writes).",
                                      ("worker", "model", "phase"), buckets=STEP_SECONDS_BUCKETS, registry=reg)
        self.queue_seconds = Histogram("pagedfleet_request_queue_seconds",
                                       "Time from arrival to first scheduled.", WORKER_LABELS,
                                       buckets=QUEUE_SECONDS_BUCKETS, registry=reg)


    # --- workers ----------------------------------------------------------------------------------
    def register_worker(self, info: Any) -> None:
        """Remember a worker's capacity and block bytes (``info`` is a protocol.WorkerInfo or a dict)."""
        d = info if isinstance(info, Mapping) else info.model_dump()
        wid, model = d["worker_id"], d.get("model", "")
        self._workers[wid] = dict(d)
        for pool in ("gpu", "cpu"):  # a new worker's pools are all free: used + free = capacity from the start
            n = d.get(f"num_{pool}_blocks", 0)
            self.blocks_capacity.labels(wid, model, pool).set(n)
            self.blocks_free.labels(wid, model, pool).set(n)
            self.blocks_used.labels(wid, model, pool).set(0)
        bb = d.get("kv_block_bytes", 0) or 0
        self.cache_capacity_bytes.labels(wid, model, "gpu").set(bb * d.get("num_gpu_blocks", 0))
        self.cache_capacity_bytes.labels(wid, model, "cpu").set(bb * d.get("num_cpu_blocks", 0))
        self.worker_up.labels(wid, model).set(1)
        self.heartbeat_age.labels(wid, model).set(0)
        self._zero_series(wid, model)

    def _zero_series(self, wid: str, model: str) -> None:
        """Create a worker's series at 0 so dashboards and rates see them before the first event."""
        for metric in (self.cow_copies, self.prefix_queries, self.prefix_hits, self.evictions, self.batch_size,
                       self.batched_tokens, self.queue_seconds, self.waiting, self.running, self.preempted,
                       self.waste_tokens, self.waste_ratio, self.used_slots, self.utilization):
            metric.labels(wid, model)
        for pool in ("gpu", "cpu"):
            for metric in (self.blocks_free, self.blocks_used, self.blocks_cached, self.blocks_shared,
                           self.cache_used_bytes):
                metric.labels(wid, model, pool)
        for direction in ("out", "in"):
            self.swap_blocks.labels(wid, model, direction)
            self.swap_bytes.labels(wid, model, direction)
        for phase in ("schedule", "transport", "execute"):
            self.step_seconds.labels(wid, model, phase)
        for mode, reason in PREEMPTION_SERIES:
            self.preemptions.labels(wid, model, mode, reason)

    def set_worker_up(self, worker_id: str, model: str, up: bool, heartbeat_age_s: float | None = None) -> None:
        self.worker_up.labels(worker_id, model).set(1 if up else 0)
        if heartbeat_age_s is not None:
            self.heartbeat_age.labels(worker_id, model).set(max(0.0, float(heartbeat_age_s)))

    def remove_worker(self, worker_id: str) -> None:
        """Drop every series of a worker that left for good (a dead one should stay, with up = 0)."""
        self._workers.pop(worker_id, None)
        self._plan_counted.discard(worker_id)
        for metric in self._worker_metrics():
            for labels in list(_label_sets(metric)):
                if labels.get("worker") == worker_id:
                    try:
                        metric.remove(*[labels[n] for n in metric._labelnames])
                    except KeyError:
                        pass
        self.totals.forget(worker_id)

    def _model(self, worker_id: str, model: str | None) -> str:
        if model:
            return model
        return str(self._workers.get(worker_id, {}).get("model", ""))

    def _worker_metrics(self):
        return [v for v in vars(self).values() if isinstance(v, (Gauge, Counter, Histogram))
                and "worker" in v._labelnames]

    # --- the ledger -------------------------------------------------------------------------------
    def update_ledger(self, worker_id: str, model: str, stats: Mapping[str, Any]) -> None:
        """Set the ledger gauges and advance the cumulative counters from ``Scheduler.stats()``."""
        model = self._model(worker_id, model)
        w = self._workers.get(worker_id, {})
        block_size = _first(stats, GAUGE_KEYS["block_size"]) or w.get("block_size") or 16
        block_bytes = _first(stats, GAUGE_KEYS["kv_block_bytes"]) or w.get("kv_block_bytes") or 0

        for pool in ("gpu", "cpu"):
            self._update_pool(worker_id, model, pool, stats, w, block_bytes)

        used_gpu = _first(stats, GAUGE_KEYS["gpu_used"])
        waste = _first(stats, GAUGE_KEYS["waste_tokens"])
        ratio = _first(stats, GAUGE_KEYS["waste_ratio"])
        slots = _first(stats, GAUGE_KEYS["allocated_slots"])
        if slots is None and used_gpu is not None:
            slots = used_gpu * block_size
        if slots is not None:
            self.used_slots.labels(worker_id, model).set(slots)
        if waste is not None:
            self.waste_tokens.labels(worker_id, model).set(waste)
            if ratio is None:
                ratio = waste / slots if slots else 0.0
        if ratio is not None:
            self.waste_ratio.labels(worker_id, model).set(ratio)

        for key, gauge in (("waiting", self.waiting), ("running", self.running), ("preempted", self.preempted)):
            v = _first(stats, GAUGE_KEYS[key])
            if v is not None:
                gauge.labels(worker_id, model).set(v)

        self._update_counters(worker_id, model, stats, block_bytes)
        self._update_preemptions(worker_id, model, stats)

    def _update_pool(self, worker_id: str, model: str, pool: str, stats: Mapping[str, Any], w: Mapping[str, Any],
                     block_bytes: int) -> None:
        total = _first(stats, GAUGE_KEYS[f"{pool}_total"])
        if total is None:
            total = w.get(f"num_{pool}_blocks")
        free = _first(stats, GAUGE_KEYS[f"{pool}_free"])
        used = _first(stats, GAUGE_KEYS[f"{pool}_used"])
        if used is None and total is not None and free is not None:
            used = total - free
        if free is None and total is not None and used is not None:
            free = total - used
        labels = (worker_id, model, pool)
        if total is not None:
            self.blocks_capacity.labels(*labels).set(total)
            self.cache_capacity_bytes.labels(*labels).set(total * block_bytes)
        if free is not None:
            self.blocks_free.labels(*labels).set(free)
        if used is not None:
            self.blocks_used.labels(*labels).set(used)
            self.cache_used_bytes.labels(*labels).set(used * block_bytes)
        for key, gauge in (("cached", self.blocks_cached), ("shared", self.blocks_shared)):
            v = _first(stats, GAUGE_KEYS[f"{pool}_{key}"])
            if v is not None or total is not None:
                gauge.labels(*labels).set(v or 0)
        if pool == "gpu" and total and used is not None:
            self.utilization.labels(worker_id, model).set(used / total)
        elif pool == "gpu" and total == 0:
            self.utilization.labels(worker_id, model).set(0)

    def _update_counters(self, worker_id: str, model: str, stats: Mapping[str, Any], block_bytes: int) -> None:
        """Cumulative counters (CoW and swap traffic from here only until observe_plan counts it)."""
        counters = [("prefix_queries", self.prefix_queries), ("prefix_hits", self.prefix_hits),
                    ("evictions", self.evictions)]
        from_plans = worker_id in self._plan_counted
        if not from_plans:
            counters.append(("cow_copies", self.cow_copies))
        for key, counter in counters:
            v = _first(stats, COUNTER_KEYS[key])
            if v is not None:
                self.totals.advance(counter.labels(worker_id, model), (worker_id, key), v)
        for direction in () if from_plans else ("out", "in"):
            v = _first(stats, COUNTER_KEYS[f"swap_{direction}_blocks"])
            if v is not None:
                d = self.totals.advance(self.swap_blocks.labels(worker_id, model, direction),
                                        (worker_id, f"swap_{direction}"), v)
                if d and block_bytes:
                    self.swap_bytes.labels(worker_id, model, direction).inc(d * block_bytes)

    def _update_preemptions(self, worker_id: str, model: str, stats: Mapping[str, Any]) -> None:
        by = _first(stats, PREEMPTION_KEYS)
        items: list[tuple[str, str, float]] = []
        if isinstance(by, Mapping):
            for k, v in by.items():
                if isinstance(v, Mapping):
                    items += [(str(k), str(r), n) for r, n in v.items()]
                elif isinstance(k, tuple):
                    items.append((str(k[0]), str(k[1]), v))
                else:
                    items.append((str(k), DEFAULT_PREEMPTION_REASON, v))
        else:
            for mode, keys in PREEMPTION_MODE_KEYS.items():
                v = _first(stats, keys)
                if v is not None:
                    items.append((mode, DEFAULT_PREEMPTION_REASON, v))
        for mode, reason, total in items:
            self.totals.advance(self.preemptions.labels(worker_id, model, mode, reason),
                                (worker_id, "preempt", mode, reason), total)

    # --- per step ---------------------------------------------------------------------------------
    def observe_plan(self, worker_id: str, plan: Any, model: str | None = None,
                     kv_block_bytes: int | None = None) -> None:
        """Count the swap and copy-on-write traffic a StepPlan orders. Once called for a worker,
        ``update_ledger`` stops reading the swap / CoW totals of ``Scheduler.stats()`` for it, so the two
        sources never double count."""
        model = self._model(worker_id, model)
        self._plan_counted.add(worker_id)
        bb = kv_block_bytes if kv_block_bytes is not None else self._workers.get(worker_id, {}).get(
            "kv_block_bytes", 0)
        if plan.block_copies:
            self.cow_copies.labels(worker_id, model).inc(len(plan.block_copies))
        for direction, pairs in (("out", plan.swap_out), ("in", plan.swap_in)):
            if pairs:
                self.swap_blocks.labels(worker_id, model, direction).inc(len(pairs))
                if bb:
                    self.swap_bytes.labels(worker_id, model, direction).inc(len(pairs) * bb)

    def observe_step(self, worker_id: str, schedule_s: float, transport_s: float, execute_s: float,
                     batch_size: int, batched_tokens: int, model: str | None = None,
                     update_s: float | None = None) -> None:
        model = self._model(worker_id, model)
        for phase, s in (("schedule", schedule_s), ("transport", transport_s), ("execute", execute_s),
                         ("update", update_s)):
            if s is not None:
                self.step_seconds.labels(worker_id, model, phase).observe(max(0.0, s))
        if batch_size:
            self.batch_size.labels(worker_id, model).observe(batch_size)
            self.batched_tokens.labels(worker_id, model).observe(batched_tokens)

    def inc_preemption(self, worker_id: str, mode: str, reason: str, n: int = 1, model: str | None = None) -> None:
        """For a service that counts preemptions itself instead of through stats()."""
        self.preemptions.labels(worker_id, self._model(worker_id, model), mode, reason).inc(n)

    def observe_queue_time(self, worker_id: str, seconds: float, model: str | None = None) -> None:
        self.queue_seconds.labels(worker_id, self._model(worker_id, model)).observe(max(0.0, seconds))

    # --- the queue (scheduler/server/stream_metrics.py) -------------------------------------------
    def poll_redis_streams(self, redis_client: Any, streams: Mapping[str, str | Iterable[str] | None],
                           housekeeping_stats_key: str | None = "") -> None:
        self.streams.poll(redis_client, streams, housekeeping_stats_key)

    def inc_dead_lettered(self, stream: str, n: int = 1) -> None:
        self.streams.dead_lettered.labels(stream).inc(n)


def _label_sets(metric) -> Iterable[dict[str, str]]:
    for family in metric.collect():
        seen = set()
        for s in family.samples:
            key = tuple(s.labels.get(n, "") for n in metric._labelnames)
            if key not in seen:
                seen.add(key)
                yield dict(zip(metric._labelnames, key))


@functools.cache
def scheduler_metrics() -> SchedulerMetrics:
    """The process-wide SchedulerMetrics on the default registry (created once)."""
    return SchedulerMetrics()
