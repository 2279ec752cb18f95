"""Preemption: when a running group needs a block and none is free (no torch).

Whole groups are preempted (all-or-nothing): the running group last in queue order (latest arrival /
lowest priority) that is not already scheduled in this step, possibly the group itself. It resumes by
swap (its blocks go to CPU and come back) or by recompute (its blocks are freed and its tokens
prefilled again), chosen per preemption by the cost model in ``preemption_costs``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.messages import WorkerInfo
from scheduler import forking
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.output import finish_for_capacity
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler, SchedulerConfig

_SWAPPED = SequenceStatus.SWAPPED
_WAITING = SequenceStatus.WAITING


def preemption_costs(config: SchedulerConfig, worker: WorkerInfo, kv: KVCacheManager,
                     g: SequenceGroup) -> tuple[float, float]:
    """Estimated (swap seconds, recompute seconds) to preempt and later resume ``g``.

    swap: every distinct block crosses PCIe twice (out and in): ``2 * blocks * (overhead + bytes / bw)``.
    The fixed per-block overhead is what makes small blocks inefficient to swap (PagedAttention paper,
    section 7.3 / fig. 19; seed 002 section 4.4).
    recompute: every token of every live sequence is prefilled again (forked sequences lose their
    sharing): ``tokens * ns_per_kv_byte * kv_bytes_per_token``; the KV bytes per token (layers x
    kv heads x head dim x dtype) stand in for model size, so a bigger model recomputes slower.
    With the defaults, a SmolLM2-135M block of 16 tokens is cheaper to recompute, a block of 64 to swap.
    """
    block_bytes = worker.kv_block_bytes
    n_blocks = kv.num_unique_blocks(g.live)
    swap_s = 2.0 * n_blocks * (config.swap_block_overhead_us * 1e-6
                               + block_bytes / (config.swap_bandwidth_gbps * 1e9))
    n_tokens = sum(len(s.token_ids) for s in g.live)
    per_token_bytes = block_bytes / worker.block_size
    recompute_s = n_tokens * per_token_bytes * config.recompute_ns_per_kv_byte * 1e-9
    return swap_s, recompute_s


def choose_mode(config: SchedulerConfig, worker: WorkerInfo, kv: KVCacheManager, g: SequenceGroup) -> str:
    """"swap" or "recompute" for preempting ``g`` now."""
    mode = config.preemption_mode
    if mode == "recompute":
        return "recompute"
    # a beam waiting for its siblings' candidates has nothing to compute: it cannot resume from swap
    if any(s.num_computed_tokens == len(s.token_ids) for s in g.live):
        return "recompute"
    if not kv.can_swap_out(g.live):  # CPU short (or none): fall back
        return "recompute"
    if mode == "swap":
        return "swap"
    swap_s, recompute_s = preemption_costs(config, worker, kv, g)
    return "swap" if swap_s < recompute_s else "recompute"


def preempt(sched: Scheduler, g: SequenceGroup, swap_out: list[tuple[int, int]]) -> str:
    """Take ``g`` off the running list by swap (its copies go to ``swap_out``) or recompute."""
    mode = choose_mode(sched.config, sched.worker, sched.kv, g)
    sched.queues.stop_running(g)
    if mode == "swap":
        swap_out.extend(sched.kv.swap_out(g.live))
        for s in g.live:
            s.status = _SWAPPED
        g.status = _SWAPPED
        sched.queues.push_swapped(g)
        sched.num_preemptions_swap += 1
    else:
        for s in g.live:
            _reset_for_recompute(sched, s)
        g.pending_forks = []  # unregistered children are re-created as NewSequences
        forking.park(g)
        g.status = _WAITING
        sched.queues.push_waiting(g)
        sched.num_preemptions_recompute += 1
    return mode


def _reset_for_recompute(sched: Scheduler, s: Sequence) -> None:
    sched.unregister(s)
    s.num_computed_tokens = 0
    s.pending_append = []  # already in token_ids: the NewSequence carries them
    s.beam_candidates = None
    s.status = _WAITING


def make_room(sched: Scheduler, g: SequenceGroup, pairs: list[tuple[Sequence, int]], step: int,
              swap_out: list[tuple[int, int]]) -> bool:
    """Preempt running groups after ``g`` in queue order (not scheduled this step) until ``pairs`` fit.
    False when they still do not fit with ``g`` last."""
    kv = sched.kv
    while kv.num_blocks_needed(pairs) > kv.num_free_blocks:
        victim = sched.queues.victim(step)
        if victim is None or victim is g:
            return False
        preempt(sched, victim, swap_out)
    return True


def give_up(sched: Scheduler, g: SequenceGroup, swap_out: list[tuple[int, int]]) -> None:
    """``g`` is last in queue order and still short of blocks: preempt it, or, when nothing else holds
    GPU blocks, it has outgrown the pool: finish it."""
    if len(sched.queues.running) == 1:
        finish_for_capacity(sched, g)
    else:
        preempt(sched, g, swap_out)
