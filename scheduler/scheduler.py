"""The scheduling policy's facade: continuous batching over the block ledger (no torch).

One ``Scheduler`` per worker. Each ``schedule()`` builds one ``StepPlan`` (see protocol/messages.py for
how the worker applies it); ``update(StepResult)`` advances the sequences, makes finish decisions and
returns one ``RequestOutputDelta`` per request that has news.

Policy (docs/scheduler.md explains it at length):

* iteration-level batching under a token budget (``max_num_batched_tokens``) and ``max_num_seqs``;
  every step: (1) running decodes, (2) running prefills (chunked: a long prompt is computed over several
  steps), (3) admission of preempted (swapped or recompute) and waiting groups in queue order.
* queue order: FCFS by arrival, or by ``(priority, arrival)`` under the priority policy. The queue is never
  skipped: when its head does not fit, nothing behind it is admitted this step.
* preemption when a running group needs a block and none is free: whole groups (all-or-nothing), the
  running group last in queue order (latest arrival / lowest priority) that is not already scheduled this
  step, possibly the group itself. Recovery by swap or by recompute, chosen per preemption by cost.

The facade owns the state (the ledger, the queues, the sequences); the concepts live in their own
modules: admission.py (chunks, admission), preemption.py, forking.py (n > 1, parking, beams),
output.py (results -> finish checks -> deltas), stats.py, queues.py and plan_builder.py (per-step state).
"""

from __future__ import annotations

import collections
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import FinishReason, GenerationRequest, RequestOutputDelta, StepPlan, StepResult, WorkerInfo
from scheduler import admission, forking, lookahead, output, preemption, stats
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.plan_builder import PlanBuilder, ScheduledStep
from scheduler.queues import RequestQueues
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus
from scheduler.stats import SchedulerStats

_RUNNING = SequenceStatus.RUNNING
_FINISHED = SequenceStatus.FINISHED


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_seqs: int = Field(256, ge=1, description="sequences running at once")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens computed per step")
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    preemption_mode: Literal["auto", "swap", "recompute"] = "auto"
    max_model_len: int | None = Field(None, ge=2, description="None: the worker's")
    watermark: float = Field(0.01, ge=0.0, lt=1.0, description="share of GPU blocks kept free at admission")
    # preemption cost model (preemption_mode="auto"); see preemption.preemption_costs
    swap_bandwidth_gbps: float = Field(25.0, gt=0, description="host<->device copy bandwidth, GB/s (PCIe 4 x16)")
    swap_block_overhead_us: float = Field(25.0, ge=0, description="fixed cost per block copied, per direction")
    recompute_ns_per_kv_byte: float = Field(
        0.15, ge=0, description="prefill time per token = this * KV bytes per token (a model-size proxy)")


