"""The scheduling policy: continuous batching over the block ledger (no torch).

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
"""

from __future__ import annotations

import bisect
import heapq
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import (
    FinishReason,
    ForkSequence,
    GenerationRequest,
    NewSequence,
    RequestOutputDelta,
    ScheduledSequence,
    SequenceOutputDelta,
    StepPlan,
    StepResult,
    WorkerInfo,
)
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus



# positional builders of the hot-path messages (plain msgspec Structs: building one costs nothing to validate)
def make_scheduled(seq_id, num_tokens, block_updates, append_token_ids, sample, reset_block_table=None,
                   fork_children=None):
    return ScheduledSequence(seq_id=seq_id, num_tokens=num_tokens, block_updates=block_updates,
                             append_token_ids=append_token_ids, sample=sample, reset_block_table=reset_block_table,
                             fork_children=fork_children if fork_children is not None else [])


def make_seq_delta(index, token_ids, logprobs=None, top_logprobs=None, finish_reason=None, stop_reason=None):
    return SequenceOutputDelta(index=index, token_ids=token_ids, logprobs=logprobs, top_logprobs=top_logprobs,
                               finish_reason=finish_reason, stop_reason=stop_reason)


def make_request_delta(request_id, outputs, prompt_logprobs, num_prompt_tokens, num_cached_tokens, finished,
                       error=None):
    return RequestOutputDelta(request_id=request_id, outputs=outputs, prompt_logprobs=prompt_logprobs,
                              num_prompt_tokens=num_prompt_tokens, num_cached_tokens=num_cached_tokens,
                              finished=finished, error=error)


