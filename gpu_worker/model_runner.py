"""ModelRunner: the worker side of the StepPlan / StepResult contract (protocol/messages.py).

It owns the model and the paged KV cache (ONE tensor ``[num_layers, 2, num_blocks, block_size, kv_heads,
head_dim]``, plus a CPU swap tensor of the same layout); the live sequences' state is its InputBatch
(gpu_worker/input_batch.py). ``execute(plan)`` applies a plan in the documented order and runs every
scheduled sequence's new tokens (prefill chunks and decodes alike) in ONE forward pass over a flat token
batch; gpu_worker/step_outputs.py turns the sampled tokens into the StepResult. Errors raise; the service
layer decides what to do with them.

Host-side cost matters as much as the kernels at large batches: the per-sequence loop does only what the
plan asks for, all-greedy steps sample with one argmax, and on CUDA with the Triton backend decode-only
steps replay a CUDA graph of the model forward captured per padded batch size (gpu_worker/cuda_graphs.py).
With ``measure_transfers`` set (the worker service sets it when it serves metrics), each step's batched KV
transfers are timed into ``last_transfer_s``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from gpu_worker import distributed
from gpu_worker.attention import AttentionMetadata, get_backend
from gpu_worker.attention.metadata import host_to_device as _h2d
from gpu_worker.config import WorkerConfig
from gpu_worker.cuda_graphs import CudaGraphs
from gpu_worker.input_batch import InputBatch, SeqState, StepInputs
from gpu_worker.launched_step import DeferredStep, DoneStep, PendingTokens
from gpu_worker.loader import init_random_weights, load_weights
from gpu_worker.models.llama import LlamaArgs, LlamaForCausalLM
from gpu_worker.prompt_logprobs import prompt_logprob_outputs, prompt_logprob_rows
from gpu_worker.sampler import Sampler, SampleRequest
from gpu_worker.structured_output import GrammarMasks, GrammarStep
from model_io.grammar import GrammarCompiler
from gpu_worker.step_outputs import StepOutputs, step_result
from gpu_worker.warmup import mixed_step, warm_up
from protocol import ScheduledSequence, SequenceOutput, StepPlan, StepResult, WorkerInfo

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed KV cache. On CPU through calloc (numpy): pages are zero-filled lazily by the OS, so a
    2 GiB cache costs nothing until used. Zeros matter: masked keys must hold finite values."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(max(nbytes, 1), dtype=np.uint8))[:nbytes].view(dtype).view(shape)


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
        # tensor parallel: this process is rank tp_rank of a group gpu_worker/tp_group.py started
        self.tp_size, self.tp_rank = config.tensor_parallel_size, distributed.tp_rank()
        if self.tp_size != distributed.tp_size():
            raise RuntimeError(f"tensor_parallel_size {self.tp_size}: this process is in a group of "
                               f"{distributed.tp_size()} (start the group with gpu_worker.tp_group)")
        self.args.check_tensor_parallel(self.tp_size)
        self.num_kv_heads = self.args.num_kv_heads // self.tp_size  # this rank's KV heads of every block
        self.max_model_len = int(config.max_model_len or self.args.max_position_embeddings)
        self.block_size = config.block_size
        self._load_model()
        self.backend = get_backend(config.attention_backend, self.device)
        self._allocate_kv_cache()
        self.sampler = Sampler(self.args.vocab_size, self.files.eos_token_ids)
        self.batch = InputBatch(worker_id, self.block_size, self.max_model_len, self.num_gpu_blocks,
                                self.args.vocab_size, self.device)
        self.pending = PendingTokens()  # greedy steps launched whose tokens are still on the device
        self.batch.resolve_pending = self.pending.resolve_all
        self._grammars: GrammarCompiler | None = None  # built at the first structured-output request
        self.measure_transfers = False
        self.last_transfer_s: dict[str, float] = {}  # seconds per KV transfer op of the last step (if measured)
        self._copy_blocks_kernel = None
        if self.device.type == "cuda":
            try:
                from kernels import copy_blocks as _cb  # type: ignore

                self._copy_blocks_kernel = _cb
            except Exception:
                self._copy_blocks_kernel = None
        self.cuda_graphs: CudaGraphs | None = None
        if (config.enable_cuda_graphs and self.device.type == "cuda" and self.backend.name == "triton"):
            try:
                self.cuda_graphs = CudaGraphs(self)
            except Exception:  # pragma: no cover - depends on the GPU stack
                log.exception("CUDA graph capture failed: decode steps run eagerly")
                self.cuda_graphs = None
        self.kernel_warm_up_s: float | None = None  # how long the start-up warm-up took, when it ran
        if config.warm_up_kernels or (config.warm_up_kernels is None and self.device.type == "cuda"):
            try:
                self.kernel_warm_up_s = warm_up(self)
                log.info("kernels warmed up in %.2fs", self.kernel_warm_up_s)
            except Exception:  # pragma: no cover - a failed warm-up costs only the stalls it would save
                log.exception("kernel warm-up failed: the step loop loads kernels as it meets them")

    @property
    def seqs(self) -> dict[int, SeqState]:
        """The live sequences, by seq id (``seqs.clear()`` drops them all)."""
        return self.batch.seqs

    # ---- load --------------------------------------------------------------------------------
    def _load_model(self) -> None:
        config = self.config
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model = LlamaForCausalLM(self.args, max_positions=self.max_model_len, device=self.device,
                                          dtype=self.dtype, tp_rank=self.tp_rank, tp_size=self.tp_size)
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

    # ---- KV cache ----------------------------------------------------------------------------
    def _allocate_kv_cache(self) -> None:
        config, a = self.config, self.args
        fp8 = config.kv_cache_dtype in ("fp8", "fp8_e4m3")
        self.kv_dtype = torch.float8_e4m3fn if fp8 else self.dtype
        if fp8:
            n = a.num_layers
            self.model.set_kv_scales([config.kv_scale] * n, [config.kv_scale] * n)
        kv_heads = self.num_kv_heads
        self.kv_block_bytes = (a.num_layers * 2 * self.block_size * kv_heads * a.head_dim
                               * torch.empty(0, dtype=self.kv_dtype).element_size())  # this rank's share
        # every rank of a group holds the same blocks: as many as fit on the fullest device
        self.num_gpu_blocks = config.num_gpu_blocks or distributed.min_int(self._auto_num_blocks())
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
            shape = (a.num_layers, 2, self.num_gpu_blocks, kv_heads, self.block_size, a.head_dim)
            self.kv_cache = _zeros(shape, self.kv_dtype, self.device).transpose(3, 4)
        else:
            shape = (a.num_layers, 2, self.num_gpu_blocks, self.block_size, kv_heads, a.head_dim)
            self.kv_cache = _zeros(shape, self.kv_dtype, self.device)
        cpu_shape = (a.num_layers, 2, self.num_cpu_blocks, self.block_size, kv_heads, a.head_dim)
        # empty, not zeros: only blocks swapped out are ever swapped in (and zeroing pages is slow)
        self.cpu_cache = torch.empty(cpu_shape, dtype=self.kv_dtype, device="cpu",
                                     pin_memory=self.device.type == "cuda")

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
            kv_block_bytes=self.kv_block_bytes * self.tp_size,  # the group's bytes of one block
            kv_cache_dtype="fp8" if self.kv_dtype == torch.float8_e4m3fn else "auto",
            tensor_parallel_size=self.tp_size,
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
        """The largest step the scheduler may send: max_num_batched_tokens tokens, some decodes and prefill
        chunks of up to max_model_len tokens each (a step's tokens may exceed one sequence's length)."""
        a = self.args
        T = max(1, self.config.max_num_batched_tokens)
        meta, nb = mixed_step(T, self.max_model_len, self.block_size, self.device)
        kv = torch.zeros((a.num_layers, 2, nb, self.block_size, self.num_kv_heads, a.head_dim),
                         dtype=self.kv_dtype, device=self.device)
        self.backend.prepare(meta)
        ids = torch.zeros(T, dtype=torch.long, device=self.device)
        pos = torch.arange(T, device=self.device) % self.max_model_len  # T may outnumber one sequence's positions
        h = self.model(ids, pos, kv, meta, self.backend)
        self.model.compute_logits(h[-min(T, 256):]).softmax(-1)
        del kv, h

    # ---- the step ----------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one plan to its result (the sampled tokens on the host)."""
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> DeferredStep | DoneStep:
        """Apply a plan and queue its GPU work. A greedy step returns before its tokens reach the host
        (gpu_worker/launched_step.py): the next plan can be launched right behind it; ``result()`` waits."""
        t0 = time.perf_counter()
        with self.pending.lock:
            self.pending.resolve_all(keep_latest=True)  # only the newest step's tokens are read on the device
            batch = self.batch
            batch.free(plan.freed_seq_ids)
            self.last_transfer_s = {}
            if plan.swap_out:
                self._transfer("swap_out", self.swap_out, plan.swap_out)
            if plan.swap_in:
                self._transfer("swap_in", self.swap_in, plan.swap_in)
            if plan.block_copies:
                self._transfer("copy", self.copy_blocks, plan.block_copies)
            for ns in plan.new_sequences:
                batch.add(ns)
            if plan.forks:
                self.pending.resolve_all()  # a child copies its parent's tokens
            for f in plan.forks:
                batch.fork(f.parent_seq_id, f.child_seq_id, f.seq_index)
            if not plan.scheduled:
                return DoneStep(step_result(plan, self.worker_id, [], t0))
            out = self._run(plan)
            if isinstance(out, list):
                return DoneStep(step_result(plan, self.worker_id, out, t0))
            states, tokens, finish = out
            step = DeferredStep(self.pending, plan, self.worker_id, t0, states, tokens, finish)
            self.pending.add(step)
            return step

    def _transfer(self, op: str, fn, pairs) -> None:
        """One batched KV transfer; timed into ``last_transfer_s`` when ``measure_transfers`` is set. On
        CUDA the copies are asynchronous: synchronize before (nothing earlier is counted) and after."""
        if not self.measure_transfers:
            fn(pairs)
            return
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        fn(pairs)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.last_transfer_s[op] = self.last_transfer_s.get(op, 0.0) + (time.perf_counter() - t)

    def _forward(self, x: StepInputs) -> torch.Tensor:
        """Hidden states of the step's new tokens (a CUDA graph replay for decode-only steps that fit). Input
        tokens still on the device (``x.pending_rows``) are gathered there from the step that sampled them."""
        dev, graphs = self.device, self.cuda_graphs
        on_device = None
        if x.pending_rows is not None:
            on_device = (_h2d(x.pending_rows, dev), x.pending_step.tokens.index_select(0, _h2d(x.pending_idx, dev)))
        if x.decode_only and graphs is not None and len(x.states) <= graphs.max_batch_size:
            return graphs.forward(x.token_ids, x.positions, x.slots, x.seq_lens, x.block_tables, on_device)
        meta = AttentionMetadata.from_numpy(x.slots, x.block_tables, x.seq_lens, x.qlens, x.qsl, self.block_size, dev)
        input_ids = _h2d(x.token_ids, dev)
        if on_device is not None:
            input_ids.index_copy_(0, *on_device)
        pos_t = _h2d(x.positions, dev)
        self.backend.prepare(meta)
        return self.model(input_ids, pos_t, self.kv_cache, meta, self.backend)

    def _attach_grammars(self, plan: StepPlan) -> None:
        """New constrained sequences start compiling their grammar now, in a thread, while the step runs."""
        for ns in plan.new_sequences:
            so = ns.sampling.structured_output
            if so is not None:
                if self._grammars is None:
                    self._grammars = GrammarCompiler.for_model(self.files.path, self.args.vocab_size,
                                                               self.files.eos_token_ids)
                st = self.batch.seqs[ns.seq_id]
                st.grammar = self._grammars.new_sequence(so, st.token_ids[st.prompt_len:])

    def _run(self, plan: StepPlan) -> list[SequenceOutput] | tuple[list[SeqState], torch.Tensor | None, Any]:
        """The step's outputs; for a greedy step, its sampling states and their tokens, still on the device
        (with grammars: None and the function that masks and samples them, called when they are needed)."""
        entries = plan.scheduled
        if plan.new_sequences:
            self._attach_grammars(plan)
        x = self.batch.prepare(entries)
        masks = None
        if x.has_grammar:
            self.pending.finish_all()  # the masks follow every token sampled so far
            masks = self._grammar_masks(x.states, entries)
        hidden = self._forward(x)
        states = x.states
        if x.decode_only:
            for s in states:
                s.num_computed += 1
        else:
            for s, n in zip(states, x.qlens.tolist()):
                s.num_computed += n
        if x.greedy:  # the common step: one argmax over the sampling rows, the tokens stay on the device
            if not x.plain:
                keep = [i for i, e in enumerate(entries) if e.sample]
                states = [states[i] for i in keep]
                if not states:
                    return []
                rows = x.qsl[1:][keep] - 1
            elif x.num_tokens != len(states):
                rows = x.qsl[1:] - 1
            else:
                rows = None
            if rows is not None:
                hidden = hidden.index_select(0, _h2d(rows, self.device))
            logits = self.model.compute_logits(hidden, float32=masks is not None)
            if masks is not None:
                return states, None, lambda: self._mask_greedy(logits, states, masks)
            return states, self.sampler.greedy_tokens(logits), None
        self.pending.resolve_all()  # the sampler reads the token histories

        # rows of the logits we need: sampled rows, then prompt-logprob rows
        sample_entries = [i for i, e in enumerate(entries) if e.sample]
        rows = [int(x.qsl[i + 1]) - 1 for i in sample_entries]
        plp = prompt_logprob_rows(x, rows)
        out = StepOutputs()
        logits = None
        if rows:
            logits = self.model.compute_logits(hidden.index_select(0, torch.tensor(rows, device=self.device)))
        plp_entries = [i for i, s in enumerate(states)
                       if s.sampling.prompt_logprobs is not None and int(x.starts[i]) < s.prompt_len]
        if plp_entries:
            prompt_logprob_outputs(logits, plp, plp_entries, x, out)
        if sample_entries:
            self._sample(logits[: len(sample_entries)], sample_entries, entries, states, out, masks)
        for e in entries:  # children of an entry that samples nothing are only cloned
            if e.fork_children and not e.sample:
                for fc in e.fork_children:
                    self.batch.fork(e.seq_id, fc.child_seq_id, fc.seq_index)
        return out.in_plan_order()

    def _grammar_masks(self, states: list[SeqState], entries) -> GrammarMasks | None:
        """The constrained sampling sequences' bitmasks, started now (filled while the forward pass runs)."""
        gs = {s.seq_id: s.grammar for s, e in zip(states, entries) if e.sample and s.grammar is not None}
        return GrammarMasks(gs, self.args.vocab_size) if gs else None

    @torch.inference_mode()
    def _mask_greedy(self, logits: torch.Tensor, states: list[SeqState], masks: GrammarMasks) -> torch.Tensor:
        """A greedy step's tokens with its grammar rows masked (``logits`` row j is ``states[j]``'s)."""
        masks.future.result()  # filled: the matchers are ours again
        rows = [j for j, s in enumerate(states) if s.grammar is not None]
        GrammarStep(rows, [states[j].grammar for j in rows], self.files.eos_token_ids, masks,
                    [masks.index[states[j].seq_id] for j in rows]).mask(logits)
        return self.sampler.greedy_tokens(logits)

    def _sample(self, logits, sample_entries, entries, states, out: StepOutputs, masks=None) -> None:
        if masks is not None:  # filled: the matchers are ours again (forks copy them below)
            masks.future.result()
        reqs: list[SampleRequest] = []
        row_of: list[int] = []
        owners: list[tuple[int, SeqState]] = []  # (entry index, state that receives the token)
        g_rows, g_seqs, g_src = [], [], []  # rows with a structured output, their sequence in ``masks``
        for r, i in enumerate(sample_entries):
            s, e = states[i], entries[i]
            opos = len(s.token_ids) - s.prompt_len
            for st in (s, *self._fork_children(s, e)):
                if st.grammar is not None:
                    g_rows.append(len(reqs))
                    g_seqs.append(st.grammar)
                    g_src.append(masks.index.get(s.seq_id, -1) if masks is not None else -1)
                reqs.append(SampleRequest(st.sampling, st.seed, st.seq_index, opos, (), st.prompt_len,
                                          param_row=st.row))
                row_of.append(r)
                owners.append((i, st))
        penalized = [j for j, (_, st) in enumerate(owners) if st.sampling.has_penalties]
        if penalized:  # their token histories, kept on the device, gain this step's new tokens
            self.batch.sync_penalty_histories([owners[j][1] for j in penalized])
            for j in penalized:
                reqs[j].history_slot = owners[j][1].pen_slot
        if len(row_of) != logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(row_of, device=logits.device))
        if g_rows:
            ahead = masks if masks is not None and -1 not in g_src else None
            grammar = GrammarStep(g_rows, g_seqs, self.files.eos_token_ids, ahead, g_src)
            res = self.sampler.sample(logits, reqs, self.batch, grammar=grammar)
            grammar.advance(res.token_ids)
        else:
            res = self.sampler.sample(logits, reqs, self.batch)
        for j, (i, s) in enumerate(owners):
            tok = res.token_ids[j]
            if not s.sampling.use_beam_search:
                s.token_ids.append(tok)
            out.sampled(i, s, s is states[i], tok, res.logprobs[j], res.top_logprobs[j])

    def _fork_children(self, s: SeqState, e: ScheduledSequence) -> list[SeqState]:
        """The entry's fork children, cloned from the parent after its compute (they sample its logits row)."""
        children = []
        for fc in e.fork_children:
            if fc.parent_seq_id != s.seq_id:
                raise ValueError(f"fork child {fc.child_seq_id} names parent {fc.parent_seq_id}, "
                                 f"scheduled under {s.seq_id}")
            children.append(self.batch.fork(s.seq_id, fc.child_seq_id, fc.seq_index))
        return children

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

    def clear_sequences(self) -> None:
        """Drop every live sequence (a new incarnation of the worker); a group's ranks all do it."""
        with self.pending.lock:
            self.pending.clear()
            self.seqs.clear()

    # ---- helpers for tests and tools ---------------------------------------------------------
    def seq_state(self, seq_id: int) -> SeqState:
        return self.seqs[seq_id]

    def stats(self) -> dict[str, Any]:
        return {"num_seqs": len(self.seqs), "num_gpu_blocks": self.num_gpu_blocks,
                "num_cpu_blocks": self.num_cpu_blocks, "kv_block_bytes": self.kv_block_bytes,
                "kv_cache_bytes": self.kv_cache.numel() * self.kv_cache.element_size()}
