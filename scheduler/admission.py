"""Admission and chunked prefill: how prompt tokens get into a step (no torch).

* ``chunk_tokens`` splits the step's token budget over the sequences still computing their prompt (a
  long prompt is computed over several steps with chunked prefill; without it the whole remainder must
  fit).
* ``schedule_prefills`` (pass 2 of a step) gives running groups their next chunks, preempting groups
  after them in queue order when blocks are short.
* ``admit_queued`` (pass 3) admits swapped and waiting groups in queue order; the queue is never skipped:
  when its head does not fit, nothing behind it is admitted this step. A waiting group starts from the
  longest prefix-cache hit of each of its sequences; the watermark keeps some GPU blocks free for the
  running groups to grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.messages import ForkSequence, NewSequence
from scheduler import forking
from scheduler.block_pool import KVBlock
from scheduler.kv_cache_manager import BlockUpdates
from scheduler.output import finish_for_capacity
from scheduler.plan_builder import PlanBuilder
from scheduler.preemption import make_room
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler

_RUNNING = SequenceStatus.RUNNING

Admission = list[tuple[Sequence, list[KVBlock], int]]  # (sequence, prefix hit blocks, tokens to compute now)


def chunk_tokens(work: list[Sequence], budget: int, chunked: bool,
                 each: bool = False) -> list[tuple[Sequence, int]] | None:
    """Split the token budget over the sequences to compute, in order. Without chunked prefill a
    sequence's whole remainder must fit (else it and those after it wait; None if none fits). With
    ``each``, every sequence gets at least one token or the result is None."""
    pairs = []
    reserve = len(work) - 1 if each else 0
    for s in work:
        avail = budget - reserve
        if avail <= 0:
            break
        rem = s.num_uncomputed_tokens
        k = rem if rem <= avail else avail
        if k < rem and not chunked:
            break
        pairs.append((s, k))
        budget -= k
        if reserve:
            reserve -= 1
    if not pairs or (each and len(pairs) < len(work)):
        return None
    return pairs


def schedule_chunk(sched: Scheduler, g: SequenceGroup, s: Sequence, k: int, ups: BlockUpdates,
                   reset: list[int] | None, plan: PlanBuilder) -> None:
    """Schedule ``k`` tokens of ``s``; when they complete the prompt of an n > 1 request, fork it."""
    sample = s.num_computed_tokens + k == len(s.token_ids)
    if not (sample and g.needs_fork):
        plan.add(s, k, ups, sample, reset)
        return
    children = forking.fork_at_prompt_end(sched, g, s)
    plan.add(s, k, ups, sample, reset, [ForkSequence(parent_seq_id=s.seq_id, child_seq_id=c.seq_id,
                                                     seq_index=c.seq_index) for c in children])
    for child in children:  # after the parent: update() advances them the same way
        plan.record.append((child, k, True))
        child.num_inflight, child.inflight_samples = k, 1


def schedule_prefills(sched: Scheduler, plan: PlanBuilder) -> None:
    """Pass 2: running groups that still compute prompt (or recompute) tokens get chunks, in queue order."""
    running = sched.queues.running
    kv = sched.kv
    step = plan.step_id
    chunked = sched.config.enable_chunked_prefill
    i = 0
    while i < len(running) and plan.budget > 0:
        g = running[i]
        i += 1
        if g.scheduled_step == step:
            continue
        work = [s for s in g.live if s.num_uncomputed_tokens > 0]
        if not work:
            continue
        pairs = chunk_tokens(work, plan.budget, chunked)
        if pairs is None:
            break  # the next chunk does not fit the budget (chunked prefill off)
        if not make_room(sched, g, pairs, step, plan.swap_out):
            k = kv.num_tokens_fitting(pairs[0][0]) if len(pairs) == 1 else 0
            if k <= 0:  # nothing fits: wait, unless nothing else holds blocks
                if len(running) == 1:
                    finish_for_capacity(sched, g)
                    i -= 1
                continue
            pairs = [(pairs[0][0], min(k, pairs[0][1]))]  # shrink the chunk to the free blocks
        g.scheduled_step = step
        if g.pending_forks:
            forking.emit_forks(sched, g, plan)
        for s, k in pairs:
            ups = kv.allocate_slots(s, k, plan.copies)
            assert ups is not None
            schedule_chunk(sched, g, s, k, ups, None, plan)


def admit_queued(sched: Scheduler, plan: PlanBuilder) -> None:
    """Pass 3: admit swapped and waiting groups, in queue order, without skipping the head."""
    q = sched.queues
    max_num_seqs = sched.config.max_num_seqs
    while plan.budget > 0:
        g, swapped = q.peek_next()
        if g is None:
            break
        if q.num_running_seqs + g.max_num_seqs > max_num_seqs:
            break
        # the watermark keeps room for the running groups to grow; with none running it would only block
        wm = sched.watermark_blocks if q.running else 0
        admitted = _resume_swapped(sched, g, plan, wm) if swapped else _admit_waiting(sched, g, plan, wm)
        if not admitted:
            break


def _resume_swapped(sched: Scheduler, g: SequenceGroup, plan: PlanBuilder, wm: int) -> bool:
    """Swap ``g`` back in and schedule a chunk of every sequence. False: it does not fit now."""
    kv = sched.kv
    work = [s for s in g.live if s.num_uncomputed_tokens > 0]
    if len(work) > plan.budget:
        return False
    # every resumed sequence gets an entry (it carries reset_block_table): at least a token each
    pairs = chunk_tokens(work, plan.budget, sched.config.enable_chunked_prefill, each=True)
    if pairs is None:
        return False
    # CPU tables mirror the group's sharing, so the step's need can be counted before the swap-in
    need = kv.num_unique_blocks(g.live) + kv.num_blocks_needed(pairs)
    if need > kv.gpu.num_blocks:
        # its sequences grew apart while swapped out (or were swapped at the edge): even the whole pool
        # cannot hold its next step, so it would wait forever; stop it as a running group that outgrows
        # the pool is stopped (it leaves the heap as a finished head)
        finish_for_capacity(sched, g)
        return True
    if need > kv.num_free_blocks - wm:
        return False
    sched.queues.pop_head(swapped=True)
    plan.swap_in.extend(kv.swap_in(g.live))
    sched.queues.start_running(g, plan.step_id)
    if g.pending_forks:
        forking.emit_forks(sched, g, plan)
    for s in g.live:
        s.status = _RUNNING
    for s, k in pairs:
        kv.allocate_slots(s, k, plan.copies)
        # the reset table already holds this step's new blocks: no block_updates
        schedule_chunk(sched, g, s, k, [], kv.block_ids(s.seq_id), plan)
    return True


def plan_admission(sched: Scheduler, g: SequenceGroup, budget: int, watermark: int) -> Admission | None:
    """Admission plan for a waiting group, or None when it does not fit (budget, blocks with the
    watermark kept free)."""
    kv = sched.kv
    bs = sched.block_size
    chunked = sched.config.enable_chunked_prefill
    out: Admission = []
    new_blocks = 0
    use_prefix = kv.enable_prefix_caching and not (g.want_prompt_logprobs and not g.prompt_logprobs_done)
    for s in g.live:
        end = s.compute_limit if s.compute_limit is not None else len(s.token_ids)
        hits = kv.find_cached_prefix(s, end) if use_prefix else []
        c = len(hits) * bs
        rem = end - c
        k = rem if rem <= budget else budget
        if k < rem and not chunked:
            return None
        if k <= 0 and not out:
            return None
        budget -= k
        new_blocks += max(0, -(-(c + k) // bs) - len(hits))
        out.append((s, hits, k))
    if not out:
        return None
    revived = kv.num_blocks_revived(b for _, hits, _ in out for b in hits)
    if kv.num_free_blocks - revived - new_blocks < watermark:
        return None
    return out


def _admit_waiting(sched: Scheduler, g: SequenceGroup, plan: PlanBuilder, wm: int) -> bool:
    """Give a waiting group its block tables (prefix hits first) and register it with the worker."""
    admitted = plan_admission(sched, g, plan.budget, wm)
    if admitted is None:
        return False
    kv = sched.kv
    sched.queues.pop_head(swapped=False)
    sched.queues.start_running(g, plan.step_id)
    for s, hits, _ in admitted:  # take every prefix hit before any new block can evict one
        kv.allocate_sequence(s, hits)
        s.status = _RUNNING
    if not g.first_admitted:
        g.num_cached_tokens = admitted[0][0].num_computed_tokens
    for s, _, k in admitted:
        ups = kv.allocate_slots(s, k, plan.copies) if k > 0 else []
        assert ups is not None
        s.pending_append = []
        plan.new_sequences.append(NewSequence(
            seq_id=s.seq_id, request_id=s.request_id, seq_index=s.seq_index, prompt_len=s.prompt_len,
            token_ids=s.token_ids[:s.compute_limit] if s.compute_limit is not None else list(s.token_ids),
            num_computed_tokens=s.num_computed_tokens, block_table=kv.block_ids(s.seq_id),
            sampling=g.sampling, seed=g.seed))
        s.registered = True
        if k > 0:
            schedule_chunk(sched, g, s, k, [], None, plan)
    g.first_admitted = True
    return True
