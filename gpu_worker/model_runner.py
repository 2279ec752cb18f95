"""ModelRunner: the worker side of the StepPlan / StepResult contract (protocol/messages.py).

It owns the model, the paged KV cache (ONE tensor ``[num_layers, 2, num_blocks, block_size, kv_heads,
head_dim]``, plus a CPU swap tensor of the same layout) and, per live sequence, its token ids, block
table, computed count, sampling params and seed. ``execute(plan)`` applies a plan in the documented
order and runs every scheduled sequence's new tokens (prefill chunks and decodes alike) in ONE
forward pass over a flat token batch. Errors raise; the service layer decides what to do with them.

Host-side cost matters as much as the kernels at large batches: block tables live in one int32 host array
(a row per sequence, so a step's padded table is one gather), the per-sequence loop does only what the
plan asks for, all-greedy steps sample with one argmax, and on CUDA with the Triton backend decode-only
steps replay a CUDA graph of the model forward captured per padded batch size (``_CudaGraphs``).
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from gpu_worker.attention import AttentionMetadata, get_backend
from gpu_worker.config import WorkerConfig
from gpu_worker.loader import init_random_weights, load_weights
from gpu_worker.models.llama import LlamaArgs, LlamaForCausalLM
from gpu_worker.sampler import Sampler, SampleRequest, _needs_penalty, prompt_logprobs
from protocol import SamplingParams, SequenceOutput, StepPlan, StepResult, TokenLogprob, WorkerInfo

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    row: int = -1  # row of this sequence's block table in the runner's _BlockTables
    # derived from `sampling` once (hot path): greedy with nothing else to compute (one argmax does it);
    # prompt logprobs wanted
    plain_greedy: bool = False
    want_plp: bool = False

    def __post_init__(self) -> None:
        p = self.sampling
        self.plain_greedy = (p.temperature == 0.0 and not p.use_beam_search and p.logprobs is None
                             and p.min_tokens == 0 and not _needs_penalty(p))
        self.want_plp = p.prompt_logprobs is not None

    def clone(self, seq_id: int, seq_index: int) -> "SeqState":
        return replace(self, seq_id=seq_id, seq_index=seq_index, token_ids=list(self.token_ids),
                       block_table=list(self.block_table), row=-1)


class _BlockTables:
    """Every live sequence's block table mirrored in one host int32 array, a row per sequence, zero
    past the table's end (as the padded per-step table always was). A step's padded ``[num_seqs,
    max_blocks]`` table is then one fancy-index gather instead of a Python loop over the sequences.
    Rows of sequences dropped without ``release`` (e.g. ``runner.seqs.clear()``) are reclaimed when
    the free list runs dry. Entries that do not fit int32 are stored as -1, which the per-step range
    check rejects like the original value."""

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


def _zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed KV cache. On CPU through calloc (numpy): pages are zero-filled lazily by the OS, so a
    2 GiB cache costs nothing until used. Zeros matter: masked keys must hold finite values."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(max(nbytes, 1), dtype=np.uint8))[:nbytes].view(dtype).view(shape)


def _tl(pairs) -> list[TokenLogprob]:
    return [TokenLogprob.model_construct(token_id=int(t), logprob=float(v)) for t, v in pairs]


def _seq_output_construct(seq_id, token_id, logprob, top_logprobs, prompt_logprobs):
    return SequenceOutput.model_construct(seq_id=seq_id, token_id=token_id, logprob=logprob,
                                          top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs)


def _seq_output_fast(seq_id, token_id, logprob, top_logprobs, prompt_logprobs,
                     _new=object.__new__, _set=object.__setattr__, _cls=SequenceOutput,
                     _fields=frozenset(("seq_id", "token_id", "logprob", "top_logprobs", "prompt_logprobs"))):
    """SequenceOutput.model_construct with all five fields given, without its per-call overhead (one per
    sampled sequence per step). Checked against model_construct at import (fallback if pydantic differs)."""
    o = _new(_cls)
    _set(o, "__dict__", {"seq_id": seq_id, "token_id": token_id, "logprob": logprob,
                         "top_logprobs": top_logprobs, "prompt_logprobs": prompt_logprobs})
    _set(o, "__pydantic_fields_set__", set(_fields))
    _set(o, "__pydantic_extra__", None)
    _set(o, "__pydantic_private__", None)
    return o


def _check_fast_output() -> bool:
    try:
        for args in ((3, 7, None, None, None), (4, None, None, None, [None]), (5, 9, -0.5, [], None)):
            a, b = _seq_output_fast(*args), _seq_output_construct(*args)
            if (a != b or a.__dict__ != b.__dict__ or a.__pydantic_fields_set__ != b.__pydantic_fields_set__
                    or a.__pydantic_extra__ != b.__pydantic_extra__
                    or a.__pydantic_private__ != b.__pydantic_private__ or a.model_dump() != b.model_dump()):
                return False
        return True
    except Exception:  # pragma: no cover - pydantic internals changed
        return False


_seq_output = _seq_output_fast if _check_fast_output() else _seq_output_construct


class ModelRunner:
    def __init__(self, config: WorkerConfig, worker_id: str = "worker-0"):
        from model_io.model_files import resolve_model

        self.config = config
        self.worker_id = worker_id
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = _DTYPES[config.dtype]
        self.files = resolve_model(config.model)
        self.args = LlamaArgs.from_config(self.files.config)
        self.max_model_len = int(config.max_model_len or self.args.max_position_embeddings)
        self.block_size = config.block_size

        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model = LlamaForCausalLM(self.args, max_positions=self.max_model_len, device=self.device,
                                          dtype=self.dtype)
            if self.files.is_random:
                init_random_weights(self.model, seed=config.seed)
            else:
                load_weights(self.model, self.files.path)
        self.model.eval()
        if config.quantization == "fp8":
            if self.dtype == torch.float16:
                raise ValueError("quantization fp8: the model dtype must be bfloat16 or float32")
            with torch.inference_mode():
                n = self.model.quantize_fp8()
            log.info("quantized %d linear layers to FP8", n)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the bf16 weights' memory goes to the KV cache
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            self.model.prepack_cpu()  # oneDNN weight layout: no reorder of every weight on every call
        log.info("loaded %s in %.1fs", self.files.name, time.perf_counter() - t0)

        self.backend = get_backend(config.attention_backend, self.device)
        fp8 = config.kv_cache_dtype in ("fp8", "fp8_e4m3")
        self.kv_dtype = torch.float8_e4m3fn if fp8 else self.dtype
        if fp8:
            n = self.args.num_layers
            self.model.set_kv_scales([config.kv_scale] * n, [config.kv_scale] * n)
        a = self.args
        self.kv_block_bytes = (a.num_layers * 2 * self.block_size * a.num_kv_heads * a.head_dim
                               * torch.empty(0, dtype=self.kv_dtype).element_size())
        self.num_gpu_blocks = config.num_gpu_blocks or self._auto_num_blocks()
        if config.num_cpu_blocks is not None:
            self.num_cpu_blocks = config.num_cpu_blocks
        else:
            gib = config.swap_space_gib
            if gib is None:
                gib = 4.0 if self.device.type == "cuda" else 0.5
            self.num_cpu_blocks = int(gib * (1 << 30) // self.kv_block_bytes)
        if self.device.type == "cpu":
            # head-major storage [.., num_blocks, Hkv, block_size, D] behind the usual [.., block_size, Hkv, D]
            # shape: the torch backend's per-step gather then yields per-head contiguous K/V for bmm
            # (attention/torch_backend.py, is_head_major); everything else indexes blocks and is layout-blind
            shape = (a.num_layers, 2, self.num_gpu_blocks, a.num_kv_heads, self.block_size, a.head_dim)
            self.kv_cache = _zeros(shape, self.kv_dtype, self.device).transpose(3, 4)
        else:
            shape = (a.num_layers, 2, self.num_gpu_blocks, self.block_size, a.num_kv_heads, a.head_dim)
            self.kv_cache = _zeros(shape, self.kv_dtype, self.device)
        cpu_shape = (a.num_layers, 2, self.num_cpu_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        # empty, not zeros: only blocks swapped out are ever swapped in (and zeroing pages is slow)
        self.cpu_cache = torch.empty(cpu_shape, dtype=self.kv_dtype, device="cpu",
                                     pin_memory=self.device.type == "cuda")
        self.sampler = Sampler(a.vocab_size, self.files.eos_token_ids)
        self.seqs: dict[int, SeqState] = {}
        self._bt = _BlockTables(-(-self.max_model_len // self.block_size) + 1)
        self._copy_blocks_kernel = None
        if self.device.type == "cuda":
            try:
                from kernels import copy_blocks as _cb  # type: ignore

                self._copy_blocks_kernel = _cb
            except Exception:
                self._copy_blocks_kernel = None
        self.cuda_graphs: _CudaGraphs | None = None
        if (config.enable_cuda_graphs and self.device.type == "cuda" and self.backend.name == "triton"):
            try:
                self.cuda_graphs = _CudaGraphs(self)
            except Exception:  # pragma: no cover - depends on the GPU stack
                log.exception("CUDA graph capture failed: decode steps run eagerly")
                self.cuda_graphs = None

    # ---- info --------------------------------------------------------------------------------
    @property
    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            model=self.files.name,
            device=str(self.device),
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            num_cpu_blocks=self.num_cpu_blocks,
            max_model_len=self.max_model_len,
            vocab_size=self.args.vocab_size,
            eos_token_ids=self.files.eos_token_ids,
            kv_block_bytes=self.kv_block_bytes,
            kv_cache_dtype="fp8" if self.kv_dtype == torch.float8_e4m3fn else "auto",
        )

    # ---- memory ------------------------------------------------------------------------------
    def _auto_num_blocks(self) -> int:
        if self.device.type != "cuda":
            n = int(self.config.cpu_kv_cache_gib * (1 << 30) // self.kv_block_bytes)
            # no more than 256 sequences of max_model_len tokens could use
            n = min(n, 256 * -(-self.max_model_len // self.block_size))
            return max(n, 1)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.gpu_memory_utilization - non_torch - peak
        n = int(budget // self.kv_block_bytes)
        if n <= 0:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB): raise "
                               "gpu_memory_utilization or use a smaller model")
        log.info("KV cache: %d blocks (%.2f GiB)", n, n * self.kv_block_bytes / 2**30)
        return n

    @torch.inference_mode()
    def _profile_run(self) -> None:
        a = self.args
        T = max(1, min(self.config.max_num_batched_tokens, self.max_model_len))
        nb = -(-T // self.block_size)
        kv = torch.zeros((a.num_layers, 2, nb, self.block_size, a.num_kv_heads, a.head_dim),
                         dtype=self.kv_dtype, device=self.device)
        meta = AttentionMetadata.build([T], [T], [list(range(nb))], self.block_size, self.device)
        self.backend.prepare(meta)
        ids = torch.zeros(T, dtype=torch.long, device=self.device)
        pos = torch.arange(T, device=self.device)
        h = self.model(ids, pos, kv, meta, self.backend)
        self.model.compute_logits(h[-min(T, 256):]).softmax(-1)
        del kv, h

    # ---- the step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        seqs = self.seqs
        for sid in plan.freed_seq_ids:
            st = seqs.pop(sid, None)
            if st is not None:
                self._bt.release(st.row)
        if plan.swap_out:
            self.swap_out(plan.swap_out)
        if plan.swap_in:
            self.swap_in(plan.swap_in)
        if plan.block_copies:
            self.copy_blocks(plan.block_copies)
        for ns in plan.new_sequences:
            if ns.seq_id in seqs:
                raise ValueError(f"new sequence {ns.seq_id} already exists on worker {self.worker_id}")
            if ns.num_computed_tokens > len(ns.token_ids):
                raise ValueError(f"sequence {ns.seq_id}: num_computed_tokens > len(token_ids)")
            st = SeqState(
                seq_id=ns.seq_id, request_id=ns.request_id, seq_index=ns.seq_index, prompt_len=ns.prompt_len,
                token_ids=list(ns.token_ids), block_table=list(ns.block_table),
                num_computed=ns.num_computed_tokens, sampling=ns.sampling, seed=ns.seed)
            st.row = self._bt.alloc(self._live_rows)
            self._bt.write(st.row, st.block_table)
            seqs[ns.seq_id] = st
        for f in plan.forks:
            self._fork(f.parent_seq_id, f.child_seq_id, f.seq_index)

        outputs: list[SequenceOutput] = []
        if plan.scheduled:
            outputs = self._run(plan)
        return StepResult.model_construct(
            version=plan.version, worker_id=self.worker_id, step_id=plan.step_id, outputs=outputs,
            execute_ms=(time.perf_counter() - t0) * 1e3, error=None)

    def _fork(self, parent: int, child: int, seq_index: int) -> SeqState:
        if parent not in self.seqs:
            raise ValueError(f"fork: unknown parent sequence {parent}")
        if child in self.seqs:
            raise ValueError(f"fork: child sequence {child} already exists")
        st = self.seqs[parent].clone(child, seq_index)
        st.row = self._bt.alloc(self._live_rows)
        self._bt.write(st.row, st.block_table)
        self.seqs[child] = st
        return st

    def _live_rows(self):
        return [s.row for s in self.seqs.values()]

    def _update_table(self, s: SeqState, e) -> None:
        if e.reset_block_table is not None:
            s.block_table = list(e.reset_block_table)
            self._bt.write(s.row, s.block_table)
        bt = s.block_table
        for idx, blk in e.block_updates:
            if idx == len(bt):
                bt.append(blk)
            elif 0 <= idx < len(bt):
                bt[idx] = blk
            else:
                raise ValueError(f"sequence {e.seq_id}: block update at index {idx} but the table has {len(bt)}")
            self._bt.set(s.row, idx, blk)

    def _run(self, plan: StepPlan) -> list[SequenceOutput]:
        seqs, bs, max_len = self.seqs, self.block_size, self.max_model_len
        entries = plan.scheduled
        S = len(entries)
        states: list[SeqState] = []
        starts_l: list[int] = []
        qlens_l: list[int] = []
        rows_l: list[int] = []
        flat_tokens: list[int] = []
        max_blocks = 1
        decode_only = True
        # every entry samples, greedily with nothing else to compute, no forks, no prompt logprobs
        plain = True
        add_state, add_start, add_qlen, add_row, add_tok = (states.append, starts_l.append, qlens_l.append,
                                                            rows_l.append, flat_tokens.append)
        for e in entries:
            s = seqs.get(e.seq_id)
            if s is None:
                raise ValueError(f"scheduled sequence {e.seq_id} is unknown to worker {self.worker_id}")
            if e.reset_block_table is not None or e.block_updates:
                self._update_table(s, e)
            if e.append_token_ids:
                s.token_ids.extend(e.append_token_ids)
            toks = s.token_ids
            nb = len(s.block_table)
            n, c = e.num_tokens, s.num_computed
            end = c + n
            if n <= 0:
                raise ValueError(f"sequence {e.seq_id}: num_tokens must be positive")
            if end > len(toks):
                raise ValueError(f"sequence {e.seq_id}: asked to compute up to token {end} but it has "
                                 f"{len(toks)} tokens")
            if end > nb * bs:
                raise ValueError(f"sequence {e.seq_id}: {end} tokens need {-(-end // bs)} blocks, "
                                 f"the block table has {nb}")
            if end > max_len:
                raise ValueError(f"sequence {e.seq_id}: {end} tokens exceed max_model_len {max_len}")
            if e.sample:
                if end != len(toks):
                    raise ValueError(f"sequence {e.seq_id}: sample=True but {len(toks) - end} of its tokens "
                                     "are not computed yet")
                if plain and (not s.plain_greedy or e.fork_children or (s.want_plp and c < s.prompt_len)):
                    plain = False
            else:
                plain = False
            add_state(s)
            add_start(c)
            add_qlen(n)
            add_row(s.row)
            if n == 1:
                add_tok(toks[c])
            else:
                flat_tokens.extend(toks[c:end])
                decode_only = False
            if nb > max_blocks:
                max_blocks = nb

        # ---- step tensors (host) ----
        starts = np.array(starts_l, dtype=np.int64)
        qlens = np.array(qlens_l, dtype=np.int64)
        seq_lens = starts + qlens
        qsl = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(qlens, out=qsl[1:])
        T = int(qsl[-1])
        bt_np = self._bt.arr[np.array(rows_l, dtype=np.intp), :max_blocks]  # [S, max_blocks] int32, 0-padded
        if bt_np.size and (bt_np.max() >= self.num_gpu_blocks or bt_np.min() < 0):
            raise ValueError(f"block table entry out of range [0, {self.num_gpu_blocks})")
        if decode_only:
            positions = starts
            slots = bt_np[np.arange(S), positions // bs].astype(np.int64) * bs + positions % bs
        else:
            seq_of_tok = np.repeat(np.arange(S), qlens)
            positions = np.arange(T) - np.repeat(qsl[:-1] - starts, qlens)
            slots = bt_np[seq_of_tok, positions // bs].astype(np.int64) * bs + positions % bs
        ids_np = np.array(flat_tokens, dtype=np.int64)
        if ids_np.max() >= self.args.vocab_size or ids_np.min() < 0:
            raise ValueError(f"token id out of range [0, {self.args.vocab_size})")

        dev = self.device
        graphs = self.cuda_graphs
        if decode_only and graphs is not None and S <= graphs.max_batch_size:
            hidden = graphs.forward(ids_np, positions, slots, seq_lens, bt_np)
        else:
            meta = AttentionMetadata.from_numpy(slots, bt_np, seq_lens, qlens, qsl, bs, dev)
            input_ids = torch.from_numpy(ids_np).to(dev, non_blocking=True)
            pos_t = torch.from_numpy(np.ascontiguousarray(positions)).to(dev, non_blocking=True)
            self.backend.prepare(meta)
            hidden = self.model(input_ids, pos_t, self.kv_cache, meta, self.backend)
        if decode_only:
            for s in states:
                s.num_computed += 1
        else:
            for s, n in zip(states, qlens_l):
                s.num_computed += n

        if plain:  # the common decode step: one argmax, one output per entry
            if T != S:
                hidden = hidden.index_select(0, torch.from_numpy(qsl[1:] - 1).to(dev, non_blocking=True))
            tokens = self.sampler.greedy(self.model.compute_logits(hidden))
            res = []
            out = _seq_output
            for s, tok in zip(states, tokens):
                s.token_ids.append(tok)
                res.append(out(s.seq_id, tok, None, None, None))
            return res

        # ---- rows of the logits we need: sampled rows, then prompt-logprob rows ----
        sample_entries = [i for i, e in enumerate(entries) if e.sample]
        rows = [int(qsl[i + 1]) - 1 for i in sample_entries]
        plp: list[tuple[int, int, int, int]] = []  # (entry, first row in `rows`, count, first target pos)
        for i, s in enumerate(states):
            k = s.sampling.prompt_logprobs
            if k is None:
                continue
            c = int(starts[i])
            if c >= s.prompt_len:
                continue
            hi = min(c + int(qlens[i]), s.prompt_len - 1)  # positions p in [c, hi) predict prompt token p + 1
            if hi > c:
                plp.append((i, len(rows), hi - c, c + 1))
                base = int(qsl[i]) - c
                rows.extend(range(base + c, base + hi))
        out_by_entry: dict[int, Any] = {}
        logits = None
        if rows:
            logits = self.model.compute_logits(hidden.index_select(0, torch.tensor(rows, device=dev)))
        plp_entries = [i for i, s in enumerate(states)
                       if s.sampling.prompt_logprobs is not None and int(starts[i]) < s.prompt_len]
        if plp_entries:
            self._prompt_logprobs(logits, plp, plp_entries, states, starts, qlens, out_by_entry)
        if sample_entries:
            self._sample(logits[: len(sample_entries)], sample_entries, entries, states, out_by_entry)
        for i, e in enumerate(entries):  # children of an entry that samples nothing are only cloned
            if e.fork_children and not e.sample:
                for fc in e.fork_children:
                    self._fork(e.seq_id, fc.child_seq_id, fc.seq_index)
        res: list[SequenceOutput] = []
        for i in sorted(out_by_entry):
            o = out_by_entry[i]
            if isinstance(o, list):
                res.extend(o)
            else:
                res.append(o)
        return res

    def _prompt_logprobs(self, logits, plp, plp_entries, states, starts, qlens, out_by_entry) -> None:
        computed: dict[int, list[list[TokenLogprob]]] = {}
        for (i, r0, cnt, t0) in plp:
            s = states[i]
            tgt = torch.tensor(s.token_ids[t0: t0 + cnt], device=logits.device)
            computed[i] = [_tl(e) for e in prompt_logprobs(logits[r0: r0 + cnt], tgt, s.sampling.prompt_logprobs)]
        for i in plp_entries:
            s = states[i]
            c, n = int(starts[i]), int(qlens[i])
            end = min(c + n, s.prompt_len)
            got = computed.get(i, [])
            # one entry per prompt token j in [c, end): token c's entry was computed from the previous
            # chunk's last row (pending; None for the first prompt token), the others from this chunk;
            # this chunk's last row gives the pending entry of the next chunk's first token.
            first = None if c == 0 else s.pending_prompt_lp
            s.pending_prompt_lp = got[end - c - 1] if len(got) > end - c - 1 else None
            out_by_entry[i] = SequenceOutput.model_construct(
                seq_id=s.seq_id, token_id=None, logprob=None, top_logprobs=None,
                prompt_logprobs=[first] + got[: end - c - 1])

    def _sample(self, logits, sample_entries, entries, states, out_by_entry) -> None:
        reqs: list[SampleRequest] = []
        row_of: list[int] = []
        owners: list[tuple[int, SeqState]] = []  # (entry index, state that receives the token)
        for r, i in enumerate(sample_entries):
            s = states[i]
            e = entries[i]
            p = s.sampling
            pen = p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            opos = len(s.token_ids) - s.prompt_len
            reqs.append(SampleRequest(p, s.seed, s.seq_index, opos, s.token_ids if pen else (), s.prompt_len))
            row_of.append(r)
            owners.append((i, s))
            for fc in e.fork_children:
                if fc.parent_seq_id != s.seq_id:
                    raise ValueError(f"fork child {fc.child_seq_id} names parent {fc.parent_seq_id}, "
                                     f"scheduled under {s.seq_id}")
                child = self._fork(s.seq_id, fc.child_seq_id, fc.seq_index)
                reqs.append(SampleRequest(p, child.seed, child.seq_index, opos, child.token_ids if pen else (),
                                          child.prompt_len))
                row_of.append(r)
                owners.append((i, child))
        if len(row_of) != logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(row_of, device=logits.device))
        out = self.sampler.sample(logits, reqs)
        for j, (i, s) in enumerate(owners):
            tok = out.token_ids[j]
            if not s.sampling.use_beam_search:
                s.token_ids.append(tok)
            top = out.top_logprobs[j]
            so = _seq_output(s.seq_id, tok, out.logprobs[j], None if top is None else _tl(top), None)
            prev = out_by_entry.get(i)
            if s is states[i] and isinstance(prev, SequenceOutput):
                prev.token_id, prev.logprob, prev.top_logprobs = so.token_id, so.logprob, so.top_logprobs
            elif prev is None:
                out_by_entry[i] = so
            elif isinstance(prev, list):
                prev.append(so)
            else:
                out_by_entry[i] = [prev, so]

    # ---- block movement ----------------------------------------------------------------------
    def _pairs(self, pairs, src_n: int, dst_n: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if arr.size and (arr[:, 0].min() < 0 or arr[:, 0].max() >= src_n or arr[:, 1].min() < 0
                         or arr[:, 1].max() >= dst_n):
            raise ValueError(f"{what}: block id out of range")
        return torch.from_numpy(arr[:, 0].copy()), torch.from_numpy(arr[:, 1].copy())

    def swap_out(self, pairs) -> None:
        src, dst = self._pairs(pairs, self.num_gpu_blocks, self.num_cpu_blocks, "swap_out")
        self.cpu_cache[:, :, dst] = self.kv_cache[:, :, src.to(self.device)].to("cpu")

    def swap_in(self, pairs) -> None:
        src, dst = self._pairs(pairs, self.num_cpu_blocks, self.num_gpu_blocks, "swap_in")
        data = self.cpu_cache[:, :, src]
        if self.device.type == "cuda":
            data = data.pin_memory().to(self.device, non_blocking=True)
        self.kv_cache[:, :, dst.to(self.device)] = data

    def copy_blocks(self, pairs) -> None:
        src, dst = self._pairs(pairs, self.num_gpu_blocks, self.num_gpu_blocks, "block_copies")
        if self._copy_blocks_kernel is not None:
            self._copy_blocks_kernel(self.kv_cache, torch.stack([src, dst], 1).to(self.device))
            return
        src, dst = src.to(self.device), dst.to(self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    # ---- helpers for tests and tools ---------------------------------------------------------
    def seq_state(self, seq_id: int) -> SeqState:
        return self.seqs[seq_id]

    def stats(self) -> dict[str, Any]:
        return {"num_seqs": len(self.seqs), "num_gpu_blocks": self.num_gpu_blocks,
                "num_cpu_blocks": self.num_cpu_blocks, "kv_block_bytes": self.kv_block_bytes,
                "kv_cache_bytes": self.kv_cache.numel() * self.kv_cache.element_size()}


def _default_graph_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_bs (and max_bs itself): at most 15 padding rows per step."""
    return sorted({b for b in (1, 2, 4, 8) if b < max_bs} | set(range(16, max_bs, 16)) | {max_bs})


