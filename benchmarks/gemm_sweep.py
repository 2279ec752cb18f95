"""The decoder's linears on a CUDA GPU, one shape at a time, over the token counts a 'mixed' run sees.

For each Llama-3-8B linear (qkv, o, gate_up, down, lm_head) and each token count M (decode batches 1-256,
prefill chunks up to 8192) it times ``F.linear`` as the model calls it (weight [N, K]: cuBLAS's TN form) and
variants: the weight stored transposed ([K, N], ``x @ w``: the NN form), cuBLASLt as torch's preferred
BLAS library, and fp32 split-K reductions only (``allow_bf16_reduced_precision_reduction = False``). Each
time is the median replay of a CUDA graph of several calls over rotating weight copies (more than the L2
holds) divided by the calls. Printed per row: ms, TFLOP/s, weight TB/s, and the fraction of the floor
max(weight bytes / copy rate, FLOPs / GEMM rate) with both ceilings measured in the same process
(benchmarks/limit.py). The last line sums each variant over the decode batches of a 'mixed' run (the
scheduler's own step sizes, no model) against the floor: how much of the decode steps' GEMM time a better
kernel choice could save.

    python3 benchmarks/gemm_sweep.py [--shapes qkv,o,gate_up,down,lm_head] [--variants tn,nn,lt,fp32red]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limit import ceilings  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}  # (K, N) of Llama-3-8B
DECODE_M = [1, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 136, 144, 160, 176, 192, 200, 208, 224, 240, 248, 256]
PREFILL_M = [2048, 4096, 8192]


def decode_batches() -> list[int]:
    """Decode-only step sizes of 'mixed' under the scheduler (block 16, 4096 tokens a step, 256 seqs; the
    H200 run's KV pool: 56,141 blocks, all requests fit)."""
    from pagedfleet.bench.workloads import ledger_run, mixed
    return [len(plan.scheduled) for _, plan in ledger_run(mixed(), 56141, 16, 4096, 256)
            if all(e.num_tokens == 1 for e in plan.scheduled)]


class Variant:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        m = torch.backends.cuda.matmul
        self._red = m.allow_bf16_reduced_precision_reduction
        self._lib = torch.backends.cuda.preferred_blas_library()
        if self.name == "fp32red":
            m.allow_bf16_reduced_precision_reduction = False
        if self.name == "lt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = self._red
        torch.backends.cuda.preferred_blas_library(self._lib)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.t().contiguous() if self.name == "nn" else w

    def call(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w if self.name == "nn" else F.linear(x, w)


def time_linear(variant: Variant, ws: list[torch.Tensor], m: int, reps: int = 20) -> float:
    """ms per call: a graph of one call per weight copy, replayed ``reps`` times, median."""
    k = ws[0].shape[1] if variant.name != "nn" else ws[0].shape[0]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    with variant:
        for i, w in enumerate(ws):  # warm-up: cuBLAS picks and loads its kernels outside the capture
            variant.call(xs[i % 2], w)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                for i, w in enumerate(ws):
                    variant.call(xs[i % 2], w)
    torch.cuda.synchronize()
    g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in ev)
    del g
    return times[len(times) // 2] / len(ws)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", default="tn,nn,lt,fp32red")
    ap.add_argument("--rotate-mb", type=int, default=400, help="weight copies per shape: at least this much")
    a = ap.parse_args()
    ceil = ceilings()
    copy, gemm = ceil["copy_tb_s"] * 1e12, ceil["bf16_gemm_tflop_s"] * 1e12
    print(json.dumps({"part": "ceilings", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d"), **ceil}), flush=True)
    batches = decode_batches()
    table: dict[tuple[str, str], dict[int, float]] = {}
    for shape in a.shapes.split(","):
        k, n = SHAPES[shape]
        nbytes = 2 * k * n
        copies = max(1, -(-a.rotate_mb * 2**20 // nbytes))
        base = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        for vname in a.variants.split(","):
            v = Variant(vname)
            ws = [v.weight(w) for w in base]
            row = table.setdefault((shape, vname), {})
            for m in DECODE_M + PREFILL_M:
                if m in PREFILL_M and vname in ("lt", "fp32red"):
                    continue  # split-K and the Lt heuristics matter at small M only
                ms = time_linear(v, ws, m)
                row[m] = ms
                floor = max(nbytes / copy, 2 * m * k * n / gemm) * 1e3
                print(json.dumps({"shape": shape, "variant": vname, "m": m, "ms": round(ms, 4),
                                  "tflop_s": round(2 * m * k * n / ms / 1e9, 1),
                                  "weight_tb_s": round(nbytes / ms / 1e9, 3),
                                  "of_floor": round(floor / ms, 3)}), flush=True)
            del ws
        del base
        torch.cuda.empty_cache()
    # the decode steps of 'mixed': every shape's time at the batch padded to the CUDA graph sizes
    from gpu_worker.cuda_graphs import default_graph_sizes
    sizes = default_graph_sizes(256)
    pad = {b: next(s for s in sizes if s >= b) for b in set(batches)}

    def at(row: dict[int, float], m: int) -> float:  # linear interpolation over the swept Ms
        ms = sorted(row)
        lo = max([x for x in ms if x <= m], default=ms[0])
        hi = min([x for x in ms if x >= m], default=ms[-1])
        return row[lo] if hi == lo else row[lo] + (row[hi] - row[lo]) * (m - lo) / (hi - lo)

    summary = {}
    for vname in a.variants.split(","):
        total = sum(32 * at(table[(s, vname)], pad[b]) for s in a.shapes.split(",") if s != "lm_head"
                    for b in batches) + sum(at(table[("lm_head", vname)], pad[b]) for b in batches
                                            if ("lm_head", vname) in table)
        summary[vname] = round(total / 1e3, 3)
    best = sum((1 if s == "lm_head" else 32) * min(at(table[(s, v)], pad[b]) for v in a.variants.split(",")
                                                   if (s, v) in table)
               for s in a.shapes.split(",") for b in batches)
    floor_s = 0.0
    for b in batches:
        for s in a.shapes.split(","):
            k, n = SHAPES[s]
            f = max(2 * k * n / copy, 2 * b * k * n / gemm)
            floor_s += f * (1 if s == "lm_head" else 32)
    print(json.dumps({"part": "mixed_decode_gemm_s", "steps": len(batches), "by_variant_s": summary,
                      "best_of_variants_s": round(best / 1e3, 3), "floor_s": round(floor_s, 3)}),
          flush=True)


if __name__ == "__main__":
    main()
