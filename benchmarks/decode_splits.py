"""Batch-1 decode (1 x 4096, block 16, bf16) by number of KV splits: do_bench eager and CUDA-graph medians.

    python benchmarks/decode_splits.py
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels  # noqa: E402
from kernel_bench import D, DEV, HQ, bench, bench_graph, contiguous_kv, paged_inputs, rel_err  # noqa: E402


def main() -> None:
    for batch, ctx in ((1, 4096), (4, 4096), (16, 16384)):
        kv, bt, sl = paged_inputs(batch, ctx, 16, seed=4)
        q = torch.randn((batch, HQ, D), device=DEV, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        ref = kernels.paged_decode_attention_ref(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, out_dtype=torch.float64)
        kc, vc = contiguous_kv(kv, bt, sl)
        q4 = q.view(batch, HQ, 1, D)
        sfn = lambda: torch.nn.functional.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True)  # noqa: E731
        row = {"batch": batch, "ctx": ctx, "sdpa_us": bench(sfn) * 1e3, "sdpa_graph_us": bench_graph(sfn) * 1e3}
        for splits in (None, 4, 8, 16, 32, 64):
            fn = lambda: kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, out=out,  # noqa: E731
                                                        max_seq_len=ctx, num_splits=splits)
            fn()
            err = rel_err(out, ref)
            row[f"splits_{splits or 'auto'}"] = dict(us=round(bench(fn) * 1e3, 2), graph_us=round(bench_graph(fn) * 1e3, 2),
                                                    err=float(f"{err:.1e}"))
        print(json.dumps(row), flush=True)
        del kv, kc, vc


if __name__ == "__main__":
    main()
