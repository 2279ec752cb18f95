"""Pipelined scheduling: plan step N+1 while step N runs (no torch).

The plan made ahead assumes every sequence that the plans in flight sample gets its token (vLLM V1's
async scheduling): such a sequence gets a one-token decode entry for the token it does not know yet. The
worker already holds that token (it appended it when it sampled it), so the entry names no token: the
worker feeds its own sampled id into the next step. ``update()`` then applies the results in order; a
sequence that finished (stop, EOS, max_tokens), was aborted or stopped by a stop string meanwhile is
FINISHED when the later result arrives, so the token sampled past its stop is dropped and never reaches a
delta; its blocks (the speculative slot included) were freed with it and the worker drops it in the next
plan.

What is planned ahead, and what waits for the results (a synchronous step for that group or plan):

* groups in a plan in flight are taken for this step (``scheduled_step``): the passes of the ordinary
  schedule (decodes, prefill chunks, admission) leave them alone and never pick them as preemption
  victims; groups not in flight are scheduled by those passes as usual (admission, prefill chunks,
  preemption of groups not in flight);
* a sequence in flight gets a speculative decode only if its group is on the plain path: no beam search,
  no prompt logprobs, no pending forks or parked recompute (those wait one step for their results, which
  make their next choice); a prefill chunk that does not sample also waits for its result;
* a sequence whose token in flight is certainly its last (max_tokens, max_model_len) gets no decode;
* when the GPU pool cannot hold every speculative slot, nothing is planned ahead (``None``): the caller
  applies the oldest result and plans synchronously, where the preemption policy runs as without pipelining.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from scheduler.plan_builder import PlanBuilder, ScheduledStep
from scheduler.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler

_RUNNING = SequenceStatus.RUNNING


def schedule_speculative(sched: Scheduler, plan: PlanBuilder, in_flight: Iterable[ScheduledStep]) -> bool:
    """Mark the groups in flight as taken by ``plan`` and give the eligible sequences of the latest plan
    their speculative decodes. False (``plan`` unchanged) when their slots do not fit the free blocks."""
    step = plan.step_id
    latest: list = []
    for st in in_flight:
        latest = st.record
        for seq, _, _ in latest:
            seq.group.scheduled_step = step
    work = [seq for seq, _, sample in latest if sample and _can_speculate(sched, seq)]
    if not work:
        return True
    kv = sched.kv
    shifts = [s.num_inflight for s in work]
    for s, d in zip(work, shifts):  # the ledger's view after the plans in flight
        s.num_computed_tokens += d
    try:
        if kv.num_blocks_needed([(s, 1) for s in work]) > kv.gpu.free_queue.num_free_blocks:
            return False
        for s in work:
            ups = kv.allocate_slots(s, 1, plan.copies)
            assert ups is not None  # counted above
            plan.add(s, 1, ups, True)
    finally:
        for s, d in zip(work, shifts):
            s.num_computed_tokens -= d
    return True


def _can_speculate(sched: Scheduler, s: Sequence) -> bool:
    """Does ``s`` (sampled by the latest plan in flight) get a decode for its next, unknown token?"""
    if s.status is not _RUNNING or s.compute_limit is not None:
        return False
    g = s.group
    if g.status is not _RUNNING or g.slow_path or g.needs_fork or g.pending_forks or g.parked:
        return False
    n = len(s.token_ids) + s.inflight_samples  # its length once the plans in flight are applied
    if n - s.prompt_len >= g.max_tokens or n >= sched.max_model_len:
        return False  # the token in flight is its last (length)
    # the plans in flight compute everything but the token they sample
    return s.num_computed_tokens + s.num_inflight == n - 1
