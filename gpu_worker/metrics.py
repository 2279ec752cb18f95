"""Worker-side Prometheus metrics: KV cache bytes, device memory, execute time, KV transfer (swap / copy).

No torch here: the worker passes numbers (``torch.cuda.memory_allocated()`` and friends are read by the
caller). Every metric is named ``pagedfleet_worker_*`` with labels ``worker`` and ``model``. Each worker
process serves its registry on its own port (``start_metrics_server``); the scheduler lists that
address in its Prometheus service-discovery endpoint (/sd), so a new worker is scraped without editing
any file.

How gpu_worker/service.py uses it::

    m = WorkerMetrics(runner.info)                     # KV cache bytes from info.kv_block_bytes; a CPU worker
                                                       # reports process memory by itself; on CUDA pass
                                                       # memory_fn=lambda: (torch.cuda.memory_allocated(dev),
                                                       #                    torch.cuda.get_device_properties(dev).total_memory)
    m.start_metrics_server(8002)                       # then advertise "host:8002" in WorkerRegistration.metrics_url
    ...                                                # per plan:
    result = runner.execute(plan)
    m.observe_step(plan, seconds, runner.last_transfer_s)   # {"swap_out": s, "swap_in": s, "copy": s} (or None)
    # or, piecemeal: m.observe_execute(seconds, num_tokens=...); m.observe_kv_transfer("swap_out", n_blocks, s)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

EXECUTE_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
TRANSFER_SECONDS_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
)
TRANSFER_OPS = ("swap_out", "swap_in", "copy")
LABELS = ("worker", "model")


class WorkerMetrics:
    """The metrics of one worker, bound to its worker id and model."""

    def __init__(self, info: Any = None, *, worker_id: str | None = None, model: str | None = None,
                 registry: CollectorRegistry | None = None,
                 memory_fn: Callable[[], tuple[float, float | None]] | None = None):
        """``memory_fn() -> (used_bytes, total_bytes)`` is read at every scrape: on CUDA pass e.g.
        ``lambda: (torch.cuda.memory_allocated(dev), torch.cuda.get_device_properties(dev).total_memory)``.
        Without it, a CPU worker reports its process's resident memory and the host's memory."""
        d = {} if info is None else (info if isinstance(info, dict) else info.model_dump())
        self.worker_id = str(worker_id or d.get("worker_id", ""))
        self.model = str(model or d.get("model", ""))
        self.block_bytes = int(d.get("kv_block_bytes", 0) or 0)
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        lv = (self.worker_id, self.model)

        self.info = Gauge("pagedfleet_worker_info", "Static worker facts (value 1).",
                          LABELS + ("device", "kv_cache_dtype", "block_size", "tensor_parallel_size"), registry=reg)
        self.kv_cache_bytes = Gauge("pagedfleet_worker_kv_cache_bytes",
                                    "Bytes allocated for the KV cache tensors (pool gpu or cpu).",
                                    LABELS + ("pool",), registry=reg)
        self.kv_blocks = Gauge("pagedfleet_worker_kv_blocks", "Blocks allocated in the KV cache tensors.",
                               LABELS + ("pool",), registry=reg)
        self.mem_used = Gauge("pagedfleet_worker_device_memory_used_bytes", "Device memory allocated.", LABELS,
                              registry=reg)
        self.mem_total = Gauge("pagedfleet_worker_device_memory_total_bytes", "Device memory in total.", LABELS,
                               registry=reg)
        self.execute = Histogram("pagedfleet_worker_execute_seconds", "Time to execute one StepPlan.", LABELS,
                                 buckets=EXECUTE_SECONDS_BUCKETS, registry=reg)
        self.tokens = Counter("pagedfleet_worker_computed_tokens", "Tokens computed (prefill + decode).", LABELS,
                              registry=reg)
        self.transfer_seconds = Histogram("pagedfleet_worker_kv_transfer_seconds",
                                          "Time of one batched KV block transfer (op swap_out, swap_in, copy).",
                                          LABELS + ("op",), buckets=TRANSFER_SECONDS_BUCKETS, registry=reg)
        self.transfer_blocks = Counter("pagedfleet_worker_kv_transfer_blocks", "KV blocks transferred, by op.",
                                       LABELS + ("op",), registry=reg)
        self.transfer_bytes = Counter("pagedfleet_worker_kv_transfer_bytes", "KV bytes transferred, by op.",
                                      LABELS + ("op",), registry=reg)

        if d:
            self.info.labels(*lv, str(d.get("device", "")), str(d.get("kv_cache_dtype", "")),
                             str(d.get("block_size", "")), str(d.get("tensor_parallel_size", 1))).set(1)
            bb = self.block_bytes
            for pool in ("gpu", "cpu"):
                n = int(d.get(f"num_{pool}_blocks", 0) or 0)
                self.kv_blocks.labels(*lv, pool).set(n)
                if bb:
                    self.kv_cache_bytes.labels(*lv, pool).set(n * bb)
        self._memory_fn: Callable[[], tuple[float, float | None]] | None = None
        device = str(d.get("device", ""))
        if memory_fn is None and device.startswith("cpu") and _host_memory() is not None:
            memory_fn = _host_memory
        if memory_fn is not None:
            self.set_memory_fn(memory_fn)
        for op in TRANSFER_OPS:  # present from the start, so rate() and the dashboards see zeros
            self.transfer_blocks.labels(*lv, op)
            self.transfer_bytes.labels(*lv, op)
            self.transfer_seconds.labels(*lv, op)
        self.tokens.labels(*lv)
        self.execute.labels(*lv)

    def set_kv_cache(self, gpu_bytes: int, cpu_bytes: int = 0, num_gpu_blocks: int | None = None,
                     num_cpu_blocks: int | None = None, block_bytes: int | None = None) -> None:
        lv = (self.worker_id, self.model)
        self.kv_cache_bytes.labels(*lv, "gpu").set(gpu_bytes)
        self.kv_cache_bytes.labels(*lv, "cpu").set(cpu_bytes)
        if num_gpu_blocks is not None:
            self.kv_blocks.labels(*lv, "gpu").set(num_gpu_blocks)
        if num_cpu_blocks is not None:
            self.kv_blocks.labels(*lv, "cpu").set(num_cpu_blocks)
        if block_bytes:
            self.block_bytes = int(block_bytes)
        elif num_gpu_blocks:
            self.block_bytes = int(gpu_bytes // num_gpu_blocks)

    def set_memory_fn(self, fn: Callable[[], tuple[float, float | None]]) -> None:
        """Read device memory through ``fn() -> (used_bytes, total_bytes)`` at every scrape."""
        first = self._memory_fn is None
        self._memory_fn = fn
        if first:
            lv = (self.worker_id, self.model)
            self.mem_used.labels(*lv).set_function(lambda: float(self._memory_fn()[0]))
            self.mem_total.labels(*lv).set_function(lambda: float(self._memory_fn()[1] or 0))

    def set_device_memory(self, used_bytes: float, total_bytes: float | None = None) -> None:
        """Set the numbers (instead of a ``memory_fn``); the total stays as it was when None."""
        old = self._memory_fn
        if total_bytes is None and old is not None:
            total_bytes = old()[1]
        self.set_memory_fn(lambda: (used_bytes, total_bytes))

    def observe_execute(self, seconds: float, num_tokens: int = 0) -> None:
        self.execute.labels(self.worker_id, self.model).observe(max(0.0, seconds))
        if num_tokens:
            self.tokens.labels(self.worker_id, self.model).inc(num_tokens)

    def observe_step(self, plan: Any, execute_s: float, transfer_s: Mapping[str, float] | None = None) -> None:
        """One executed StepPlan: its execute time and computed tokens, and its KV transfers (block counts
        from the plan; ``transfer_s`` = seconds per op, e.g. ModelRunner's ``last_transfer_s``)."""
        self.observe_execute(execute_s, num_tokens=plan.num_batched_tokens)
        if transfer_s is None:
            return
        for op, pairs in (("swap_out", plan.swap_out), ("swap_in", plan.swap_in), ("copy", plan.block_copies)):
            if pairs and op in transfer_s:
                self.observe_kv_transfer(op, len(pairs), transfer_s[op])

    def observe_kv_transfer(self, op: str, num_blocks: int, seconds: float, block_bytes: int | None = None) -> None:
        """One batched transfer: ``op`` is swap_out (GPU->CPU), swap_in (CPU->GPU) or copy (copy-on-write)."""
        if op not in TRANSFER_OPS:
            raise ValueError(f"op must be one of {TRANSFER_OPS}, not {op!r}")
        if num_blocks <= 0:
            return
        lv = (self.worker_id, self.model, op)
        self.transfer_seconds.labels(*lv).observe(max(0.0, seconds))
        self.transfer_blocks.labels(*lv).inc(num_blocks)
        bb = self.block_bytes if block_bytes is None else block_bytes
        if bb:
            self.transfer_bytes.labels(*lv).inc(num_blocks * bb)

    def start_metrics_server(self, port: int = 8002, addr: str = "0.0.0.0") -> None:
        """Serve this registry at http://addr:port/metrics in a daemon thread."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr, registry=self.registry)


def _host_memory() -> tuple[float, float] | None:
    """(resident bytes of this process, total bytes of the host) from /proc, or None where there is none."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return float(rss), float(total)
    except (OSError, ValueError, IndexError):
        return None
