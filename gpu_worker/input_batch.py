"""The worker's persistent per-sequence state, and a step's inputs built from it (vLLM V1's InputBatch).

Each live sequence has a ``SeqState`` (token ids, block table, computed count, sampling params, seed) and a
row in ``BlockTables``, the host int32 array that mirrors every block table: the plan only sends diffs
(new sequences, forks, block updates, appended tokens, frees), applied here, and a step's padded
``[num_seqs, max_blocks]`` table is one gather of rows instead of a Python loop over the sequences.
``InputBatch.prepare`` checks a step's scheduled entries against that state and builds its host tensors
(token ids, positions, slots, lengths) with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gpu_worker.penalty_history import PenaltyHistories
from gpu_worker.sampling_slots import SamplingSlots
from protocol import NewSequence, SamplingParams, ScheduledSequence, TokenLogprob


@dataclass
class SeqState:
    seq_id: int
    request_id: str
    seq_index: int
    prompt_len: int
    token_ids: list[int]
    block_table: list[int]
    num_computed: int
    sampling: SamplingParams
    seed: int
    # prompt logprob entry of the token right after the last computed chunk (computed from its last row)
    pending_prompt_lp: list[TokenLogprob] | None = None
    row: int = -1  # row of this sequence's block table in BlockTables
    # with a penalty: its row in the runner's PenaltyHistories, and how many of token_ids that row records
    pen_slot: int = -1
    pen_len: int = 0
    # derived from `sampling` once (hot path): greedy with nothing else to compute (one argmax does it);
    # prompt logprobs wanted
    plain_greedy: bool = False
    grammar_greedy: bool = False  # greedy and plain but for a structured output (its mask before the argmax)
    want_plp: bool = False
    grammar: Any = None  # its structured-output matcher (gpu_worker/structured_output.py SeqGrammar), if any
    # a launched step whose sampled token for this sequence is still on the device (not yet in token_ids):
    # gpu_worker/launched_step.py DeferredStep, and this sequence's index in its tokens
    pending: Any = None
    pending_idx: int = 0

    def __post_init__(self) -> None:
        p = self.sampling
        simple = (p.temperature == 0.0 and not p.use_beam_search and p.logprobs is None and p.min_tokens == 0
                  and not p.has_penalties)
        self.plain_greedy = simple and not p.has_logits_processors
        self.grammar_greedy = simple and p.structured_output is not None and not p.logit_bias
        self.want_plp = p.prompt_logprobs is not None

    def clone(self, seq_id: int, seq_index: int) -> "SeqState":
        return replace(self, seq_id=seq_id, seq_index=seq_index, token_ids=list(self.token_ids),
                       block_table=list(self.block_table), row=-1, pen_slot=-1, pen_len=0, pending=None,
                       grammar=self.grammar.copy() if self.grammar is not None else None)


class BlockTables:
    """Every live sequence's block table mirrored in one host int32 array, a row per sequence, zero
    past the table's end (as the padded per-step table always was). Rows of sequences dropped without
    ``release`` (e.g. ``runner.seqs.clear()``) are reclaimed when the free list runs dry. Entries that do
    not fit int32 are stored as -1, which the per-step range check rejects like the original value."""

    def __init__(self, width: int, rows: int = 256):
        self.arr = np.zeros((rows, max(1, width)), dtype=np.int32)
        self.free = list(range(rows - 1, -1, -1))

    def alloc(self, live_rows) -> int:
        if not self.free:
            live = set(live_rows())
            n = self.arr.shape[0]
            self.free = [r for r in range(n - 1, -1, -1) if r not in live]
            if len(self.free) < n // 4:  # grow: keep allocation amortised O(1)
                self.arr = np.concatenate([self.arr, np.zeros_like(self.arr)])
                self.free = list(range(2 * n - 1, n - 1, -1)) + self.free
        return self.free.pop()

    def release(self, row: int) -> None:
        if row >= 0:
            self.free.append(row)

    def _fit(self, n: int) -> None:
        w = self.arr.shape[1]
        if n > w:
            new = np.zeros((self.arr.shape[0], max(n, 2 * w)), dtype=np.int32)
            new[:, :w] = self.arr
            self.arr = new

    def write(self, row: int, table: list[int]) -> None:
        n = len(table)
        self._fit(n)
        r = self.arr[row]
        try:
            r[:n] = table
        except (OverflowError, ValueError, TypeError):
            r[:n] = [b if -2**31 <= b < 2**31 else -1 for b in table]
        r[n:] = 0

    def set(self, row: int, idx: int, blk: int) -> None:
        self._fit(idx + 1)
        self.arr[row, idx] = blk if -2**31 <= blk < 2**31 else -1


@dataclass
class StepInputs:
    """One step's inputs on the host: the scheduled entries' states, their new-token ranges, and the
    flat token batch with its positions and KV slots."""

    states: list[SeqState]
    starts: np.ndarray  # [S] computed count before the step
    qlens: np.ndarray  # [S] new tokens
    seq_lens: np.ndarray  # [S] context length after the step
    qsl: np.ndarray  # [S + 1] cumulative new-token counts
    block_tables: np.ndarray  # [S, max_blocks] int32, 0-padded
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] int64
    token_ids: np.ndarray  # [T] int64 (0 where ``pending_rows`` says the token is still on the device)
    decode_only: bool
    # every sampling entry samples greedily with nothing else to compute (a grammar's mask aside): no forks,
    # no prompt logprobs
    greedy: bool
    # ... and every entry samples
    plain: bool
    # a sampling entry has a structured output
    has_grammar: bool = False
    # token_ids[pending_rows[k]] is pending_step.tokens[pending_idx[k]] (a token the step before sampled
    # and the host does not have yet): ModelRunner._forward gathers them on the device
    pending_rows: np.ndarray | None = None
    pending_idx: np.ndarray | None = None
    pending_step: Any = None

    @property
    def num_tokens(self) -> int:
        return int(self.qsl[-1])


class InputBatch:
    """The live sequences of one worker (``seqs``, by seq id), their block tables, and the token histories
    of those with a penalty (``histories``), their sampling parameters (``sampling_slots``)."""

    def __init__(self, worker_id: str, block_size: int, max_model_len: int, num_gpu_blocks: int, vocab_size: int,
                 device: torch.device | str = "cpu"):
        self.worker_id = worker_id
        self.block_size, self.max_model_len = block_size, max_model_len
        self.num_gpu_blocks, self.vocab_size = num_gpu_blocks, vocab_size
        self.seqs: dict[int, SeqState] = {}
        self.tables = BlockTables(-(-max_model_len // block_size) + 1)
        self.histories = PenaltyHistories(vocab_size, torch.device(device))  # sequences with a penalty
        self.sampling_slots = SamplingSlots(torch.device(device))  # sampling parameters, by block-table row
        # resolves every deferred step (the runner's PendingTokens.resolve_all): called before reading the
        # token ids of a sequence whose newest token is still on the device, where the device cannot fill it in
        self.resolve_pending: Callable[[], None] = lambda: None

    # ---- the plan's diffs --------------------------------------------------------------------
    def free(self, seq_ids) -> None:
        for sid in seq_ids:
            st = self.seqs.pop(sid, None)
            if st is not None:
                self.tables.release(st.row)
                self.histories.release(st.pen_slot)

    def add(self, ns: NewSequence) -> None:
        if ns.seq_id in self.seqs:
            raise ValueError(f"new sequence {ns.seq_id} already exists on worker {self.worker_id}")
        if ns.num_computed_tokens > len(ns.token_ids):
            raise ValueError(f"sequence {ns.seq_id}: num_computed_tokens > len(token_ids)")
        st = SeqState(seq_id=ns.seq_id, request_id=ns.request_id, seq_index=ns.seq_index, prompt_len=ns.prompt_len,
                      token_ids=list(ns.token_ids), block_table=list(ns.block_table),
                      num_computed=ns.num_computed_tokens, sampling=ns.sampling, seed=ns.seed)
        self._place(st)

    def fork(self, parent: int, child: int, seq_index: int) -> SeqState:
        if parent not in self.seqs:
            raise ValueError(f"fork: unknown parent sequence {parent}")
        if child in self.seqs:
            raise ValueError(f"fork: child sequence {child} already exists")
        st = self.seqs[parent].clone(child, seq_index)
        self._place(st)
        return st

    def _place(self, st: SeqState) -> None:
        st.row = self.tables.alloc(self._live_rows)
        self.tables.write(st.row, st.block_table)
        self.sampling_slots.write(st.row, st.sampling)
        self.seqs[st.seq_id] = st

    def _live_rows(self):
        return [s.row for s in self.seqs.values()]

    def sync_penalty_histories(self, states: list[SeqState]) -> None:
        """Bring the penalty histories of these states (all with a penalty) up to date."""
        self.histories.sync(states, lambda: [s.pen_slot for s in self.seqs.values()])

    def _update_table(self, s: SeqState, e: ScheduledSequence) -> None:
        if e.reset_block_table is not None:
            s.block_table = list(e.reset_block_table)
            self.tables.write(s.row, s.block_table)
        bt = s.block_table
        for idx, blk in e.block_updates:
            if idx == len(bt):
                bt.append(blk)
            elif 0 <= idx < len(bt):
                bt[idx] = blk
            else:
                raise ValueError(f"sequence {e.seq_id}: block update at index {idx} but the table has {len(bt)}")
            self.tables.set(s.row, idx, blk)

    # ---- a step's inputs ---------------------------------------------------------------------
    def prepare(self, entries: list[ScheduledSequence]) -> StepInputs:
        """Apply the entries' table updates and appended tokens, check them, and build the step's inputs."""
        (states, starts_l, qlens_l, rows_l, flat, max_blocks, decode_only, greedy, all_sample, has_grammar,
         pend) = self._gather(entries)
        bs, S = self.block_size, len(entries)
        starts = np.array(starts_l, dtype=np.int64)
        qlens = np.array(qlens_l, dtype=np.int64)
        seq_lens = starts + qlens
        qsl = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(qlens, out=qsl[1:])
        T = int(qsl[-1])
        bt_np = self.tables.arr[np.array(rows_l, dtype=np.intp), :max_blocks]  # [S, max_blocks] int32, 0-padded
        if bt_np.size and (bt_np.max() >= self.num_gpu_blocks or bt_np.min() < 0):
            raise ValueError(f"block table entry out of range [0, {self.num_gpu_blocks})")
        if decode_only:
            positions = starts
            slots = bt_np[np.arange(S), positions // bs].astype(np.int64) * bs + positions % bs
        else:
            seq_of_tok = np.repeat(np.arange(S), qlens)
            positions = np.arange(T) - np.repeat(qsl[:-1] - starts, qlens)
            slots = bt_np[seq_of_tok, positions // bs].astype(np.int64) * bs + positions % bs
        ids_np = np.array(flat, dtype=np.int64)
        if ids_np.max() >= self.vocab_size or ids_np.min() < 0:
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        x = StepInputs(states, starts, qlens, seq_lens, qsl, bt_np, positions, slots, ids_np, decode_only, greedy,
                       greedy and all_sample, has_grammar)
        if pend[0]:
            x.pending_rows, x.pending_idx = np.array(pend[0], dtype=np.int64), np.array(pend[1], dtype=np.int64)
            x.pending_step = pend[2]
        return x

    def _gather(self, entries: list[ScheduledSequence]):
        """Per entry: its state (table updates and appended tokens applied), computed count, new tokens,
        block-table row; the flat new tokens; the widest table; whether the step is decode-only, greedy
        (see StepInputs), whether every entry samples, whether one has a grammar; the flat rows whose token
        is on the device."""
        seqs, bs, max_len = self.seqs, self.block_size, self.max_model_len
        states: list[SeqState] = []
        starts_l: list[int] = []
        qlens_l: list[int] = []
        rows_l: list[int] = []
        flat: list[int] = []
        max_blocks, decode_only, greedy, all_sample, has_grammar = 1, True, True, True, False
        pend_rows: list[int] = []
        pend_idx: list[int] = []
        pend_step = None
        add_state, add_start, add_qlen, add_row, add_tok = (states.append, starts_l.append, qlens_l.append,
                                                            rows_l.append, flat.append)
        for e in entries:
            s = seqs.get(e.seq_id)
            if s is None:
                raise ValueError(f"scheduled sequence {e.seq_id} is unknown to worker {self.worker_id}")
            n, c = e.num_tokens, s.num_computed
            if s.pending is not None and (n != 1 or e.append_token_ids):
                self.resolve_pending()  # the device fills in only a one-token decode's input
            if e.reset_block_table is not None or e.block_updates:
                self._update_table(s, e)
            if e.append_token_ids:
                s.token_ids.extend(e.append_token_ids)
            toks = s.token_ids
            nb = len(s.block_table)
            end = c + n
            on_device = s.pending is not None and c == len(toks)  # its input is the token in flight
            _check_entry(e, n, end, len(toks) + on_device, nb, bs, max_len)
            if greedy and not _keeps_greedy(e, s, c):
                greedy = False
            if not e.sample:
                all_sample = False
            elif s.grammar is not None:
                has_grammar = True
            add_state(s)
            add_start(c)
            add_qlen(n)
            add_row(s.row)
            if on_device:
                pend_rows.append(len(flat))
                pend_idx.append(s.pending_idx)
                pend_step = s.pending
                add_tok(0)
            elif n == 1:
                add_tok(toks[c])
            else:
                flat.extend(toks[c:end])
            if n != 1:
                decode_only = False
            if nb > max_blocks:
                max_blocks = nb
        return (states, starts_l, qlens_l, rows_l, flat, max_blocks, decode_only, greedy, all_sample, has_grammar,
                (pend_rows, pend_idx, pend_step))


def _keeps_greedy(e: ScheduledSequence, s: SeqState, c: int) -> bool:
    """Whether this entry leaves its step greedy (StepInputs.greedy): no forks, no prompt logprobs, and a
    sampling entry greedy with nothing else to compute (a grammar's mask aside)."""
    if e.fork_children or (s.want_plp and c < s.prompt_len):
        return False
    return not e.sample or s.plain_greedy or s.grammar_greedy


def _check_entry(e: ScheduledSequence, n: int, end: int, num_tokens: int, nb: int, bs: int, max_len: int) -> None:
    if n <= 0:
        raise ValueError(f"sequence {e.seq_id}: num_tokens must be positive")
    if end > num_tokens:
        raise ValueError(f"sequence {e.seq_id}: asked to compute up to token {end} but it has {num_tokens} tokens")
    if end > nb * bs:
        raise ValueError(f"sequence {e.seq_id}: {end} tokens need {-(-end // bs)} blocks, the block table has {nb}")
    if end > max_len:
        raise ValueError(f"sequence {e.seq_id}: {end} tokens exceed max_model_len {max_len}")
    if e.sample and end != num_tokens:
        raise ValueError(f"sequence {e.seq_id}: sample=True but {num_tokens - end} of its tokens are not computed yet")
