"""What the GPU allows for a run: the two ceilings measured in this process, and a per-step roofline.

``ceilings(device)`` measures a large device-to-device copy (bytes read + written per second) and an
8192^3 bf16 matrix product (FLOP/s) on random data, median of repeats after a warm-up.

``StepRecorder(runner)`` wraps the runner's ``InputBatch.prepare`` and records, for every step of a run,
the tokens computed, the sequences sampled and the attention work (KV tokens read, query x key pairs).
``limit(recorder, runner, ceilings, output_tokens)`` turns that into the fastest the same schedule could
run: per step, the larger of bytes / copy rate (every weight read once, every KV token of every sequence
read once, the new KV written) and FLOPs / GEMM rate (2 x params x tokens for the decoder linears,
2 x vocab x hidden per sampled row for the LM head, 4 x heads x head_dim per query-key pair and layer),
summed over the steps. Output tok/s over that time is the limit; measured / limit is the fraction.
"""

from __future__ import annotations

import numpy as np
import torch


def _median_ms(fn, reps: int) -> float:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return float(np.median([s.elapsed_time(e) for s, e in zip(start, end)]))


def ceilings(device: str = "cuda") -> dict:
    """Measured copy bandwidth (TB/s, read + write) and bf16 GEMM rate (TFLOP/s) of this GPU."""
    n = 1 << 30  # 2 GiB of bf16 each way: far past the L2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), 20)
    del src, dst
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    gemm_ms = _median_ms(lambda: a @ b, 10)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_tb_s": round(2 * n * 2 / copy_ms / 1e9, 3), "bf16_gemm_tflop_s": round(2 * m ** 3 / gemm_ms / 1e9, 1)}


class StepRecorder:
    """Per step: tokens computed, sequences, KV tokens read, causal query-key pairs."""

    def __init__(self, runner) -> None:
        self.steps: list[tuple[int, int, int, int]] = []
        batch = runner.batch
        inner = batch.prepare

        def prepare(entries):
            x = inner(entries)
            q = x.qlens.astype(np.int64)
            start = x.starts.astype(np.int64)
            pairs = int((q * start + q * (q + 1) // 2).sum())
            self.steps.append((x.num_tokens, len(x.states), int(x.seq_lens.sum()), pairs))
            return x

        batch.prepare = prepare
        self._batch = batch

    def close(self) -> None:
        del self._batch.prepare

    def reset(self) -> None:
        self.steps.clear()


def model_costs(runner) -> dict:
    """Bytes and FLOP counts of the runner's model from its shape: decoder linears (1 byte a weight when
    quantized to FP8, else the dtype's), the LM head, KV bytes per token (the cache's own dtype)."""
    from gpu_worker.layers.linear import Linear

    a = runner.args
    q, kv_w = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    per_layer = a.hidden_size * (q + 2 * kv_w) + q * a.hidden_size + 3 * a.hidden_size * a.intermediate_size
    linear_params = per_layer * a.num_layers
    linears = [m for m in runner.model.modules() if isinstance(m, Linear)]
    fp8 = any(m.weight_fp8 is not None for m in linears)
    elem = 1 if fp8 else runner.model.lm_head_weight.element_size()
    head_bytes = a.vocab_size * a.hidden_size * runner.model.lm_head_weight.element_size()
    info = runner.info
    return {"weight_bytes": linear_params * elem + head_bytes, "linear_params": linear_params,
            "fp8_weights": fp8, "kv_bytes_per_token": info.kv_block_bytes / info.block_size,
            "head_dim_x_heads": q, "num_layers": a.num_layers, "vocab_x_hidden": a.vocab_size * a.hidden_size}


def limit(steps, costs: dict, ceil: dict, output_tokens: int) -> dict:
    """The roofline of the recorded schedule: seconds, output tok/s, and which term bounds each step."""
    if not steps:
        return {}
    s = np.array(steps, dtype=np.float64)  # [steps, 4]: tokens, seqs, kv tokens read, pairs
    kv = costs["kv_bytes_per_token"]
    bytes_ = costs["weight_bytes"] + s[:, 2] * kv + s[:, 0] * kv
    flops = (2 * costs["linear_params"] * s[:, 0] + 2 * costs["vocab_x_hidden"] * s[:, 1]
             + 4 * costs["head_dim_x_heads"] * costs["num_layers"] * s[:, 3])
    t_bytes = bytes_ / (ceil["copy_tb_s"] * 1e12)
    t_flops = flops / (ceil["bf16_gemm_tflop_s"] * 1e12)
    t = np.maximum(t_bytes, t_flops)
    total = float(t.sum())
    return {"limit_s": round(total, 3), "limit_output_tok_s": round(output_tokens / total, 1),
            "limit_steps_bytes_bound": int((t_bytes >= t_flops).sum()), "limit_steps": len(steps),
            "limit_ms_per_step": round(1000 * total / len(steps), 3)}


def fraction(measured_tok_s: float, lim: dict) -> float | None:
    return round(measured_tok_s / lim["limit_output_tok_s"], 3) if lim else None