class Scheduler:
    def __init__(self, config: SchedulerConfig | None, worker: WorkerInfo) -> None:
        config = config or SchedulerConfig()
        self.config = config
        self.worker = worker
        self.block_size = worker.block_size
        max_len = config.max_model_len or worker.max_model_len
        if max_len > worker.max_model_len:
            raise ValueError(f"max_model_len {max_len} exceeds the worker's {worker.max_model_len}")
        self.max_model_len = max_len
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({config.max_num_seqs}) so every running decode fits in a step")
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({config.max_num_batched_tokens}) "
                             f"must be >= max_model_len ({max_len})")
        if worker.num_gpu_blocks < 1:
            raise ValueError("the worker has no GPU blocks")
        self.kv = KVCacheManager(worker.num_gpu_blocks, worker.block_size, worker.num_cpu_blocks,
                                 config.enable_prefix_caching)
        self.eos_token_ids = frozenset(worker.eos_token_ids)
        self.watermark_blocks = int(config.watermark * worker.num_gpu_blocks)
        self._rng = random.Random()

        self.groups: dict[str, SequenceGroup] = {}  # unfinished requests
        self.seqs: dict[int, Sequence] = {}  # unfinished sequences
        self.queues = RequestQueues()
        self._next_seq_id = 0
        self._arrivals = 0
        self._step_id = 0
        # the plans sent and not yet applied, oldest first (more than one only when pipelined: schedule_ahead)
        self._in_flight: collections.deque[ScheduledStep] = collections.deque()
        self._pending_freed: list[int] = []  # sequences the worker must drop in the next plan
        self.pending_deltas: list[RequestOutputDelta] = []  # final deltas made outside a step's results
        # counters
        self.num_steps = 0
        self.num_steps_ahead = 0  # of them, planned ahead of the results in flight (pipelined)
        self.num_preemptions_swap = 0
        self.num_preemptions_recompute = 0
        self.num_finished = 0
        self.num_aborted = 0

    # ================================================================== queues (read-only views)
    @property
    def running(self) -> list[SequenceGroup]:
        return self.queues.running

    @property
    def waiting(self) -> list[SequenceGroup]:
        return self.queues.waiting

    @property
    def swapped(self) -> list[SequenceGroup]:
        return self.queues.swapped

    # ================================================================== requests
    def new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id

    def _validate(self, req: GenerationRequest) -> None:
        """ValueError naming the problem if the request is malformed or can never fit."""
        rid = req.request_id
        if rid in self.groups:
            raise ValueError(f"request {rid!r}: a request with this id is already running")
        prompt = req.prompt_token_ids
        n = len(prompt)
        if n == 0:
            raise ValueError(f"request {rid!r}: the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"request {rid!r}: prompt of {n} tokens does not fit max_model_len "
                             f"{self.max_model_len} (it must leave room for at least one generated token)")
        vocab = self.worker.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"request {rid!r}: prompt token ids must be in [0, {vocab})")
        sp = req.sampling
        width = sp.beam_width if sp.beam_width > 0 else sp.n
        if width > self.config.max_num_seqs:
            raise ValueError(f"request {rid!r}: needs {width} sequences but max_num_seqs is "
                             f"{self.config.max_num_seqs}")
        need = self.kv.num_blocks_for_tokens(n + 1) + (width - 1)
        if need > self.worker.num_gpu_blocks:
            raise ValueError(f"request {rid!r}: needs {need} KV blocks of {self.block_size} tokens but the GPU "
                             f"pool has only {self.worker.num_gpu_blocks}: it can never fit")

    def add_request(self, req: GenerationRequest) -> None:
        """Queue a request. ValueError naming the problem if it is malformed or can never fit."""
        self._validate(req)
        sp = req.sampling
        seed = sp.seed if sp.seed is not None else self._rng.getrandbits(63)
        self._arrivals += 1
        g = SequenceGroup(req, seed, self._arrivals, self.config.policy, self.eos_token_ids)
        seq = Sequence(self.new_seq_id(), req.request_id, list(req.prompt_token_ids), g.prompt_len, 0, g)
        g.seqs.append(seq)
        g.live.append(seq)
        self.seqs[seq.seq_id] = seq
        self.groups[req.request_id] = g
        self.queues.push_waiting(g)

    def resume_request(self, req: GenerationRequest, output_token_ids: list[list[int]],
                       finished_indices=()) -> None:
        """Re-add a request that already generated tokens on another worker (which died): its unfinished
        completions resume by recompute from prompt + their tokens, exactly as after a preemption by
        recompute (same seed, same output positions, so sampling continues where it stopped). Added for
        the fleet's scheduler service (scheduler/service.py)."""
        done = set(finished_indices)
        n = req.sampling.n
        outs = [list(output_token_ids[i]) if i < len(output_token_ids) else [] for i in range(n)]
        self.add_request(req)  # validation and the group
        if req.sampling.beam_width > 0 or not any(outs):
            return  # nothing to keep (beam search reports only at the end)
        g = self.groups[req.request_id]
        del self.seqs[g.live[0].seq_id]
        g.seqs.clear()
        g.live.clear()
        g.needs_fork = False  # the completions exist already: no fork at the end of the prefill
        g.prompt_logprobs_done = True  # sent with the first tokens
        need = 0
        for i in range(n):
            if i in done:
                continue
            toks = list(req.prompt_token_ids) + outs[i]
            if len(toks) >= self.max_model_len:
                raise ValueError(f"request {req.request_id!r}: completion {i} already fills max_model_len")
            s = Sequence(self.new_seq_id(), req.request_id, toks, len(req.prompt_token_ids), i, g)
            g.seqs.append(s)
            g.live.append(s)
            self.seqs[s.seq_id] = s
            need += self.kv.num_blocks_for_tokens(len(toks) + 1)
        if not g.live or need > self.worker.num_gpu_blocks:
            self.groups.pop(req.request_id, None)
            for s in g.seqs:
                self.seqs.pop(s.seq_id, None)
            self.queues.remove(g)
            g.status = _FINISHED
            raise ValueError(f"request {req.request_id!r}: " + ("nothing left to resume" if not g.live else
                             f"needs {need} KV blocks to resume but the GPU pool has {self.worker.num_gpu_blocks}"))
        forking.park(g)  # the completions share their prompt blocks again, as after a recompute preemption

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request. Its sequences are freed in the next plan and its final delta
        (finish_reason=abort) comes out of the next ``update()``. Returns False if it is unknown/finished."""
        g = self.groups.get(request_id)
        if g is None:
            return False
        all_indices = g.use_beam_search or g.needs_fork  # the completions are not (all) created yet
        indices = output.end_group(self, g)
        if all_indices:
            indices = range(g.sampling.n)
        self.num_aborted += 1
        self.pending_deltas.append(output.final_delta(g, output.ended(sorted(indices), FinishReason.ABORT)))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups) or bool(self.pending_deltas)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ================================================================== sequence lifecycle
    def unregister(self, s: Sequence) -> None:
        """Drop a sequence's blocks and (if the worker knows it) tell the worker in the next plan."""
        self.kv.free(s)
        if s.registered:
            self._pending_freed.append(s.seq_id)
            s.registered = False

    def release_seq(self, s: Sequence) -> None:
        """A sequence is done: out of the ledger, the worker and the scheduler."""
        self.unregister(s)
        s.status = _FINISHED
        self.seqs.pop(s.seq_id, None)

    def finish_group(self, g: SequenceGroup) -> None:
        """The last sequence of ``g`` finished while the step's results are applied."""
        if g.status is _RUNNING:
            self.queues.finish_running(g)
        g.status = _FINISHED
        self.groups.pop(g.request_id, None)
        self.num_finished += 1

    # ================================================================== schedule / update
    def schedule(self) -> StepPlan:
        """One step: (1) running decodes, (2) running prefill chunks, (3) admission, in queue order."""
        if self._in_flight:
            raise RuntimeError(f"schedule() called again before update() for step {self._in_flight[-1].step_id}"
                               " (schedule_ahead() plans while steps are in flight)")
        self._step_id += 1
        plan = PlanBuilder(self._step_id, self.config.max_num_batched_tokens)
        self._schedule_passes(plan)
        step = plan.in_flight()
        if step is not None:
            self._in_flight.append(step)
        return self._finish_plan(plan)

    def schedule_ahead(self) -> StepPlan | None:
        """Pipelined scheduling: the next plan while the earlier ones run, assuming every sequence they
        sample gets its token (scheduler/lookahead.py). None: no plan can be made ahead (nothing to do, or a
        step that needs the results first): apply the oldest result with ``update()``, then plan again."""
        if not self._in_flight:
            return self.schedule()
        self._step_id += 1
        plan = PlanBuilder(self._step_id, self.config.max_num_batched_tokens)
        if not lookahead.schedule_speculative(self, plan, self._in_flight):
            return None
        self._schedule_passes(plan)
        if plan.is_empty:
            return None  # (the step id stays used: the in-flight groups are marked with it)
        self._in_flight.append(plan.in_flight() or ScheduledStep(plan.step_id, []))
        self.num_steps_ahead += 1
        return self._finish_plan(plan)

    @property
    def num_in_flight(self) -> int:
        """Plans sent and not yet applied by ``update()``."""
        return len(self._in_flight)

    def _schedule_passes(self, plan: PlanBuilder) -> None:
        self._schedule_decodes(plan)
        admission.schedule_prefills(self, plan)
        admission.admit_queued(self, plan)

    def _finish_plan(self, plan: PlanBuilder) -> StepPlan:
        freed = self._pending_freed
        self._pending_freed = []
        self.num_steps += 1
        return plan.build(self.worker.worker_id, freed)

    def _schedule_decodes(self, plan: PlanBuilder) -> None:
        """Pass 1: every running group whose sequences to compute each have exactly one token (a decode)
        gets its slots, preempting groups after it in queue order when blocks are short."""
        running = self.queues.running
        kv = self.kv
        step = plan.step_id
        i = 0
        while i < len(running):
            g = running[i]
            i += 1
            if g.needs_fork or g.parked or g.scheduled_step == step:
                continue  # prefilling: pass 2 (or, pipelined, in a plan in flight)
            work = [(s, 1) for s in g.live if s.num_uncomputed_tokens > 0]
            if not work or any(s.num_uncomputed_tokens != 1 for s, _ in work):
                continue
            ups = kv.allocate_group_slots(work, plan.copies)
            while ups is None:
                victim = self.queues.victim(step)
                if victim is None or victim is g:
                    preemption.give_up(self, g, plan.swap_out)
                    break
                preemption.preempt(self, victim, plan.swap_out)
                ups = kv.allocate_group_slots(work, plan.copies)
            if ups is None:
                i -= 1  # g left the running list
                continue
            g.scheduled_step = step
            if g.pending_forks:
                forking.emit_forks(self, g, plan)
            for (s, _), u in zip(work, ups):
                plan.add(s, 1, u, True)

    def update(self, result: StepResult) -> list[RequestOutputDelta]:
        """Apply the worker's result of the oldest plan in flight; returns one delta per request with news."""
        step = self._in_flight[0] if self._in_flight else None
        if step is not None and result.step_id != step.step_id:
            raise ValueError(f"StepResult for step {result.step_id} but the oldest plan in flight is step "
                             f"{step.step_id}")
        if step is not None:
            self._in_flight.popleft()
        deltas = self.pending_deltas
        self.pending_deltas = []
        if step is None:
            return deltas
        if result.error is not None:
            return deltas + output.fail_step(self, step.record, result.error)
        return deltas + output.apply_result(self, step, result)

    # ================================================================== queries
    @property
    def num_free_blocks(self) -> int:
        """GPU blocks a new request can take (free plus cached-but-evictable)."""
        return self.kv.num_free_blocks

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens this worker's prefix cache already holds (whole blocks); no side effects."""
        return self.kv.num_cached_prefix_tokens(token_ids)

    def request_status(self, request_id: str) -> SequenceStatus | None:
        """Where a request's group stands (waiting, running, swapped, finished); None if unknown."""
        g = self.groups.get(request_id)
        return None if g is None else g.status

    def preemption_costs(self, g: SequenceGroup) -> tuple[float, float]:
        """Estimated (swap seconds, recompute seconds) to preempt and later resume ``g``."""
        return preemption.preemption_costs(self.config, self.worker, self.kv, g)

    def _choose_mode(self, g: SequenceGroup) -> str:
        return preemption.choose_mode(self.config, self.worker, self.kv, g)

    def get_stats(self) -> SchedulerStats:
        return stats.collect_stats(self)

    def stats(self) -> dict:
        return stats.collect_stats(self).as_dict()

    def block_map(self) -> dict:
        """Per-block state for a dashboard: free | cached | used | shared (GPU), free | swapped (CPU)."""
        return stats.block_map(self)

    def check_invariants(self) -> None:
        """Ledger + queue consistency (tests): see KVCacheManager.check_invariants."""
        kv = self.kv
        kv.check_invariants()
        for sid in kv.tables:
            s = self.seqs.get(sid)
            assert s is not None and not s.is_finished, f"table of finished/unknown sequence {sid}"
        q = self.queues
        for g in q.running:
            assert g.status is _RUNNING
            for s in g.live:
                t = kv.get_table(s.seq_id)
                assert t is not None and t.device == "gpu", f"running seq {s.seq_id} without a GPU table"
        for g in q.swapped:
            if g.status is SequenceStatus.SWAPPED:
                for s in g.live:
                    t = kv.get_table(s.seq_id)
                    assert t is not None and t.device == "cpu"
        for g in q.waiting:
            if g.status is SequenceStatus.WAITING:
                for s in g.live:
                    assert kv.get_table(s.seq_id) is None
        for g in self.groups.values():
            for p in g.parked:
                assert kv.get_table(p.seq_id) is None and not p.registered
                assert g.live and g.live[0].compute_limit is not None
        q.check_counts()
