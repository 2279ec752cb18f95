"""What a scheduler reports about itself: ``SchedulerStats`` (counters and ledger usage) and the block map.

The stats are built from counters the ledger and the queues keep (no scan over the blocks or the
queues); only the slot usage and ``num_running_seqs`` walk the block tables / running groups. The
block map walks every block: it is for a dashboard, never on the step path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    num_gpu_blocks: int
    gpu_blocks_free: int  # free and holding nothing reusable
    gpu_blocks_cached: int  # free but still in the prefix cache (evictable)
    gpu_blocks_used: int
    gpu_blocks_shared: int
    gpu_blocks_available: int  # free + cached: what a new request can take
    gpu_usage: float
    num_cpu_blocks: int
    cpu_blocks_free: int
    cpu_blocks_used: int
    cpu_blocks_shared: int
    cpu_blocks_cached: int
    cpu_usage: float
    block_size: int
    kv_block_bytes: int
    kv_slots_allocated: int
    kv_slots_filled: int
    kv_waste_tokens: int
    kv_waste_ratio: float
    cow_copies: int
    swap_out_blocks: int
    swap_in_blocks: int
    prefix_cache_query_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_hit_rate: float
    evictions: int
    preemptions_swap: int
    preemptions_recompute: int
    preemptions: int
    num_waiting: int
    num_running: int
    num_swapped: int
    num_running_seqs: int
    num_finished: int
    num_aborted: int
    num_steps: int

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def collect_stats(sched: Scheduler) -> SchedulerStats:
    kv = sched.kv
    gpu, cpu = kv.gpu, kv.cpu
    allocated, filled = kv.slot_usage()
    g_used = gpu.num_used_blocks
    c_used = cpu.num_used_blocks
    q = sched.queues
    return SchedulerStats(
        num_gpu_blocks=gpu.num_blocks,
        gpu_blocks_free=gpu.num_free_blocks - gpu.num_cached_free,
        gpu_blocks_cached=gpu.num_cached_free,
        gpu_blocks_used=g_used,
        gpu_blocks_shared=gpu.num_shared,
        gpu_blocks_available=gpu.num_free_blocks,
        gpu_usage=_ratio(g_used, gpu.num_blocks),
        num_cpu_blocks=cpu.num_blocks,
        cpu_blocks_free=cpu.num_free_blocks,
        cpu_blocks_used=c_used,
        cpu_blocks_shared=cpu.num_shared,
        cpu_blocks_cached=0,
        cpu_usage=_ratio(c_used, cpu.num_blocks),
        block_size=sched.block_size,
        kv_block_bytes=sched.worker.kv_block_bytes,
        kv_slots_allocated=allocated,
        kv_slots_filled=filled,
        kv_waste_tokens=allocated - filled,
        kv_waste_ratio=_ratio(allocated - filled, allocated),
        cow_copies=kv.num_cow_copies,
        swap_out_blocks=kv.num_swap_out_blocks,
        swap_in_blocks=kv.num_swap_in_blocks,
        prefix_cache_query_tokens=kv.prefix_query_tokens,
        prefix_cache_hit_tokens=kv.prefix_hit_tokens,
        prefix_cache_hit_rate=_ratio(kv.prefix_hit_tokens, kv.prefix_query_tokens),
        evictions=gpu.num_evictions,
        preemptions_swap=sched.num_preemptions_swap,
        preemptions_recompute=sched.num_preemptions_recompute,
        preemptions=sched.num_preemptions_swap + sched.num_preemptions_recompute,
        num_waiting=q.num_waiting,
        num_running=len(q.running),
        num_swapped=q.num_swapped,
        num_running_seqs=sum(len(g.live) for g in q.running),
        num_finished=sched.num_finished,
        num_aborted=sched.num_aborted,
        num_steps=sched.num_steps,
    )


def block_map(sched: Scheduler) -> dict:
    """Per-block state for a dashboard: free | cached | used | shared (GPU), free | swapped (CPU)."""
    g_hold, c_hold = sched.kv.holders()
    seqs = sched.seqs

    def rids(sids):
        out = []
        for sid in sids:
            s = seqs.get(sid)
            if s is not None and s.request_id not in out:
                out.append(s.request_id)
        return out

    gpu = []
    for b in sched.kv.gpu.blocks:
        if b.ref_cnt == 0:
            state = "cached" if b.block_hash is not None else "free"
        else:
            state = "shared" if b.ref_cnt > 1 else "used"
        sids = g_hold.get(b.block_id, [])
        gpu.append({"id": b.block_id, "state": state, "ref_cnt": b.ref_cnt, "seq_ids": sids,
                    "request_ids": rids(sids), "cached": b.block_hash is not None})
    cpu = []
    for b in sched.kv.cpu.blocks:
        sids = c_hold.get(b.block_id, [])
        cpu.append({"id": b.block_id, "state": "swapped" if b.ref_cnt else "free", "ref_cnt": b.ref_cnt,
                    "seq_ids": sids, "request_ids": rids(sids)})
    return {"worker_id": sched.worker.worker_id, "block_size": sched.block_size, "gpu": gpu, "cpu": cpu}
