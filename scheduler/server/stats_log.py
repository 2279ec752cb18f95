"""The scheduler's periodic lines: every ``stats_log_interval_s`` while busy, one line as vLLM prints it
(prompt and generation throughput, running / waiting / swapped requests, GPU KV-cache use); every second,
the autoscaling gauge (scheduler/server/autoscale.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from scheduler.server.autoscale import desired_workers

if TYPE_CHECKING:
    from scheduler.server.state import ServiceState

log = logging.getLogger("pagedfleet.scheduler.stats")

GAUGE_S = 1.0


class Throughput:
    """Tokens counted per step (no per-token work): prompt tokens computed, tokens generated."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def count(self, batched_tokens: int, sampled: int) -> None:
        self.generation_tokens += sampled
        self.prompt_tokens += max(0, batched_tokens - sampled)  # a decode step computes the one token it samples


def fleet_load(state: "ServiceState") -> dict:
    """Running / waiting / swapped requests and KV use over the live workers (draining ones apart)."""
    out = {"running": 0, "waiting": len(state.orphans), "swapped": 0, "used": [], "blocks": [], "draining": 0}
    for h in list(state.workers.values()):
        if h.dead:
            continue
        st = h.sched.stats()
        out["running"] += st["num_running"]
        out["waiting"] += st["num_waiting"]
        out["swapped"] += st["num_swapped"]
        if h.reg.draining:
            out["draining"] += 1
            continue
        out["used"].append(st["gpu_blocks_used"])
        out["blocks"].append(st["num_gpu_blocks"])
    return out


class StatsLog:
    def __init__(self, state: "ServiceState"):
        self.state = state

    def desired(self, load: dict) -> int:
        s = self.state.settings
        return desired_workers(load["used"], load["blocks"], load["waiting"], s.target_kv_utilization,
                               s.target_queue_per_worker)

    def line(self, load: dict, prompt_tps: float, gen_tps: float) -> str:
        kv = 100.0 * sum(load["used"]) / sum(load["blocks"]) if sum(load["blocks"]) else 0.0
        return (f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, Avg generation throughput: {gen_tps:.1f} "
                f"tokens/s, Running: {load['running']} reqs, Swapped: {load['swapped']} reqs, Pending: "
                f"{load['waiting']} reqs, GPU KV cache usage: {kv:.1f}%, Workers: {len(load['blocks'])}"
                + (f" (+{load['draining']} draining)" if load["draining"] else ""))

    async def loop(self) -> None:
        s, t = self.state, self.state.throughput
        interval = s.settings.stats_log_interval_s
        last_t, last_p, last_g = time.monotonic(), t.prompt_tokens, t.generation_tokens
        while not s.stopping.is_set():
            await asyncio.sleep(GAUGE_S)
            load = fleet_load(s)
            if s.metrics is not None:
                s.metrics.desired_workers.set(self.desired(load))
            now = time.monotonic()
            if interval <= 0 or now - last_t < interval:
                continue
            dp, dg, dt = t.prompt_tokens - last_p, t.generation_tokens - last_g, now - last_t
            last_t, last_p, last_g = now, t.prompt_tokens, t.generation_tokens
            if dp or dg or load["running"] or load["waiting"] or load["swapped"]:  # busy: idle fleets stay quiet
                log.info(self.line(load, dp / dt, dg / dt),
                         extra={"prompt_tps": round(dp / dt, 1), "generation_tps": round(dg / dt, 1),
                                "running": load["running"], "waiting": load["waiting"], "swapped": load["swapped"]})