class _CudaGraphs:
    """CUDA graphs of the model forward for decode-only steps (CUDA with the Triton backend).

    One graph per padded batch size (``WorkerConfig.cuda_graph_batch_sizes``, default 1, 2, 4, 8, 16, 32,
    ... max_num_seqs), captured right after the KV cache is allocated, largest first, into one memory pool
    (the graphs never run at the same time, so they share it). Inputs are static device buffers: token ids,
    positions, slots (-1 on padding rows: no KV write) and seq lens (0 on padding rows: no KV read, a zero
    output) as one int32 slab ``[4, max_bs]``, and block tables ``[max_bs, cdiv(max_model_len,
    block_size)]``. A step of S sequences fills a pinned host copy of the slab plus its compact ``[S,
    blocks needed]`` table, sends it with ONE host-to-device copy, scatters the table into the static
    buffer (one device copy) and replays the smallest graph >= S; rows [:S] of its output are the hidden
    states. The decode kernel's split count is fixed at capture from max_model_len (its ``max_seq_len``
    hint), so replays need no host information but these buffers. FP8 scales are baked in at capture.
    """

    def __init__(self, runner: "ModelRunner", emulate: bool = False):
        """``emulate``: no capture; each "replay" runs the model eagerly on the static buffers (tests the
        input staging on the CPU). No reference to the runner is kept (it owns this object: a cycle
        would keep the model and the graph pool alive until the cyclic GC runs)."""
        cfg = runner.config
        self.block_size, self.max_model_len = runner.block_size, runner.max_model_len
        dev = runner.device
        cuda = dev.type == "cuda"
        self.sizes = sorted({int(b) for b in (cfg.cuda_graph_batch_sizes or _default_graph_sizes(cfg.max_num_seqs))})
        self.max_batch_size = M = self.sizes[-1]
        self.width = W = -(-runner.max_model_len // runner.block_size)
        n = 4 * M + M * W
        self.host = torch.zeros(n, dtype=torch.int32, pin_memory=cuda)
        self.host_np = self.host.numpy()
        self.dev_buf = torch.zeros(n, dtype=torch.int32, device=dev)
        inp = self.dev_buf[: 4 * M].view(4, M)
        self.ids, self.pos, self.slots, self.lens = inp[0], inp[1], inp[2], inp[3]
        self.slots.fill_(-1)
        self.bt = torch.zeros((M, W), dtype=torch.int32, device=dev)
        self.qsl = torch.arange(M + 1, dtype=torch.int32, device=dev)
        # the pinned slab's last copy: wait for it before refilling the slab
        self.copied = torch.cuda.Event() if cuda else None
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self.capture_s = 0.0
        self.memory_bytes = 0
        if emulate:
            for pb in self.sizes:
                self.graphs[pb] = _EagerReplay(self, runner, pb)
            return
        self.pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(dev)[0]
        with torch.cuda.device(dev):
            self._capture_all(runner)
        free1 = torch.cuda.mem_get_info(dev)[0]
        self.capture_s = time.perf_counter() - t0
        self.memory_bytes = free0 - free1
        log.info("captured %d CUDA graphs (decode batch sizes %s) in %.1fs, %.0f MiB", len(self.graphs),
                 self.sizes, self.capture_s, self.memory_bytes / 2**20)

    def _meta(self, pb: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:pb], block_tables=self.bt[:pb], seq_lens=self.lens[:pb],
                                 query_start_loc=self.qsl[: pb + 1], max_query_len=1, max_seq_len=self.max_model_len,
                                 is_decode_only=True, block_size=self.block_size)

    @torch.inference_mode()
    def _capture_all(self, r: "ModelRunner") -> None:
        dev = r.device
        for pb in reversed(self.sizes):
            args = (self.ids[:pb], self.pos[:pb], r.kv_cache, self._meta(pb), r.backend)
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                r.model(*args)  # warm-up outside the capture: Triton compiles this size's variants here
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = r.model(*args)
            self.graphs[pb] = (g, out)
        torch.cuda.synchronize(dev)

    def forward(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
                bt: np.ndarray) -> torch.Tensor:
        S = len(ids)
        pb = self.sizes[bisect.bisect_left(self.sizes, S)]
        g, out = self.graphs[pb]
        M = self.max_batch_size
        nb = min(-(-int(seq_lens.max()) // self.block_size), bt.shape[1], self.width)  # blocks read
        h = self.host_np
        if self.copied is not None:
            self.copied.synchronize()
        v = h[: 4 * M].reshape(4, M)
        v[0, :S] = ids
        v[1, :S] = positions
        v[2, :S] = slots
        v[3, :S] = seq_lens
        if pb > S:
            v[0:2, S:pb] = 0
            v[2, S:pb] = -1
            v[3, S:pb] = 0
        off = 4 * M
        end = off + S * nb
        h[off:end].reshape(S, nb)[:] = bt[:, :nb]
        self.dev_buf[:end].copy_(self.host[:end], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.bt[:S, :nb].copy_(self.dev_buf[off:end].view(S, nb))
        g.replay()
        return out[:S]


class _EagerReplay:
    """Stands in for a captured graph (``_CudaGraphs(emulate=True)``): runs the forward eagerly on the
    static buffers. The torch backend needs int64 slots and its per-step prepare."""

    def __init__(self, graphs: _CudaGraphs, runner: "ModelRunner", pb: int):
        self.g, self.r, self.pb = graphs, runner, pb
        self.calls = 0
        r = runner
        self.out = torch.empty((pb, r.args.hidden_size), dtype=r.dtype, device=r.device)

    def __iter__(self):  # unpacks like the (graph, output) pairs
        return iter((self, self.out))

    @torch.inference_mode()
    def replay(self) -> None:
        g, pb, r = self.g, self.pb, self.r
        self.calls += 1
        meta = replace(g._meta(pb), extras={})
        if r.backend.name == "torch":
            meta.slot_mapping = meta.slot_mapping.long()
        r.backend.prepare(meta)
        self.out.copy_(r.model(g.ids[:pb], g.pos[:pb], r.kv_cache, meta, r.backend))
