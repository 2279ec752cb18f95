"""Per-step state of the policy: the ``StepPlan`` being built, and the record of a plan in flight.

``schedule()`` fills one ``PlanBuilder`` (its token budget and the plan's lists) and keeps a
``ScheduledStep`` (what each scheduled sequence computes) until ``update()`` applies the worker's result.
Keeping both in small objects rather than on the scheduler lets several plans per worker be in flight
(pipelined scheduling, scheduler/lookahead.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.messages import ForkSequence, NewSequence, ScheduledSequence, StepPlan
from scheduler.sequence import Sequence

# (sequence, tokens computed, sampled) for each scheduled sequence, in plan order
RecordEntry = tuple[Sequence, int, bool]


@dataclass(slots=True)
class ScheduledStep:
    """A plan sent to the worker and not yet applied."""

    step_id: int
    record: list[RecordEntry]


@dataclass(slots=True)
class PlanBuilder:
    step_id: int
    budget: int  # tokens left to schedule in this step
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    forks: list[ForkSequence] = field(default_factory=list)
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    record: list[RecordEntry] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int, block_updates: list[tuple[int, int]], sample: bool,
            reset_block_table: list[int] | None = None, fork_children: list[ForkSequence] | None = None) -> None:
        """Schedule ``num_tokens`` of ``seq`` (its pending appended tokens go with them)."""
        self.scheduled.append(ScheduledSequence(
            seq_id=seq.seq_id, num_tokens=num_tokens, reset_block_table=reset_block_table,
            block_updates=block_updates, append_token_ids=seq.take_pending_append(), sample=sample,
            fork_children=fork_children if fork_children is not None else []))
        self.record.append((seq, num_tokens, sample))
        seq.num_inflight += num_tokens
        seq.inflight_samples += sample
        self.budget -= num_tokens

    def build(self, worker_id: str, freed_seq_ids: list[int]) -> StepPlan:
        return StepPlan(worker_id=worker_id, step_id=self.step_id, freed_seq_ids=freed_seq_ids,
                        swap_out=self.swap_out, swap_in=self.swap_in, block_copies=self.copies,
                        new_sequences=self.new_sequences, forks=self.forks, scheduled=self.scheduled)

    def in_flight(self) -> ScheduledStep | None:
        """What ``update()`` must apply for this plan (None: nothing was scheduled)."""
        return ScheduledStep(self.step_id, self.record) if self.record else None

    @property
    def is_empty(self) -> bool:
        """Nothing for the worker to do (no entries, transfers, new sequences or forks)."""
        return not (self.record or self.swap_out or self.swap_in or self.copies or self.new_sequences
                    or self.forks)
