"""Kernel warm-up before the first request: the kernels the step loop launches are loaded (and compiled) first.

With CUDA's lazy module loading (the default), a kernel's module is loaded at its first launch, and the load
waits for the GPU's queue to drain (``cuLibraryLoadData`` under the context lock). In a pipelined step loop
that is a bubble: the host, blocked in step N+1's launch until step N is done, leaves the GPU idle while it
loads the kernel and queues the rest. The H100 profiles of 'mixed' (benchmarks/results/h100-2026-12-07/call2)
show the pattern this is taken for: a 3-7 ms gap after nearly every prefill step (each samples a row count
not seen before, and cuBLAS picks the LM head's kernel by shape) and 4-6 ms gaps inside the last one (its
odd token count). Triton kernels compile, or load from the disk cache, at their first specialization too.

``warm_up(runner)`` runs, once the KV cache and the CUDA graphs exist (on CUDA unless
``WorkerConfig.warm_up_kernels`` says otherwise; every rank of a tensor-parallel group alike):

* one decoder layer on a mixed step (decodes first, then a prefill chunk: the split attention path that the
  decode graphs never take) for every token count to 32, then a grid up to ``max_num_batched_tokens``
  (``token_counts``: cuBLAS changes kernels over ranges of rows, Triton specialises on 1 and multiples of 16);
* the LM head and the greedy argmax for every row count a step can sample (1..max_num_seqs).

Its KV writes land in blocks no sequence owns yet: a sequence writes its positions before it reads them, and
what the warm-up leaves in the rest of a block is finite (a masked key times a zero weight stays zero).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gpu_worker.attention import AttentionMetadata

_DECODES = 8  # one-token rows ahead of the prefill chunk in the warm-up steps


def token_counts(max_tokens: int) -> list[int]:
    """Every count to 32, every 16 to 256, every 64 to 4096, every 256 beyond, ``max_tokens`` and
    ``max_tokens - 1`` (cuBLAS's choices change over ever wider ranges of rows as they grow)."""
    grid = {*range(1, 33), *range(48, 257, 16), *range(320, 4097, 64), *range(4352, max_tokens + 1, 256),
            max_tokens, max_tokens - 1}
    return sorted(n for n in grid if 1 <= n <= max_tokens)


def mixed_step(n: int, max_model_len: int, block_size: int, device) -> tuple[AttentionMetadata, int]:
    """Metadata of an ``n``-token step, as the scheduler builds the largest ones: up to _DECODES one-token
    sequences (17-token contexts) first, then prefill chunks of at most ``max_model_len`` tokens, on blocks
    0, 1, ...; and the number of blocks it uses."""
    d = min(_DECODES, n - 1) if n > 1 else 1
    q_lens = [1] * d
    rest = n - d
    while rest > 0:
        q_lens.append(min(rest, max_model_len))
        rest -= q_lens[-1]
    seq_lens = [17 if q == 1 else q for q in q_lens]
    tables, used = [], 0
    for length in seq_lens:
        nb = -(-length // block_size)
        tables.append(list(range(used, used + nb)))
        used += nb
    return AttentionMetadata.build(seq_lens, q_lens, tables, block_size, device), used


@torch.inference_mode()
def warm_up(runner: Any) -> float:
    """Launch every kernel shape the step loop will (see the module doc); returns the seconds it took."""
    t0 = time.perf_counter()
    model, dev, cfg = runner.model, runner.device, runner.config
    hidden = runner.args.hidden_size
    max_tokens = max(1, cfg.max_num_batched_tokens)
    x = torch.randn(max_tokens, hidden, device=dev).mul_(0.02).to(runner.dtype)
    layer = model.model.layers[0]
    for n in token_counts(max_tokens):
        meta, used = mixed_step(n, runner.max_model_len, runner.block_size, dev)
        if used > runner.num_gpu_blocks:
            break
        runner.backend.prepare(meta)
        positions = torch.arange(n, device=dev) % runner.max_model_len
        rope = model.model.rotary.cos_sin(positions)
        # copies: the fused add + norm writes in place, and values left to grow could reach the cache as
        # inf or NaN (a masked key must stay finite: 0 x NaN poisons the attention of the block's next owner)
        layer(rope, x[:n].clone(), x[:n].clone(), runner.kv_cache, meta, runner.backend)
    h = x[: max(1, cfg.max_num_seqs)]
    for m in range(1, h.shape[0] + 1):
        runner.sampler.greedy_tokens(model.compute_logits(h[:m], float32=False))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