_RUNNING = SequenceStatus.RUNNING
_FINISHED = SequenceStatus.FINISHED
_STOP = FinishReason.STOP
_LENGTH = FinishReason.LENGTH


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
    # preemption cost model (preemption_mode="auto"); see Scheduler.preemption_costs
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
        self._watermark_blocks = int(config.watermark * worker.num_gpu_blocks)
        self._rng = random.Random()

        self.groups: dict[str, SequenceGroup] = {}  # unfinished requests
        self.seqs: dict[int, Sequence] = {}  # unfinished sequences
        self.waiting: list[SequenceGroup] = []  # heap by key (new + preempted by recompute)
        self.swapped: list[SequenceGroup] = []  # heap by key
        self.running: list[SequenceGroup] = []  # sorted by key
        self._num_running_seqs = 0  # sum of max_num_seqs of running groups
        self._next_seq_id = 0
        self._arrivals = 0
        self._step_id = 0
        self._record: list[tuple[Sequence, int, bool]] = []  # (seq, tokens computed, sampled) of the last plan
        self._record_step = 0
        self._pending_freed: list[int] = []
        self._pending_deltas: list[RequestOutputDelta] = []
        self._running_dirty = False
        # counters
        self.num_steps = 0
        self.num_preemptions_swap = 0
        self.num_preemptions_recompute = 0
        self.num_finished = 0
        self.num_aborted = 0

    # ================================================================== requests
    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id

    def add_request(self, req: GenerationRequest) -> None:
        """Queue a request. ValueError naming the problem if it is malformed or can never fit."""
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
        seed = sp.seed if sp.seed is not None else self._rng.getrandbits(63)
        self._arrivals += 1
        g = SequenceGroup(req, seed, self._arrivals, self.config.policy)
        # finish-check constants, kept on the group for the hot path
        stop = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            stop |= self.eos_token_ids
        g.stop_ids = frozenset(stop)
        g.stop_token_ids = frozenset(sp.stop_token_ids)
        g.max_tokens = sp.max_tokens
        g.min_tokens = sp.min_tokens
        g.want_logprobs = sp.logprobs is not None
        g.want_top = bool(sp.logprobs)
        g.want_prompt_logprobs = sp.prompt_logprobs is not None
        g.delta_buf = []
        g.needs_fork = sp.n > 1 and sp.beam_width == 0  # n > 1: fork the children when the prompt completes
        g.beam = sp.beam_width > 0
        # hot-path flags: one completion without prompt logprobs or beams -> one delta straight away
        g.slow_path = g.beam or g.want_prompt_logprobs
        g.single = sp.n == 1 and not g.slow_path
        g.prompt_logprobs_ready = False
        seq = Sequence(self._new_seq_id(), rid, list(prompt), n, 0, g)
        g.seqs.append(seq)
        g.live.append(seq)
        self.seqs[seq.seq_id] = seq
        self.groups[rid] = g
        heapq.heappush(self.waiting, g)

    def resume_request(self, req: GenerationRequest, output_token_ids: list[list[int]],
                       finished_indices=()) -> None:
        """Re-add a request that already generated tokens on another worker (which died): its unfinished
        completions resume by recompute from prompt + their tokens, exactly as after a preemption by
        recompute (same seed, same output positions, so sampling continues where it stopped). Added for
        the fleet's scheduler service (scheduler/service.py)."""
        done = set(finished_indices)
        n = req.sampling.n
        outs = [list(output_token_ids[i]) if i < len(output_token_ids) else [] for i in range(n)]
        if req.sampling.beam_width > 0 or not any(outs):
            self.add_request(req)  # nothing to keep (beam search reports only at the end)
            return
        self.add_request(req)  # validation and the group
        g = self.groups[req.request_id]
        first = g.live[0]
        del self.seqs[first.seq_id]
        g.seqs.clear()
        g.live.clear()
        g.forked = True  # the completions exist already: no fork at the end of the prefill
        g.needs_fork = False
        g.prompt_logprobs_done = True  # sent with the first tokens
        need = 0
        for i in range(n):
            if i in done:
                continue
            toks = list(req.prompt_token_ids) + outs[i]
            if len(toks) >= self.max_model_len:
                raise ValueError(f"request {req.request_id!r}: completion {i} already fills max_model_len")
            s = Sequence(self._new_seq_id(), req.request_id, toks, len(req.prompt_token_ids), i, g)
            g.seqs.append(s)
            g.live.append(s)
            self.seqs[s.seq_id] = s
            need += self.kv.num_blocks_for_tokens(len(toks) + 1)
        if not g.live or need > self.worker.num_gpu_blocks:
            self.groups.pop(req.request_id, None)
            for s in g.seqs:
                self.seqs.pop(s.seq_id, None)
            g.status = _FINISHED
            raise ValueError(f"request {req.request_id!r}: " + ("nothing left to resume" if not g.live else
                             f"needs {need} KV blocks to resume but the GPU pool has {self.worker.num_gpu_blocks}"))
        self._park(g)  # the completions share their prompt blocks again, as after a recompute preemption

    def abort_request(self, request_id: str) -> bool:
        """Cancel a request. Its sequences are freed in the next plan and its final delta
        (finish_reason=abort) comes out of the next ``update()``. Returns False if it is unknown/finished."""
        g = self.groups.get(request_id)
        if g is None:
            return False
        if g.use_beam_search or g.needs_fork:
            indices = list(range(g.sampling.n))
            self._drop_parked(g, FinishReason.ABORT)
        else:
            indices = sorted([s.seq_index for s in g.live] + self._drop_parked(g, FinishReason.ABORT))
        if g.status is _RUNNING:
            self.running.remove(g)
            self._num_running_seqs -= g.max_num_seqs
        for s in list(g.live):
            s.finish_reason = FinishReason.ABORT
            self._release_seq(s)
        g.live.clear()
        g.status = _FINISHED
        del self.groups[request_id]
        self.num_aborted += 1
        outs = [make_seq_delta(i, [], None, None, FinishReason.ABORT, None) for i in indices]
        self._pending_deltas.append(make_request_delta(request_id, outs, None, g.prompt_len, g.num_cached_tokens,
                                                       True))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups) or bool(self._pending_deltas)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    def _release_seq(self, s: Sequence) -> None:
        """Drop a sequence from the ledger and (if the worker knows it) tell the worker in the next plan."""
        self.kv.free(s)
        if s.registered:
            self._pending_freed.append(s.seq_id)
            s.registered = False
        s.status = _FINISHED
        self.seqs.pop(s.seq_id, None)

    # ================================================================== preemption
    def preemption_costs(self, g: SequenceGroup) -> tuple[float, float]:
        """Estimated (swap seconds, recompute seconds) to preempt and later resume ``g``.

        swap: every distinct block crosses PCIe twice (out and in): ``2 * blocks * (overhead + bytes / bw)``.
        The fixed per-block overhead is what makes small blocks inefficient to swap (PagedAttention paper,
        section 7.3 / fig. 19; seed 002 section 4.4).
        recompute: every token of every live sequence is prefilled again (forked sequences lose their
        sharing): ``tokens * ns_per_kv_byte * kv_bytes_per_token``; the KV bytes per token (layers x
        kv heads x head dim x dtype) stand in for model size, so a bigger model recomputes slower.
        With the defaults, a SmolLM2-135M block of 16 tokens is cheaper to recompute, a block of 64 to swap.
        """
        cfg = self.config
        block_bytes = self.worker.kv_block_bytes
        n_blocks = self.kv.num_unique_blocks(g.live)
        swap_s = 2.0 * n_blocks * (cfg.swap_block_overhead_us * 1e-6 + block_bytes / (cfg.swap_bandwidth_gbps * 1e9))
        n_tokens = sum(len(s.token_ids) for s in g.live)
        per_token_bytes = block_bytes / self.block_size
        recompute_s = n_tokens * per_token_bytes * cfg.recompute_ns_per_kv_byte * 1e-9
        return swap_s, recompute_s

    def _choose_mode(self, g: SequenceGroup) -> str:
        mode = self.config.preemption_mode
        if mode == "recompute":
            return "recompute"
        # a beam waiting for its siblings' candidates has nothing to compute: it cannot resume from swap
        if any(s.num_computed_tokens == len(s.token_ids) for s in g.live):
            return "recompute"
        if not self.kv.can_swap_out(g.live):  # CPU short (or none): fall back
            return "recompute"
        if mode == "swap":
            return "swap"
        swap_s, recompute_s = self.preemption_costs(g)
        return "swap" if swap_s < recompute_s else "recompute"

    def _preempt(self, g: SequenceGroup, swap_out: list) -> str:
        mode = self._choose_mode(g)
        self.running.remove(g)
        self._num_running_seqs -= g.max_num_seqs
        if mode == "swap":
            swap_out.extend(self.kv.swap_out(g.live))
            for s in g.live:
                s.status = SequenceStatus.SWAPPED
            g.status = SequenceStatus.SWAPPED
            heapq.heappush(self.swapped, g)
            self.num_preemptions_swap += 1
        else:
            for s in g.live:
                self.kv.free(s)
                if s.registered:
                    self._pending_freed.append(s.seq_id)
                    s.registered = False
                s.num_computed_tokens = 0
                s.pending_append = []  # already in token_ids: the NewSequence carries them
                s.beam_candidates = None
                s.status = SequenceStatus.WAITING
            g.pending_forks = []  # unregistered children are re-created as NewSequences
            self._park(g)
            g.status = SequenceStatus.WAITING
            heapq.heappush(self.waiting, g)
            self.num_preemptions_recompute += 1
        return mode

    @staticmethod
    def _park(g: SequenceGroup) -> None:
        """Recompute of a group with several sequences keeps their prompt sharing: only ``live[0]`` (the
        root) is re-admitted and recomputes the prompt; the others are parked and forked from it when its
        prompt is computed (``_regroup``), then each appends and recomputes its own generated tokens. So
        the group never needs more blocks than it had before (n independent prompts might never fit)."""
        if len(g.live) > 1 and all(len(s.token_ids) > g.prompt_len for s in g.live):
            root = g.live[0]
            root.compute_limit = g.prompt_len
            g.parked = g.live[1:] + g.parked
            g.live = [root]

    def _drop_parked(self, g: SequenceGroup, reason: FinishReason) -> list[int]:
        idx = []
        for p in g.parked:
            p.status = _FINISHED
            p.finish_reason = reason
            self.seqs.pop(p.seq_id, None)
            idx.append(p.seq_index)
        g.parked = []
        return idx

    def _victim(self, step: int) -> SequenceGroup | None:
        """The running group last in queue order that is not scheduled in this step."""
        running = self.running
        for i in range(len(running) - 1, -1, -1):
            if running[i].scheduled_step != step:
                return running[i]
        return None

    def _finish_for_capacity(self, g: SequenceGroup) -> None:
        """``g`` alone cannot get the blocks it needs (it outgrew the GPU pool): stop it (length). A running
        group leaves the running list here; a swapped one was already taken off its queue by the caller."""
        if g.status is _RUNNING:
            self.running.remove(g)
            self._num_running_seqs -= g.max_num_seqs
        outs = []
        parked = list(g.parked)
        self._drop_parked(g, _LENGTH)
        if g.use_beam_search:
            for s in g.live + parked:
                g.beam_completed.append((self._beam_score(g, s.token_ids, s.cumulative_logprob),
                                         list(s.token_ids), s.cumulative_logprob, _LENGTH))
            for s in list(g.live):
                self._release_seq(s)
            g.live.clear()
            outs = self._beam_outputs(g)
        else:
            for s in list(g.live):
                s.finish_reason = _LENGTH
                outs.append(make_seq_delta(s.seq_index, [], None, None, _LENGTH, None))
                self._release_seq(s)
            g.live.clear()
            outs += [make_seq_delta(p.seq_index, [], None, None, _LENGTH, None) for p in parked]
        g.status = _FINISHED
        del self.groups[g.request_id]
        self.num_finished += 1
        self._pending_deltas.append(make_request_delta(g.request_id, outs, None, g.prompt_len,
                                                       g.num_cached_tokens, True))

    # ================================================================== schedule
    @staticmethod
    def _peek(heap: list[SequenceGroup]) -> SequenceGroup | None:
        while heap and heap[0].status is _FINISHED:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def schedule(self) -> StepPlan:
        if self._record:
            raise RuntimeError(f"schedule() called again before update() for step {self._record_step}")
        self._step_id += 1
        step = self._step_id
        kv = self.kv
        bs = self.block_size
        cfg = self.config
        chunked = cfg.enable_chunked_prefill
        swap_out: list[tuple[int, int]] = []
        swap_in: list[tuple[int, int]] = []
        copies: list[tuple[int, int]] = []
        new_seqs: list[NewSequence] = []
        forks: list[ForkSequence] = []
        scheduled: list = []
        record = self._record
        budget = cfg.max_num_batched_tokens
        running = self.running
        allocate_slots = kv.allocate_slots
        tables = kv.tables
        mk_sched = make_scheduled
        sched_append = scheduled.append
        record_append = record.append

        # ---- 1. running decodes, in queue order
        i = 0
        while i < len(running):
            g = running[i]
            i += 1
            live = g.live
            if len(live) == 1:
                seq = live[0]
                c = seq.num_computed_tokens
                if len(seq.token_ids) - c != 1 or g.needs_fork or g.parked:
                    continue  # prefilling: pass 2
                blocks = tables[seq.seq_id].blocks
                if c < len(blocks) * bs and blocks[c // bs].ref_cnt == 1:
                    ups = []  # the slot is in the unshared last block
                else:
                    ups = allocate_slots(seq, 1, copies)
                while ups is None:
                    victim = self._victim(step)
                    if victim is g:
                        self._give_up(g, swap_out)
                        break
                    self._preempt(victim, swap_out)
                    ups = allocate_slots(seq, 1, copies)
                if ups is None:
                    i -= 1
                    continue
                g.scheduled_step = step
                if g.pending_forks:
                    self._emit_forks(g, forks)
                pa = seq.pending_append
                if pa:
                    seq.pending_append = []
                else:
                    pa = []
                sched_append(mk_sched(seq.seq_id, 1, ups, pa, True))
                record_append((seq, 1, True))
                budget -= 1
            else:
                work = [s for s in live if s.num_uncomputed_tokens > 0]
                if not work or any(s.num_uncomputed_tokens != 1 for s in work):
                    continue
                if not self._make_room(g, [(s, 1) for s in work], step, swap_out):
                    self._give_up(g, swap_out)
                    i -= 1
                    continue
                g.scheduled_step = step
                if g.pending_forks:
                    self._emit_forks(g, forks)
                for s in work:
                    ups = allocate_slots(s, 1, copies)
                    pa = s.pending_append
                    if pa:
                        s.pending_append = []
                    else:
                        pa = []
                    scheduled.append(make_scheduled(s.seq_id, 1, ups, pa, True))
                    record.append((s, 1, True))
                budget -= len(work)

        # ---- 2. running prefills (chunks), in queue order
        i = 0
        while i < len(running) and budget > 0:
            g = running[i]
            i += 1
            if g.scheduled_step == step:
                continue
            work = [s for s in g.live if s.num_uncomputed_tokens > 0]
            if not work:
                continue
            pairs = self._chunks(work, budget, chunked)
            if pairs is None:
                break  # the next chunk does not fit the budget (chunked prefill off)
            if not self._make_room(g, pairs, step, swap_out):
                k = self._tokens_fitting(pairs[0][0]) if len(pairs) == 1 else 0
                if k <= 0:  # nothing fits: wait, unless nothing else holds blocks
                    if len(running) == 1:
                        self._finish_for_capacity(g)
                        i -= 1
                    continue
                pairs = [(pairs[0][0], min(k, pairs[0][1]))]  # shrink the chunk to the free blocks
            g.scheduled_step = step
            if g.pending_forks:
                self._emit_forks(g, forks)
            for s, k in pairs:
                ups = allocate_slots(s, k, copies)
                assert ups is not None
                budget -= k
                self._emit_chunk(g, s, k, ups, None, scheduled, record)

        # ---- 3. admit swapped and waiting groups, in queue order, without skipping the head
        while budget > 0:
            gw = self._peek(self.waiting)
            gs = self._peek(self.swapped)
            if gw is None and gs is None:
                break
            g = gs if gw is None or (gs is not None and gs.key < gw.key) else gw
            if self._num_running_seqs + g.max_num_seqs > cfg.max_num_seqs:
                break
            # the watermark keeps room for the running groups to grow; with none running it would only block
            wm = self._watermark_blocks if running else 0
            if g is gs:
                work = [s for s in g.live if s.num_uncomputed_tokens > 0]
                if len(work) > budget:
                    break
                # every resumed sequence gets an entry (it carries reset_block_table): at least a token each
                pairs = self._chunks(work, budget, chunked, each=True)
                if pairs is None:
                    break
                # CPU tables mirror the group's sharing, so the step's need can be counted before the swap-in
                need = kv.num_unique_blocks(g.live) + kv.num_blocks_needed(pairs)
                if need > kv.gpu.num_blocks:
                    # its sequences grew apart while swapped out (or were swapped at the edge): even the whole
                    # pool cannot hold its next step, so it would wait forever; stop it as a running group
                    # that outgrows the pool is stopped
                    heapq.heappop(self.swapped)
                    self._finish_for_capacity(g)
                    continue
                if need > kv.gpu.num_free_blocks - wm:
                    break
                heapq.heappop(self.swapped)
                swap_in.extend(kv.swap_in(g.live))
                self._start_running(g, step)
                if g.pending_forks:
                    self._emit_forks(g, forks)
                for s in g.live:
                    s.status = _RUNNING
                for s, k in pairs:
                    allocate_slots(s, k, copies)
                    budget -= k
                    # the reset table already holds this step's new blocks: no block_updates
                    self._emit_chunk(g, s, k, [], kv.block_ids(s.seq_id), scheduled, record)
            else:
                admitted = self._try_admit(g, budget, chunked, wm)
                if admitted is None:
                    break
                heapq.heappop(self.waiting)
                self._start_running(g, step)
                for s, hits, k in admitted:  # take every prefix hit before any new block can evict one
                    kv.allocate_sequence(s, hits)
                    s.status = _RUNNING
                if not g.first_admitted:
                    g.num_cached_tokens = admitted[0][0].num_computed_tokens
                for s, hits, k in admitted:
                    ups = allocate_slots(s, k, copies) if k > 0 else []
                    assert ups is not None
                    s.pending_append = []
                    new_seqs.append(NewSequence(
                        seq_id=s.seq_id, request_id=s.request_id, seq_index=s.seq_index, prompt_len=s.prompt_len,
                        token_ids=s.token_ids[:s.compute_limit] if s.compute_limit is not None else list(s.token_ids),
                        num_computed_tokens=s.num_computed_tokens,
                        block_table=kv.block_ids(s.seq_id), sampling=g.sampling, seed=g.seed))
                    s.registered = True
                    if k > 0:
                        budget -= k
                        self._emit_chunk(g, s, k, [], None, scheduled, record)
                g.first_admitted = True

        freed = self._pending_freed
        self._pending_freed = []
        self._record_step = step
        self.num_steps += 1
        return StepPlan(worker_id=self.worker.worker_id, step_id=step, freed_seq_ids=freed, swap_out=swap_out,
                        swap_in=swap_in, block_copies=copies, new_sequences=new_seqs, forks=forks,
                        scheduled=scheduled)

    # ---------------------------------------------------------------- schedule helpers
    def _start_running(self, g: SequenceGroup, step: int) -> None:
        g.status = _RUNNING
        g.scheduled_step = step
        bisect.insort(self.running, g, key=lambda x: x.key)
        self._num_running_seqs += g.max_num_seqs

    @staticmethod
    def _chunks(work: list[Sequence], budget: int, chunked: bool,
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

    def _tokens_fitting(self, s: Sequence) -> int:
        """Tokens ``s`` can compute with the slots in its table plus every free block (no CoW involved)."""
        t = self.kv.get_table(s.seq_id)
        bs = self.block_size
        c = s.num_computed_tokens
        blocks = t.blocks
        first = c // bs
        if first < len(blocks) and blocks[first].ref_cnt > 1:
            return 0
        return (len(blocks) + self.kv.gpu.num_free_blocks) * bs - c

    def _make_room(self, g: SequenceGroup, pairs: list[tuple[Sequence, int]], step: int, swap_out: list) -> bool:
        """Preempt running groups after ``g`` in queue order (not scheduled this step) until ``pairs`` fit.
        False when they still do not fit with ``g`` last."""
        kv = self.kv
        while kv.num_blocks_needed(pairs) > kv.gpu.num_free_blocks:
            victim = self._victim(step)
            if victim is None or victim is g:
                return False
            self._preempt(victim, swap_out)
        return True

    def _give_up(self, g: SequenceGroup, swap_out: list) -> None:
        """``g`` is last in queue order and still short of blocks: preempt it, or, when nothing else holds
        GPU blocks, it has outgrown the pool: finish it."""
        if len(self.running) == 1:
            self._finish_for_capacity(g)
        else:
            self._preempt(g, swap_out)

    def _emit_forks(self, g: SequenceGroup, forks: list) -> None:
        for f in g.pending_forks:
            forks.append(f)
            self.seqs[f.child_seq_id].registered = True
        g.pending_forks = []

    def _emit_chunk(self, g: SequenceGroup, s: Sequence, k: int, ups, reset, scheduled: list, record: list) -> None:
        sample = s.num_computed_tokens + k == len(s.token_ids)
        pa = s.pending_append
        if pa:
            s.pending_append = []
        else:
            pa = []
        fork_children = None
        children = ()
        if sample and g.needs_fork:
            # n > 1: the prompt completes in this step; the children share all its blocks (ledger fork now,
            # the worker clones them after the compute) and sample from the same logits row
            g.needs_fork = False
            g.forked = True
            fork_children = []
            children = []
            for idx in range(1, g.sampling.n):
                child = s.fork(self._new_seq_id(), idx)
                self.kv.fork(s, child)
                child.registered = True
                g.seqs.append(child)
                g.live.append(child)
                self.seqs[child.seq_id] = child
                children.append(child)
                fork_children.append(ForkSequence(parent_seq_id=s.seq_id, child_seq_id=child.seq_id,
                                                  seq_index=idx))
        scheduled.append(make_scheduled(s.seq_id, k, ups, pa, sample, reset, fork_children))
        record.append((s, k, sample))
        for child in children:  # after the parent: update() advances them the same way
            record.append((child, k, True))

    def _try_admit(self, g: SequenceGroup, budget: int, chunked: bool, watermark: int):
        """Admission plan for a waiting group: [(seq, prefix hit blocks, tokens to compute now)], or None
        when it does not fit (budget, blocks with the watermark kept free)."""
        kv = self.kv
        bs = self.block_size
        out = []
        new_blocks = 0
        revived: set[int] = set()
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
            for b in hits:
                if b.ref_cnt == 0:
                    revived.add(b.block_id)
            new_blocks += max(0, -(-(c + k) // bs) - len(hits))
            out.append((s, hits, k))
        if not out:
            return None
        if kv.gpu.num_free_blocks - len(revived) - new_blocks < watermark:
            return None
        return out

    # ================================================================== update
    def update(self, result: StepResult) -> list[RequestOutputDelta]:
        """Apply the worker's result of the last plan; returns one delta per request with news."""
        if self._record and result.step_id != self._record_step:
            raise ValueError(f"StepResult for step {result.step_id} but the last plan was step {self._record_step}")
        deltas = self._pending_deltas
        self._pending_deltas = []
        record = self._record
        self._record = []
        if not record:
            return deltas
        if result.error is not None:
            return deltas + self._fail_step(record, result.error)
        outs = {o.seq_id: o for o in result.outputs}
        kv = self.kv
        bs = self.block_size
        caching = kv.enable_prefix_caching
        cache_blocks = kv.cache_computed_blocks
        max_len = self.max_model_len
        touched: list[SequenceGroup] = []
        beam_groups: list[SequenceGroup] = []
        mk_seq_delta, mk_req_delta, deltas_append = make_seq_delta, make_request_delta, deltas.append
        stop_reason_ok = self.eos_token_ids
        for seq, k, sample in record:
            if seq.status is _FINISHED:
                continue  # aborted while the step ran
            c = seq.num_computed_tokens + k
            seq.num_computed_tokens = c
            if caching and c // bs > seq.num_cached_blocks:
                cache_blocks(seq)
            g = seq.group
            if not sample:
                if g.parked and c == seq.compute_limit:
                    self._regroup(g)
                if g.want_prompt_logprobs and seq.seq_index == 0:
                    o = outs.get(seq.seq_id)
                    if o is not None and o.prompt_logprobs and not g.prompt_logprobs_done:
                        g.prompt_logprobs_buf.extend(o.prompt_logprobs)
                continue
            o = outs.get(seq.seq_id)
            if o is None:
                raise ValueError(f"StepResult {result.step_id} has no output for sampled sequence {seq.seq_id}")
            if g.slow_path:
                if g.want_prompt_logprobs and not g.prompt_logprobs_done and seq.seq_index == 0:
                    if o.prompt_logprobs:
                        g.prompt_logprobs_buf.extend(o.prompt_logprobs)
                    g.prompt_logprobs_ready = True
                if g.beam:
                    if o.top_logprobs is None:
                        raise ValueError(f"beam search sequence {seq.seq_id}: the worker returned no top_logprobs")
                    seq.beam_candidates = o.top_logprobs
                    if not beam_groups or beam_groups[-1] is not g:
                        beam_groups.append(g)
                    continue
            tok = o.token_id
            toks = seq.token_ids
            toks.append(tok)
            n_out = len(toks) - seq.prompt_len
            fr = sr = None
            if tok in g.stop_ids and n_out >= g.min_tokens:
                fr = _STOP
                if tok in g.stop_token_ids and not (tok in stop_reason_ok and not g.sampling.ignore_eos):
                    sr = tok
            elif n_out >= g.max_tokens or len(toks) >= max_len:
                fr = _LENGTH
            if g.want_logprobs:
                lp = o.logprob
                if lp is not None:
                    seq.cumulative_logprob += lp
                sd = mk_seq_delta(seq.seq_index, [tok], [lp], [o.top_logprobs or []] if g.want_top else None,
                                  fr, sr)
            else:
                sd = mk_seq_delta(seq.seq_index, [tok], None, None, fr, sr)
            if g.single:
                deltas_append(mk_req_delta(g.request_id, [sd], None, g.prompt_len, g.num_cached_tokens,
                                           fr is not None))
            else:
                buf = g.delta_buf
                if not buf:
                    touched.append(g)
                buf.append(sd)
            if fr is not None:
                self._finish_seq(seq, fr, sr)
        for g in beam_groups:
            if g.status is _RUNNING:
                self._beam_step(g, touched)
        for g in touched:
            buf = g.delta_buf
            g.delta_buf = []
            finished = g.status is _FINISHED
            plp = None
            if g.prompt_logprobs_ready and not g.prompt_logprobs_done:
                plp = g.prompt_logprobs_buf
                g.prompt_logprobs_buf = []
                g.prompt_logprobs_done = True
            deltas.append(make_request_delta(g.request_id, buf, plp, g.prompt_len, g.num_cached_tokens, finished))
        if self._running_dirty:
            self.running = [g for g in self.running if g.status is _RUNNING]
            self._running_dirty = False
        return deltas

    def _regroup(self, g: SequenceGroup) -> None:
        """The root of a recomputed forked group has its prompt again: fork the parked sequences from it.

        Each (root included) then appends its own generated tokens (append_token_ids) and computes them;
        the first write into the shared partial prompt block copies it, as after the original fork.
        """
        root = g.live[0]
        root.compute_limit = None
        plen = g.prompt_len
        root.pending_append = root.token_ids[plen:]
        for p in g.parked:
            p.num_computed_tokens = root.num_computed_tokens
            self.kv.fork(root, p)
            p.num_cached_blocks = root.num_cached_blocks
            p.status = _RUNNING
            p.pending_append = p.token_ids[plen:]
            p.beam_candidates = None
            self.seqs[p.seq_id] = p
            g.pending_forks.append(ForkSequence(parent_seq_id=root.seq_id, child_seq_id=p.seq_id,
                                                seq_index=p.seq_index))
            g.live.append(p)
        g.parked = []

    def _finish_seq(self, seq: Sequence, reason: FinishReason, stop_reason) -> None:
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        g = seq.group
        g.live.remove(seq)
        self._release_seq(seq)
        if not g.live:
            self._finish_group(g)

    def _finish_group(self, g: SequenceGroup) -> None:
        if g.status is _RUNNING:
            self._num_running_seqs -= g.max_num_seqs
            self._running_dirty = True
        g.status = _FINISHED
        self.groups.pop(g.request_id, None)
        self.num_finished += 1

    def _fail_step(self, record, error: str) -> list[RequestOutputDelta]:
        """The worker failed the step: every request in it finishes with an error."""
        out = []
        seen = set()
        for seq, _, _ in record:
            g = seq.group
            if g.request_id in seen or g.status is _FINISHED:
                continue
            seen.add(g.request_id)
            if g.status is _RUNNING:
                self.running.remove(g)
                self._num_running_seqs -= g.max_num_seqs
            idx = [s.seq_index for s in g.live] + self._drop_parked(g, FinishReason.ERROR)
            outs = [make_seq_delta(i, [], None, None, FinishReason.ERROR, None) for i in sorted(idx)]
            for s in list(g.live):
                s.finish_reason = FinishReason.ERROR
                self._release_seq(s)
            g.live.clear()
            g.status = _FINISHED
            self.groups.pop(g.request_id, None)
            out.append(make_request_delta(g.request_id, outs, None, g.prompt_len, g.num_cached_tokens, True,
                                          error))
        return out

    # ================================================================== beam search
    def _beam_score(self, g: SequenceGroup, tokens: list[int], cum_logprob: float) -> float:
        """vLLM's length-penalised beam score: cum_logprob / len ** length_penalty, where len counts the
        prompt and excludes a final EOS/stop token."""
        n = len(tokens)
        if tokens and tokens[-1] in g.stop_ids:
            n -= 1
        return cum_logprob / (max(n, 1) ** g.sampling.length_penalty)

    def _beam_step(self, g: SequenceGroup, touched: list) -> None:
        """All live beams have their top 2*width candidates: keep the best ``beam_width``.

        Candidates are ranked by cumulative logprob. One ending in EOS/stop among the top ``beam_width``
        becomes a finished hypothesis; the others continue (always ``beam_width`` of them while
        candidates last). The search ends when ``beam_width`` hypotheses are finished (early stopping),
        or the beams reach max_tokens / max_model_len; the best ``n`` by length-penalised score are returned.
        """
        live = g.live
        if any(s.beam_candidates is None for s in live):
            return  # some beams are still recomputing
        width = g.sampling.beam_width
        n_out = live[0].num_output_tokens
        cands = []
        for s in live:
            base = s.cumulative_logprob
            for tl in s.beam_candidates:
                cands.append((base + tl.logprob, s.seq_id, s, tl.token_id))
            s.beam_candidates = None
        cands.sort(key=lambda c: (-c[0], c[1], c[3]))
        stop_ok = n_out + 1 >= g.min_tokens
        chosen: list[tuple[float, Sequence, int]] = []
        seen: set[tuple[int, int]] = set()
        for rank, (score, _, s, tok) in enumerate(cands):
            if (s.seq_id, tok) in seen:
                continue
            seen.add((s.seq_id, tok))
            if tok in g.stop_ids:
                if stop_ok and rank < width:
                    toks = s.token_ids + [tok]
                    g.beam_completed.append((self._beam_score(g, toks, score), toks, score, _STOP))
                continue
            chosen.append((score, s, tok))
            if len(chosen) == width:
                break
        g.beam_completed.sort(key=lambda h: -h[0])
        del g.beam_completed[width:]
        length_done = n_out + 1 >= g.max_tokens or live[0].num_tokens + 1 >= self.max_model_len
        if length_done or not chosen or len(g.beam_completed) >= width:
            if length_done:
                for score, s, tok in chosen:
                    toks = s.token_ids + [tok]
                    g.beam_completed.append((self._beam_score(g, toks, score), toks, score, _LENGTH))
            for s in list(live):
                self._release_seq(s)
            live.clear()
            self._finish_group(g)
            g.delta_buf = self._beam_outputs(g)
            touched.append(g)
            return
        # reuse each chosen parent once; extra picks of the same parent fork it (before it appends)
        used: set[int] = set()
        assign: list[tuple[Sequence, int, float]] = []
        before = list(live)
        for score, s, tok in chosen:
            if s.seq_id not in used:
                used.add(s.seq_id)
                assign.append((s, tok, score))
                continue
            child = s.fork(self._new_seq_id(), g.next_seq_index)
            g.next_seq_index += 1
            self.kv.fork(s, child)
            child.status = _RUNNING
            g.seqs.append(child)
            live.append(child)
            self.seqs[child.seq_id] = child
            g.pending_forks.append(ForkSequence(parent_seq_id=s.seq_id, child_seq_id=child.seq_id,
                                                seq_index=child.seq_index))
            assign.append((child, tok, score))
        for s in before:
            if s.seq_id not in used:
                live.remove(s)
                self._release_seq(s)  # dropped beam
        for s, tok, score in assign:
            s.token_ids.append(tok)
            s.cumulative_logprob = score
            s.pending_append = [tok]

    def _beam_outputs(self, g: SequenceGroup) -> list:
        best = sorted(g.beam_completed, key=lambda h: -h[0])[: g.sampling.n]
        outs = []
        for i, (_, toks, _, reason) in enumerate(best):
            outs.append(make_seq_delta(i, toks[g.prompt_len:], None, None, reason, None))
        return outs

    # ================================================================== introspection
    def stats(self) -> dict:
        kv = self.kv
        gpu, cpu = kv.gpu, kv.cpu
        allocated, filled = kv.slot_usage()
        g_used = gpu.num_used_blocks
        c_used = cpu.num_used_blocks
        return {
            "num_gpu_blocks": gpu.num_blocks,
            "gpu_blocks_free": gpu.num_free_blocks - gpu.num_cached_free,
            "gpu_blocks_cached": gpu.num_cached_free,
            "gpu_blocks_used": g_used,
            "gpu_blocks_shared": gpu.num_shared_blocks(),
            "gpu_blocks_available": gpu.num_free_blocks,
            "gpu_usage": g_used / gpu.num_blocks if gpu.num_blocks else 0.0,
            "num_cpu_blocks": cpu.num_blocks,
            "cpu_blocks_free": cpu.num_free_blocks,
            "cpu_blocks_used": c_used,
            "cpu_blocks_shared": cpu.num_shared_blocks(),
            "cpu_blocks_cached": 0,
            "cpu_usage": c_used / cpu.num_blocks if cpu.num_blocks else 0.0,
            "block_size": self.block_size,
            "kv_block_bytes": self.worker.kv_block_bytes,
            "kv_slots_allocated": allocated,
            "kv_slots_filled": filled,
            "kv_waste_tokens": allocated - filled,
            "kv_waste_ratio": (allocated - filled) / allocated if allocated else 0.0,
            "cow_copies": kv.num_cow_copies,
            "swap_out_blocks": kv.num_swap_out_blocks,
            "swap_in_blocks": kv.num_swap_in_blocks,
            "prefix_cache_query_tokens": kv.prefix_query_tokens,
            "prefix_cache_hit_tokens": kv.prefix_hit_tokens,
            "prefix_cache_hit_rate": kv.prefix_hit_tokens / kv.prefix_query_tokens if kv.prefix_query_tokens else 0.0,
            "evictions": gpu.num_evictions,
            "preemptions_swap": self.num_preemptions_swap,
            "preemptions_recompute": self.num_preemptions_recompute,
            "preemptions": self.num_preemptions_swap + self.num_preemptions_recompute,
            "num_waiting": sum(1 for g in self.waiting if g.status is not _FINISHED),
            "num_running": len(self.running),
            "num_swapped": sum(1 for g in self.swapped if g.status is not _FINISHED),
            "num_running_seqs": sum(len(g.live) for g in self.running),
            "num_finished": self.num_finished,
            "num_aborted": self.num_aborted,
            "num_steps": self.num_steps,
        }

    def block_map(self) -> dict:
        """Per-block state for a dashboard: free | cached | used | shared (GPU), free | swapped (CPU)."""
        g_hold, c_hold = self.kv.holders()
        seqs = self.seqs

        def rids(sids):
            out = []
            for sid in sids:
                s = seqs.get(sid)
                if s is not None and s.request_id not in out:
                    out.append(s.request_id)
            return out

        gpu = []
        for b in self.kv.gpu.blocks:
            if b.ref_cnt == 0:
                state = "cached" if b.block_hash is not None else "free"
            else:
                state = "shared" if b.ref_cnt > 1 else "used"
            sids = g_hold.get(b.block_id, [])
            gpu.append({"id": b.block_id, "state": state, "ref_cnt": b.ref_cnt, "seq_ids": sids,
                        "request_ids": rids(sids), "cached": b.block_hash is not None})
        cpu = []
        for b in self.kv.cpu.blocks:
            sids = c_hold.get(b.block_id, [])
            cpu.append({"id": b.block_id, "state": "swapped" if b.ref_cnt else "free", "ref_cnt": b.ref_cnt,
                        "seq_ids": sids, "request_ids": rids(sids)})
        return {"worker_id": self.worker.worker_id, "block_size": self.block_size, "gpu": gpu, "cpu": cpu}

    def check_invariants(self) -> None:
        """Ledger + queue consistency (tests): see KVCacheManager.check_invariants."""
        self.kv.check_invariants()
        for sid, t in self.kv.tables.items():
            s = self.seqs.get(sid)
            assert s is not None and not s.is_finished, f"table of finished/unknown sequence {sid}"
        for g in self.running:
            assert g.status is _RUNNING
            for s in g.live:
                t = self.kv.get_table(s.seq_id)
                assert t is not None and t.device == "gpu", f"running seq {s.seq_id} without a GPU table"
        for g in self.swapped:
            if g.status is SequenceStatus.SWAPPED:
                for s in g.live:
                    t = self.kv.get_table(s.seq_id)
                    assert t is not None and t.device == "cpu"
        for g in self.waiting:
            if g.status is SequenceStatus.WAITING:
                for s in g.live:
                    assert self.kv.get_table(s.seq_id) is None
        for g in self.groups.values():
            for p in g.parked:
                assert self.kv.get_table(p.seq_id) is None and not p.registered
                assert g.live and g.live[0].compute_limit is not None
        assert self._num_running_seqs == sum(g.max_num_seqs for g in self.running)
