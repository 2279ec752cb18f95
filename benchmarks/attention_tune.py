"""Attention at the shapes of workload 'mixed' on a CUDA GPU: decode launch configurations, and a mixed step
(decodes plus prefill chunks) in one prefill call against the Triton backend's split (decode kernel for the
decodes, prefill kernel for the rest; with FP8 caches on Hopper the prefill part widened for the Gluon kernel).

    PYTHONUNBUFFERED=1 python benchmarks/attention_tune.py [--quick]

Prints one JSON line per measurement (do_bench medians, cold L2; GB/s = K+V bytes of the contexts / time) and
a last line with the best decode configuration per shape.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels  # noqa: E402
from kernel_bench import D, DEV, FP8, HKV, HQ, bench, paged_inputs, rel_err  # noqa: E402

SCALE = 0.02


def _lens(batch: int, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(batch)]


def _emit(**row) -> dict:
    print(json.dumps(row), flush=True)
    return row


def decode_sweep(configs: dict, shapes) -> list[dict]:
    rows = []
    for batch, lo, hi in shapes:
        lens = _lens(batch, lo, hi, batch)
        for fp8 in (False, True):
            kv, bt, sl = paged_inputs(batch, 0, 16, fp8_scale=SCALE if fp8 else None, seed=batch, lens=lens)
            q = torch.randn((batch, HQ, D), device=DEV, dtype=torch.bfloat16)
            nbytes = 2 * sum(lens) * HKV * D * kv.element_size()
            ref = None
            for bn, nw, ns in [(None, None, None)] + configs["fp8" if fp8 else "bf16"]:
                cfg = {} if bn is None else dict(block_n=bn, num_warps=nw, num_stages=ns)
                out = torch.empty_like(q)
                fn = lambda: kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, out=out,  # noqa: E731
                                                            k_scale=SCALE, v_scale=SCALE, max_seq_len=hi, **cfg)
                try:
                    fn()
                    ref = out.clone() if ref is None else ref
                    t = bench(fn, rep=50)
                except Exception as e:  # noqa: BLE001
                    _emit(part="decode", batch=batch, kv="fp8" if fp8 else "bf16", cfg=cfg, error=repr(e)[:200])
                    continue
                rows.append(_emit(part="decode", batch=batch, ctx=f"{lo}-{hi}", kv="fp8" if fp8 else "bf16",
                                  cfg=cfg or "default", us=round(t * 1e3, 1), gbps=round(nbytes / t / 1e6),
                                  err_vs_default=float(f"{rel_err(out, ref):.1e}")))
            del kv
            torch.cuda.empty_cache()
    return rows


def mixed_step(num_decodes: int, num_prefills: int, prompt: int) -> list[dict]:
    """One layer's attention of a mixed step: decodes (contexts 64-1500) first, then fresh prompts."""
    rows = []
    dlens = _lens(num_decodes, 64, 1500, 7)
    lens = dlens + [prompt] * num_prefills
    qlens = [1] * num_decodes + [prompt] * num_prefills
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32, device=DEV)
    n = num_decodes
    for fp8 in (False, True):
        kv, bt, sl = paged_inputs(len(lens), 0, 16, fp8_scale=SCALE if fp8 else None, seed=11, lens=lens)
        k, v = kv[0, 0], kv[0, 1]
        q = torch.randn((int(qsl[-1]), HQ, D), device=DEV, dtype=torch.bfloat16)
        kw = dict(k_scale=SCALE, v_scale=SCALE)
        width = -(-prompt // 16)
        p_bt, p_sl, p_qsl = bt[n:, :width], sl[n:], qsl[n:] - n

        def one_call(out):
            kernels.paged_prefill_attention(q, k, v, bt, sl, qsl, prompt, D**-0.5, out=out, **kw)

        def split(out, prefill_kernel="auto"):
            kernels.paged_decode_attention(q[:n], k, v, bt[:n], sl[:n], D**-0.5, out=out[:n], max_seq_len=1500, **kw)
            kernels.paged_prefill_attention(q[n:], k, v, p_bt, p_sl, p_qsl, prompt, D**-0.5, out=out[n:],
                                            kernel=prefill_kernel, **kw)

        forms = {"one_call": one_call, "split": split}
        if fp8:
            forms["split_triton_prefill"] = lambda out: split(out, "triton")
        ref = kernels.paged_prefill_attention_ref(q, k, v, bt, sl, qsl, prompt, D**-0.5, out_dtype=torch.float32, **kw)
        for name, f in forms.items():
            out = torch.full_like(q, float("nan"))
            f(out)
            err = rel_err(out, ref)
            t = bench(lambda: f(out), rep=50)  # noqa: B023
            rows.append(_emit(part="mixed_step", kv="fp8" if fp8 else "bf16", form=name, decodes=num_decodes,
                              prefills=f"{num_prefills}x{prompt}", us=round(t * 1e3, 1), err=float(f"{err:.1e}")))
        del kv
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one shape, fewer configurations")
    a = ap.parse_args()
    configs = {
        "bf16": [(32, 2, 3), (64, 2, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 4, 3)],
        "fp8": [(64, 2, 3), (64, 4, 3), (128, 2, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (256, 4, 2), (256, 8, 2),
                (256, 4, 3)],
    }
    shapes = [(256, 64, 1500)] if a.quick else [(256, 64, 1500), (128, 300, 1500), (32, 500, 1500)]
    rows = decode_sweep(configs, shapes)
    best = {}
    for r in rows:
        key = f"{r['kv']} {r['batch']}x{r['ctx']}"
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    mixed_step(192, 8, 512)
    print(json.dumps({"best_decode": {k: (v["cfg"], v["us"], v["gbps"]) for k, v in best.items()}}), flush=True)


if __name__ == "__main__":
    main()
