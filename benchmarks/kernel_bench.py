"""Check and time the Triton kernels of `kernels/` on a CUDA GPU.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench.py --out DIR [--sweep] [--no-bench] [--no-flex]

1. checks every kernel against its reference on the GPU (fp32, bf16, FP8 caches, ragged lengths, garbage
   block-table entries, NaN-poisoned outputs), that a decode step captures in a CUDA graph and that the
   decode and prefill calls make no host sync;
2. (--sweep) times launch configurations of the decode and prefill kernels (for tuning their defaults);
3. times, with triton.testing.do_bench (median; do_bench zeroes a 256 MB buffer before every run, so
   every run starts with a cold L2), the paged decode kernel with its default configuration against
   PyTorch SDPA on the same K/V laid out contiguously (the no-paging ideal: the fastest of SDPA's backends
   with enable_gqa or with K/V expanded to the query heads) and FlexAttention's PagedAttention; and paged
   prefill against SDPA causal prefill on contiguous K/V;
and writes DIR/kernels.json and DIR/kernels.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

import warnings

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import kernels  # noqa: E402
from kernels.paged_decode_attention import choose_num_splits  # noqa: E402
from kernels._common import num_sms  # noqa: E402

DEV = torch.device("cuda")
HQ, HKV, D = 32, 8, 128
FP8 = torch.float8_e4m3fn
LOG: list[str] = []
T0 = time.time()


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def bench(fn, rep: int = 100) -> float:
    """Median milliseconds (cold L2 every run)."""
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench_graph(fn, rep: int = 100) -> float:
    """Median milliseconds of replaying `fn` captured in a CUDA graph (no CPU launch cost; cold L2)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=25, rep=rep, return_mode="median")


def cpu_us_per_call(fn, n: int = 300) -> float:
    """Wall microseconds per call for n back-to-back calls (max of CPU launch cost and GPU time; warm L2)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def rel_err(out, ref) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ------------------------------------------------------------------------------------------------ inputs


def paged_inputs(batch, ctx, bs, dtype=torch.bfloat16, fp8_scale=None, seed=0, lens=None):
    """One-layer kv_cache [1, 2, NB, bs, HKV, D] holding `batch` sequences in randomly permuted blocks;
    block-table entries past a sequence's last block point at NaN blocks."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    lens = lens or [ctx] * batch
    nblk = [-(-n // bs) for n in lens]
    width = max(nblk) + 2
    num_blocks = sum(nblk) + 8
    kv = torch.randn((1, 2, num_blocks, bs, HKV, D), generator=g, device=DEV, dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks, generator=g, device=DEV)
    bt = torch.empty((batch, width), dtype=torch.int32, device=DEV)
    i = 0
    for b, nb in enumerate(nblk):
        bt[b, :nb] = perm[i : i + nb].int()
        i += nb
        bt[b, nb:] = perm[-1].int()
    kv[:, :, perm[-8:]] = float("nan")
    if fp8_scale is not None:
        kv = (kv.float() / fp8_scale).clamp(-448, 448).to(FP8)
    elif dtype != torch.bfloat16:
        kv = kv.to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    return kv, bt, sl


def contiguous_kv(kv, bt, sl, dtype=torch.bfloat16, scales=(1.0, 1.0)):
    """[B, HKV, ctx, D] copies of each sequence's K and V (uniform lengths)."""
    ctx = int(sl[0])
    bs = kv.shape[3]
    nb = -(-ctx // bs)
    out = []
    for j in range(2):
        x = kv[0, j][bt[:, :nb].long()]  # [B, nb, bs, HKV, D]
        x = x.flatten(1, 2)[:, :ctx].to(dtype)
        if kv.dtype == FP8:
            x = x * scales[j]
        out.append(x.permute(0, 2, 1, 3).contiguous())
    return out


# ------------------------------------------------------------------------------------------------ checks


def sm90_ok(q, k_cache) -> bool:
    from kernels.paged_prefill_attention_sm90 import supports

    return supports(q, k_cache)


def check_all() -> list[str]:
    failures = []

    def expect(name, ok, detail):
        log(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    log("== correctness on the GPU ==")
    tol = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 5e-3}
    combos = [(torch.bfloat16, bs, gqa, 128) for bs in (8, 16, 32, 64, 128) for gqa in (1, 4, 8)]
    combos += [(torch.bfloat16, 16, 4, 64), (torch.float32, 16, 4, 64), (torch.float32, 128, 1, 128),
               (torch.float16, 32, 8, 128)]
    # shapes the Gluon kernel leaves to the Triton one ("auto" must pick it): GQA 3 (SmolLM2), blocks of 4
    combos += [(torch.bfloat16, 16, 3, 64), (torch.bfloat16, 4, 4, 128)]
    for dtype, bs, gqa, hd in combos:
        g = torch.Generator(device=DEV).manual_seed(bs * 100 + gqa * 10 + hd)
        hkv = 2
        lens = [1, bs, bs + 1, 7 * bs + 5, 1000]
        nblk = [-(-n // bs) for n in lens]
        nbt = sum(nblk) + 3
        kv = torch.randn((2, 2, nbt, bs, hkv, hd), generator=g, device=DEV).to(dtype)
        perm = torch.randperm(nbt, generator=g, device=DEV)
        bt = torch.full((len(lens), max(nblk) + 2), 2**31 - 1, dtype=torch.int32, device=DEV)
        i = 0
        for b, nb in enumerate(nblk):
            bt[b, :nb] = perm[i : i + nb].int()
            i += nb
        kv[:, :, perm[-3:]] = float("nan")  # spare blocks: NaN, and garbage table entries point at one
        bt[:, -2] = perm[-1].int()
        for b, n in enumerate(lens):  # the tail of each sequence's last block is not part of it: NaN
            if n % bs:
                kv[1, :, bt[b, nblk[b] - 1].long(), n % bs:] = float("nan")
        k, v = kv[1, 0], kv[1, 1]
        sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
        q = torch.randn((len(lens), hkv * gqa, hd), generator=g, device=DEV).to(dtype)
        ref = kernels.paged_decode_attention_ref(q, k, v, bt, sl, hd**-0.5, out_dtype=torch.float64)
        errs = []
        for splits in (None, 5):
            out = torch.full_like(q, float("nan"))
            kernels.paged_decode_attention(q, k, v, bt, sl, hd**-0.5, out=out, num_splits=splits)
            errs.append(rel_err(out, ref))
        qlens = [1, bs, 1, 2 * bs + 3, 333]
        qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32, device=DEV)
        qp = torch.randn((int(qsl[-1]), hkv * gqa, hd), generator=g, device=DEV).to(dtype)
        refp = kernels.paged_prefill_attention_ref(qp, k, v, bt, sl, qsl, max(qlens), hd**-0.5,
                                                   out_dtype=torch.float64)
        for prefill_kernel in ("triton", "sm90", "auto") if sm90_ok(qp, k) else ("triton", "auto"):
            outp = torch.full_like(qp, float("nan"))
            kernels.paged_prefill_attention(qp, k, v, bt, sl, qsl, max(qlens), hd**-0.5, out=outp,
                                            kernel=prefill_kernel)
            errs.append(rel_err(outp, refp))
        ok = all(e < tol[dtype] for e in errs)  # NaN fails
        expect(f"decode/prefill {str(dtype)[6:]} bs={bs} gqa={gqa} hd={hd}", ok,
               "decode(auto, 5 splits) / prefill (triton[, sm90], auto) rel err " + " ".join(f"{e:.1e}" for e in errs))
    # FP8 caches
    for bs in (16, 128):
        ks, vs = 0.02, 0.03
        kv, bt, sl = paged_inputs(6, 0, bs, seed=5, lens=[1, bs, bs + 1, 900, 77, 3000])
        kv8 = torch.empty_like(kv, dtype=FP8)
        kv8[:, 0] = (kv[:, 0].float() / ks).clamp(-448, 448).to(FP8)
        kv8[:, 1] = (kv[:, 1].float() / vs).clamp(-448, 448).to(FP8)
        q = torch.randn((6, HQ, D), device=DEV, dtype=torch.bfloat16)
        ref = kernels.paged_decode_attention_ref(q, kv8[0, 0], kv8[0, 1], bt, sl, D**-0.5, k_scale=ks, v_scale=vs,
                                                 out_dtype=torch.float64)
        out = torch.full_like(q, float("nan"))
        kernels.paged_decode_attention(q, kv8[0, 0], kv8[0, 1], bt, sl, D**-0.5, out=out, k_scale=ks, v_scale=vs)
        e1 = rel_err(out, ref)
        qlens = [1, bs, 1, 100, 77, 64]
        qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32, device=DEV)
        qp = torch.randn((int(qsl[-1]), HQ, D), device=DEV, dtype=torch.bfloat16)
        refp = kernels.paged_prefill_attention_ref(qp, kv8[0, 0], kv8[0, 1], bt, sl, qsl, 100, D**-0.5, k_scale=ks,
                                                   v_scale=vs, out_dtype=torch.float64)
        e2 = []
        for pk in ("triton", "auto"):  # auto on Hopper: the pages widened for the Gluon kernel
            outp = torch.full_like(qp, float("nan"))
            kernels.paged_prefill_attention(qp, kv8[0, 0], kv8[0, 1], bt, sl, qsl, 100, D**-0.5, out=outp,
                                            k_scale=ks, v_scale=vs, kernel=pk)
            e2.append(rel_err(outp, refp))
        expect(f"fp8 decode/prefill bs={bs}", e1 < 1e-2 and max(e2) < 1e-2,
               f"{e1:.1e} / triton {e2[0]:.1e}, auto {e2[1]:.1e}")
    # reshape_and_cache, copy_blocks
    for cdt in (torch.bfloat16, torch.float32, FP8):
        for bs in (16, 128):
            kv = torch.randn((2, 2, 64, bs, HKV, D), device=DEV).to(torch.float32)
            kv = (kv * 30).to(cdt)
            kv_ref = kv.clone()
            n = 500
            slots = torch.randperm(64 * bs, device=DEV)[:n]
            slots[::7] = -1
            key = (torch.randn((n, HKV, D), device=DEV) * 3).bfloat16()
            val = (torch.randn((n, HKV, D), device=DEV) * 3).bfloat16()
            ks, vs = (0.01, 0.02) if cdt == FP8 else (1.0, 1.0)
            kernels.reshape_and_cache(key, val, kv[1, 0], kv[1, 1], slots, ks, vs)
            kernels.reshape_and_cache_ref(key, val, kv_ref[1, 0], kv_ref[1, 1], slots, ks, vs)
            same1 = torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
            pairs = torch.stack([torch.randperm(64, device=DEV)[:20], torch.randperm(64, device=DEV)[:20]], 1)
            pairs = pairs[(pairs[:, 0] != pairs[:, 1])]
            src_set = set(pairs[:, 0].tolist())
            pairs = pairs[[d not in src_set for d in pairs[:, 1].tolist()]]
            kernels.copy_blocks(kv, pairs)
            kernels.copy_blocks_ref(kv_ref, pairs)
            same2 = torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
            expect(f"reshape_and_cache / copy_blocks {str(cdt)[6:]} bs={bs}", same1 and same2,
                   f"bitwise equal {same1} / {same2} ({len(pairs)} pairs)")
    # CUDA graph capture and no host syncs
    kv, bt, sl = paged_inputs(64, 2048, 16, seed=3)
    q = torch.randn((64, HQ, D), device=DEV, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, out=out, num_splits=4)  # compile
    eager = out.clone()
    qsl = torch.arange(65, dtype=torch.int32, device=DEV)
    slots = torch.arange(64, device=DEV) - 1
    kv_small = kv[:, :, :64].contiguous()
    pairs = torch.tensor([[0, 1], [2, 3]], device=DEV)
    calls = {
        "decode": lambda: kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, out=out,
                                                         max_seq_len=2048),
        "prefill": lambda: kernels.paged_prefill_attention(q, kv[0, 0], kv[0, 1], bt, sl, qsl, 1, D**-0.5),
        "reshape_and_cache": lambda: kernels.reshape_and_cache(q[:, :HKV], q[:, :HKV], kv_small[0, 0],
                                                               kv_small[0, 1], slots),
        "copy_blocks": lambda: kernels.copy_blocks(kv_small, pairs),
    }
    for fn in calls.values():
        fn()  # compile outside the sync check
    torch.cuda.synchronize()
    for name, fn in calls.items():
        try:
            torch.cuda.set_sync_debug_mode("error")
            fn()
            ok, detail = True, "no synchronizing call (sync debug mode 'error')"
        except Exception as e:  # noqa: BLE001
            ok, detail = False, repr(e)[:200]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        expect(f"no host sync: {name}", ok, detail)
    try:
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, out=out, num_splits=4)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, out=out, num_splits=4)
        out.fill_(float("nan"))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        fresh = kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, num_splits=4)
        e = rel_err(out, fresh)
        expect("CUDA graph capture/replay of decode (new q)", e < 1e-6, f"rel err {e:.1e}")
    except Exception as e:  # noqa: BLE001
        expect("CUDA graph capture/replay of decode", False, repr(e))
    del eager
    return failures


# ------------------------------------------------------------------------------------------------ decode

DECODE_SHAPES = [  # (batch, context, block_size, fp8)
    (1, 4096, 16, False),
    (16, 16384, 16, False),
    (64, 2048, 16, False),
    (256, 1024, 16, False),
    (64, 2048, 32, False),
    (64, 2048, 128, False),
    (64, 2048, 16, True),
]


def sdpa_decode_best(q4, kc, vc):
    """Fastest SDPA form on contiguous K/V: backends x (enable_gqa | K/V expanded to the query heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    best = (math.inf, "n/a")
    ke = ve = None
    allt = {}
    for form in ("gqa", "expanded"):
        if form == "expanded":
            ke = kc.repeat_interleave(HQ // HKV, dim=1)
            ve = vc.repeat_interleave(HQ // HKV, dim=1)
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    if form == "gqa":
                        fn = lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True)  # noqa: E731
                    else:
                        fn = lambda: F.scaled_dot_product_attention(q4, ke, ve)  # noqa: E731
                    o = fn()
                    t = bench(fn)
                log(f"    sdpa decode {be.name}/{form}: {t*1e3:.1f} us")
                allt[f"{be.name.lower().replace('_attention', '')}/{form}"] = t
                if t < best[0]:
                    best = (t, f"{be.name.lower().replace('_attention', '')}/{form}", o)
            except Exception:  # noqa: BLE001
                pass
    del ke, ve
    return best[0], best[1], allt


def flex_paged_setup(kv, bt, sl, bs, q):
    """FlexAttention's experimental PagedAttention over the same pages (its own [1, H, pages*bs, D] layout)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B = q.shape[0]
    ctx = int(sl[0])
    nb = ctx // bs
    n_pages = kv.shape[2]
    pa = PagedAttention(n_pages, bs, B, device=DEV)
    pa.page_table[:, :nb] = bt[:, :nb].long()
    pa.physical_to_logical.scatter_(1, bt[:, :nb].long(), torch.arange(nb, device=DEV).expand(B, nb).contiguous())
    pa.capacity[:] = ctx
    pa.empty_pages = []
    kf = kv[0, 0].permute(2, 0, 1, 3).reshape(1, HKV, n_pages * bs, D)
    vf = kv[0, 1].permute(2, 0, 1, 3).reshape(1, HKV, n_pages * bs, D)
    if kf.dtype == FP8:
        raise RuntimeError("no FP8 in FlexAttention")

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < ctx

    bm = create_block_mask(mask_mod, B, None, 1, ctx, device=DEV, BLOCK_SIZE=(128, bs))
    cbm = pa.convert_logical_block_mask(bm)
    flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    q4 = q.unsqueeze(2)
    last = None
    for opts in (None, {"BLOCK_N": min(bs, 64)}, {"BLOCK_N": 16}):
        try:
            fn = lambda o=opts: flex(q4, kf, vf, block_mask=cbm, enable_gqa=True, kernel_options=o)  # noqa: E731
            out = fn()
            torch.cuda.synchronize()
            return fn, out.squeeze(2)
        except Exception as e:  # noqa: BLE001
            last = e
    raise last


def decode_row(batch, ctx, bs, fp8, *, flex=True, cfg=None):
    ks = vs = 0.02
    kv, bt, sl = paged_inputs(batch, ctx, bs, fp8_scale=ks if fp8 else None, seed=batch + ctx + bs)
    q = torch.randn((batch, HQ, D), device=DEV, dtype=torch.bfloat16)
    k, v = kv[0, 0], kv[0, 1]
    out = torch.empty_like(q)
    kw = dict(k_scale=ks, v_scale=vs, max_seq_len=ctx, **(cfg or {}))
    fn = lambda: kernels.paged_decode_attention(q, k, v, bt, sl, D**-0.5, out=out, **kw)  # noqa: E731
    fn()
    kc, vc = contiguous_kv(kv, bt, sl, scales=(ks, vs))
    q4 = q.unsqueeze(2)
    ref = torch.nn.functional.scaled_dot_product_attention(q4.float(), kc.float(), vc.float(), enable_gqa=True)
    err = rel_err(out, ref.squeeze(2))
    t = bench(fn)
    try:
        tg = bench_graph(fn)
    except Exception as e:  # noqa: BLE001
        log(f"    graph: {e!r}")
        tg = None
    nbytes = 2 * batch * ctx * HKV * D * kv.element_size()
    row = dict(batch=batch, ctx=ctx, block=bs, kv="fp8" if fp8 else "bf16", t_ms=t, gbps=nbytes / t / 1e6,
               graph_ms=tg, loop_us=cpu_us_per_call(fn) if batch == 1 else None,
               err=err, splits=cfg.get("num_splits") if cfg else
               choose_num_splits(batch, HKV, ctx, num_sms(DEV)))
    if not fp8:
        sd = sdpa_decode_best(q4, kc, vc)
        row.update(sdpa_ms=sd[0], sdpa_form=sd[1], sdpa_gbps=nbytes / sd[0] / 1e6, sdpa_all_ms=sd[2])
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION}[sd[1].split("/")[0]]
            if sd[1].endswith("gqa"):
                def sfn():
                    with sdpa_kernel([be]):
                        return torch.nn.functional.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True)
                row["sdpa_graph_ms"] = bench_graph(sfn)
                if batch == 1:
                    row["sdpa_loop_us"] = cpu_us_per_call(sfn)
        except Exception as e:  # noqa: BLE001
            log(f"    sdpa graph: {e!r}")
    else:
        row.update(sdpa_ms=None, sdpa_form="n/a (bf16 row is the baseline)")
    del kc, vc
    row["flex_ms"], row["flex_note"] = None, "skipped"
    if flex and not fp8:
        try:
            ffn, fo = flex_paged_setup(kv, bt, sl, bs, q)
            ferr = rel_err(fo, ref.squeeze(2))
            row["flex_ms"] = bench(ffn)
            row["flex_note"] = f"err {ferr:.1e}"
        except Exception as e:  # noqa: BLE001
            row["flex_note"] = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    elif fp8:
        row["flex_note"] = "n/a (no FP8 KV in FlexAttention)"
    del kv
    torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------ prefill


def prefill_row(batch=8, prompt=2048, bs=16, cfg=None, sdpa=True):
    kv, bt, sl = paged_inputs(batch, prompt, bs, seed=99)
    k, v = kv[0, 0], kv[0, 1]
    q = torch.randn((batch * prompt, HQ, D), device=DEV, dtype=torch.bfloat16)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV) * prompt
    out = torch.empty_like(q)
    fn = lambda: kernels.paged_prefill_attention(q, k, v, bt, sl, qsl, prompt, D**-0.5, out=out, **(cfg or {}))  # noqa: E731
    fn()
    kc, vc = contiguous_kv(kv, bt, sl)
    q4 = q.view(batch, prompt, HQ, D).transpose(1, 2).contiguous()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    ref = F.scaled_dot_product_attention(q4, kc, vc, is_causal=True, enable_gqa=True)
    err = rel_err(out.view(batch, prompt, HQ, D).transpose(1, 2), ref)
    t = bench(fn)
    best = (math.inf, "n/a")
    allt = {}
    ke, ve = kc.repeat_interleave(HQ // HKV, 1), vc.repeat_interleave(HQ // HKV, 1)
    for form, (kk, vv, gqa) in (("gqa", (kc, vc, True)), ("expanded", (ke, ve, False))) if sdpa else ():
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    f2 = lambda: F.scaled_dot_product_attention(q4, kk, vv, is_causal=True, enable_gqa=gqa)  # noqa: E731
                    f2()
                    ts = bench(f2)
                log(f"    sdpa prefill {be.name}/{form}: {ts*1e3:.0f} us")
                allt[f"{be.name.lower().replace('_attention', '')}/{form}"] = ts
                if ts < best[0]:
                    best = (ts, f"{be.name.lower().replace('_attention', '')}/{form}")
            except Exception:  # noqa: BLE001
                pass
    flops = 4 * batch * HQ * D * prompt * (prompt + 1) / 2
    del kv, kc, vc, ke, ve
    torch.cuda.empty_cache()
    return dict(batch=batch, prompt=prompt, block=bs, t_ms=t, tflops=flops / t / 1e9, err=err, sdpa_ms=best[0],
                sdpa_form=best[1], sdpa_tflops=flops / best[0] / 1e9, cfg=cfg, sdpa_all_ms=allt)


# ------------------------------------------------------------------------------------------------ sweep


def sweep(deadline: float):
    """Launch configurations around the defaults (the defaults were set from runs of this)."""
    res = {"decode": [], "prefill": []}
    log("== sweep: FP8 decode, 64 x 2048, block 16 ==")
    kv, bt, sl = paged_inputs(64, 2048, 16, fp8_scale=0.02, seed=2)
    q = torch.randn((64, HQ, D), device=DEV, dtype=torch.bfloat16)
    nbytes = 2 * 64 * 2048 * HKV * D
    cfgs = [(128, 4, 2, 1, "fp16"), (256, 4, 2, 1, "fp16"), (256, 8, 2, 1, "fp16"), (128, 2, 2, 1, "fp16"),
            (128, 2, 3, 1, "fp16"), (64, 2, 3, 1, "fp16"), (256, 4, 1, 1, "fp16"), (128, 4, 2, 1, "q"),
            (128, 8, 2, 1, "fp16"), (256, 8, 3, 1, "fp16")]
    for bn, nw, ns, S, comp in cfgs:
        if time.time() > deadline:
            break
        try:
            fn = lambda: kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, num_splits=S,  # noqa: E731
                                                        block_n=bn, num_warps=nw, num_stages=ns, k_scale=0.02,
                                                        v_scale=0.02, _compute=comp)
            fn()
            t = bench(fn, rep=40)
            log(f"  fp8 bn={bn} w={nw} st={ns} S={S} compute={comp}: {t*1e3:.1f} us {nbytes/t/1e6:.0f} GB/s")
            res["decode"].append(dict(bn=bn, nw=nw, ns=ns, S=S, compute=comp, t_ms=t))
        except Exception as e:  # noqa: BLE001
            log(f"  fp8 bn={bn} w={nw} st={ns} S={S}: {type(e).__name__} {str(e)[:100]}")
    del kv
    log("== sweep: bf16 decode, 1 x 4096 and 64 x 2048 ==")
    for batch, ctx in ((1, 4096), (64, 2048)):
        kv, bt, sl = paged_inputs(batch, ctx, 16, seed=4)
        q = torch.randn((batch, HQ, D), device=DEV, dtype=torch.bfloat16)
        for bn, nw, ns in ((64, 4, 3), (64, 2, 3), (32, 2, 3), (128, 4, 2)):
            if time.time() > deadline:
                break
            fn = lambda: kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, block_n=bn,  # noqa: E731
                                                        num_warps=nw, num_stages=ns, max_seq_len=ctx)
            fn()
            t = bench(fn, rep=40)
            log(f"  bf16 B={batch} ctx={ctx} bn={bn} w={nw} st={ns} (auto splits): {t*1e3:.1f} us")
            res["decode"].append(dict(batch=batch, ctx=ctx, bn=bn, nw=nw, ns=ns, t_ms=t))
        del kv
    log("== sweep: prefill ==")
    for bm, bn, nw, ns in ((256, 64, 8, 2), (256, 64, 8, 4), (256, 32, 8, 4), (256, 128, 8, 2), (128, 64, 8, 2)):
        if time.time() > deadline:
            break
        try:
            r = prefill_row(cfg=dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns), sdpa=False)
            log(f"  prefill bm={bm} bn={bn} w={nw} st={ns}: {r['t_ms']*1e3:.0f} us {r['tflops']:.0f} TFLOP/s "
                f"err {r['err']:.1e}")
            res["prefill"].append(dict(bm=bm, bn=bn, nw=nw, ns=ns, **r))
        except Exception as e:  # noqa: BLE001
            log(f"  prefill bm={bm} bn={bn} w={nw} st={ns}: {type(e).__name__} {str(e)[:200]}")
    return res


def sweep_prefill(deadline: float):
    """Prefill variants at 8 x 2048 (block 16 unless named): the Gluon (sm90) kernel's tile and ring depth,
    block sizes 64 / 128 (fewer, larger page loads) to see what the paging itself costs; then the host cost
    of a small call. cuDNN SDPA is timed first in the same process, with the Triton kernel's default."""
    res = []
    base = prefill_row(cfg=dict(kernel="triton"), sdpa=True)
    log(f"  triton default: {base['t_ms']*1e3:.0f} us, SDPA {base['sdpa_form']} {base['sdpa_ms']*1e3:.0f} us "
        f"({base['sdpa_ms']/base['t_ms']:.3f}x)")
    res.append(dict(name="default", **base))
    # (2026-11-22, same H100 kind, tried and removed: Triton's automatic warp specialisation of the unmasked
    # loop, 742-801 us; a packed bf16x2 exp2, 793 us; TMA descriptor loads of whole-page tiles at block 64 /
    # 128, 731-762 us; one query head per program instead of a GQA group, 789-916 us; the next tile's q.k
    # issued before this tile's softmax (FA3's intra-warpgroup overlap), 912-1729 us; all against 738-749 us
    # for the default in the same calls. Third session, the Gluon kernel: without warp specialisation
    # (cp.async ring, CTA barriers) 853-1500 us; FA3's ping-pong of the two consumer warpgroups on an
    # mbarrier pair 632-633 us against 624-650 us without; BLOCK_N 128 with 2 stages 712-780 us.)
    variants = [
        ("sm90 bn64 s4 (default)", 16, dict(kernel="sm90", block_n=64, num_stages=4)),
        ("sm90 bn64 s3", 16, dict(kernel="sm90", block_n=64, num_stages=3)),
        ("sm90 bn64 s4 block 64", 64, dict(kernel="sm90", block_n=64, num_stages=4)),
        ("sm90 bn64 s4 block 128", 128, dict(kernel="sm90", block_n=64, num_stages=4)),
        ("triton block 64", 64, dict(kernel="triton")),
    ]
    for name, bs, cfg in variants:
        if time.time() > deadline:
            break
        try:
            r = prefill_row(bs=bs, cfg=cfg, sdpa=False)
            log(f"  {name}: {r['t_ms']*1e3:.0f} us {r['tflops']:.0f} TFLOP/s ({base['sdpa_ms']/r['t_ms']:.3f}x SDPA) "
                f"err {r['err']:.1e}")
            res.append(dict(name=name, **r))
        except Exception as e:  # noqa: BLE001
            log(f"  {name}: {type(e).__name__} {str(e)[:300]}")
    # host cost of a small call (1 x 64 new tokens on a 64-token context): back-to-back wall us per call
    kv, bt, sl = paged_inputs(1, 64, 16, seed=3)
    q = torch.randn((64, HQ, D), device=DEV, dtype=torch.bfloat16)
    qsl = torch.tensor([0, 64], dtype=torch.int32, device=DEV)
    for name in ("triton", "sm90"):
        us = cpu_us_per_call(lambda: kernels.paged_prefill_attention(q, kv[0, 0], kv[0, 1], bt, sl, qsl, 64,
                                                                     D**-0.5, kernel=name))
        log(f"  small prefill call (1 x 64), {name}: {us:.1f} us per call back to back")
        res.append(dict(name=f"host {name}", host_us=us))
    return res


def decode_launch_probe():
    """Batch 1 x 4096 (64 splits): do_bench time and host microseconds per eager call, paged vs SDPA."""
    kv, bt, sl = paged_inputs(1, 4096, 16, seed=4)
    q = torch.randn((1, HQ, D), device=DEV, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    fn = lambda: kernels.paged_decode_attention(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, out=out, max_seq_len=4096)  # noqa: E731
    fn()
    ref = kernels.paged_decode_attention_ref(q, kv[0, 0], kv[0, 1], bt, sl, D**-0.5, out_dtype=torch.float64)
    kc, vc = contiguous_kv(kv, bt, sl)
    q4 = q.view(1, HQ, 1, D)
    sfn = lambda: torch.nn.functional.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True)  # noqa: E731
    sfn()
    r = dict(err=rel_err(out, ref), paged_us=bench(fn) * 1e3, sdpa_us=bench(sfn) * 1e3,
             paged_host_us=cpu_us_per_call(fn), sdpa_host_us=cpu_us_per_call(sfn))
    r["vs_sdpa"] = r["sdpa_us"] / r["paged_us"]
    log("  decode 1x4096: " + json.dumps({k: round(v, 4) for k, v in r.items()}))
    return r


# ------------------------------------------------------------------------------------------------ main


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def run_date() -> str:
    """The date and time of this run (UTC, ISO 8601): the results header carries it."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--probe", action="store_true", help="only: decode 1x4096 launch probe and prefill variants")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--flex-until-s", type=float, default=400, help="no new FlexAttention compile after this")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    deadline = T0 + args.budget_s
    props = torch.cuda.get_device_properties(0)
    env = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda, date=run_date(),
               command="PYTHONUNBUFFERED=1 python benchmarks/kernel_bench.py " + " ".join(sys.argv[1:]))
    log(json.dumps(env))
    result = dict(env=env)
    if not args.no_check:
        try:
            fails = check_all()
        except Exception:  # noqa: BLE001
            log(traceback.format_exc()[-1500:])
            fails = ["check_all crashed"]
        result["check_failures"] = fails
        log(f"checks: {'all passed' if not fails else 'FAILED: ' + ', '.join(fails)}  ({time.time()-T0:.0f}s)")
    if args.probe:
        result["decode_launch"] = decode_launch_probe()
        result["prefill_variants"] = sweep_prefill(deadline)
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(args.out, "log.txt"), "w") as f:
            f.write("\n".join(LOG))
        log(f"total {time.time()-T0:.0f}s")
        return
    if not args.no_bench:
        rows = []
        log("== decode ==")
        for batch, ctx, bs, fp8 in DECODE_SHAPES:
            try:
                r = decode_row(batch, ctx, bs, fp8, flex=not args.no_flex and time.time() < T0 + args.flex_until_s)
            except Exception as e:  # noqa: BLE001
                log(f"  decode {batch} {ctx} {bs} {fp8}: {traceback.format_exc()[-400:]}")
                continue
            rows.append(r)
            log("  " + json.dumps(r))
        result["decode"] = rows
        bf16 = {(r["batch"], r["ctx"], r["block"]): r for r in rows if r["kv"] == "bf16"}
        for r in rows:
            if r["kv"] == "fp8":
                base = bf16.get((r["batch"], r["ctx"], r["block"]))
                r["speedup_vs_bf16"] = base["t_ms"] / r["t_ms"] if base else None
                if base and base.get("graph_ms") and r.get("graph_ms"):
                    r["speedup_vs_bf16_graph"] = base["graph_ms"] / r["graph_ms"]
        log("== prefill ==")
        result["prefill"] = []
        for kernel_name in ("auto", "triton"):  # auto: the Gluon kernel on Hopper
            try:
                pr = prefill_row(cfg=dict(kernel=kernel_name), sdpa=kernel_name == "auto")
                pr["kernel"] = "sm90 (Gluon)" if kernel_name == "auto" and sm90_ok(
                    torch.empty(1, 1, D, device=DEV, dtype=torch.bfloat16),
                    torch.empty(1, 16, HKV, D, device=DEV, dtype=torch.bfloat16)) else "triton"
                if result["prefill"]:  # SDPA timed once, with the first row
                    for key in ("sdpa_ms", "sdpa_form", "sdpa_tflops", "sdpa_all_ms"):
                        pr[key] = result["prefill"][0][key]
                result["prefill"].append(pr)
                log("  " + json.dumps(pr))
            except Exception:  # noqa: BLE001
                log(traceback.format_exc()[-600:])
        md = render_md(result)
        with open(os.path.join(args.out, "kernels.md"), "w") as f:
            f.write(md)
        print(md)
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
    if args.sweep:
        try:
            result["sweep"] = sweep(deadline)
        finally:
            with open(os.path.join(args.out, "sweep.json"), "w") as f:
                json.dump(result.get("sweep"), f, indent=1, default=str)
        log(f"sweep done ({time.time()-T0:.0f}s)")
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(args.out, "log.txt"), "w") as f:
        f.write("\n".join(LOG))
    log(f"total {time.time()-T0:.0f}s")


def render_md(result) -> str:
    env = result["env"]
    lines = [
        f"device: {env['device']} ({env['sms']} SMs) | torch {env['torch']} | triton {env['triton']} | "
        f"CUDA {env['cuda']} | {env['date']}",
        f"command: `{env['command']}`",
        "",
        "Paged decode: 32 query heads, 8 KV heads, head_dim 128, bf16 q, randomly permuted block tables. "
        "Times are do_bench medians with a cold L2 (do_bench zeroes 256 MB before every run); GB/s = K+V bytes "
        "read / time; 'vs SDPA' = SDPA time / paged time (> 1: paged faster).",
        "",
        "| batch | ctx | block | KV | splits | paged us | GB/s | SDPA us (form) | vs SDPA | paged / SDPA us in CUDA graph (vs SDPA) | Flex paged us | paged vs Flex | err |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result.get("decode", []):
        sd = r.get("sdpa_ms")
        fl = r.get("flex_ms")
        extra = f" ({r['speedup_vs_bf16']:.2f}x bf16)" if r.get("speedup_vs_bf16") else ""
        lines.append(
            f"| {r['batch']} | {r['ctx']} | {r['block']} | {r['kv']} | {r['splits']} | {r['t_ms']*1e3:.1f}{extra} | "
            f"{r['gbps']:.0f} | {fmt(sd and sd*1e3, '.1f')} ({r['sdpa_form']}) | "
            f"{fmt(sd and sd / r['t_ms'], '.2f')} | {fmt(r.get('graph_ms') and r['graph_ms']*1e3, '.1f')} / "
            f"{fmt(r.get('sdpa_graph_ms') and r['sdpa_graph_ms']*1e3, '.1f')} "
            f"({fmt(r.get('sdpa_graph_ms') and r.get('graph_ms') and r['sdpa_graph_ms'] / r['graph_ms'], '.2f')}) | "
            f"{fmt(fl and fl*1e3, '.1f')} ({r['flex_note']}) | "
            f"{fmt(fl and fl / r['t_ms'], '.2f')} | {r['err']:.1e} |"
        )
    for r in result.get("decode", []):
        if r.get("speedup_vs_bf16_graph"):
            lines.append(f"\nFP8 KV vs bf16 KV at {r['batch']} x {r['ctx']}: {r['speedup_vs_bf16']:.2f}x eager, "
                         f"{r['speedup_vs_bf16_graph']:.2f}x in CUDA graphs.")
        if r.get("loop_us"):
            lines.append(f"\nBatch {r['batch']} x {r['ctx']}: back-to-back calls (warm L2, no graph) take "
                         f"{r['loop_us']:.1f} us per call for the paged kernel, "
                         f"{fmt(r.get('sdpa_loop_us'), '.1f')} us for SDPA.")
    for p in result.get("prefill", []):
        lines += [
            "",
            f"Paged prefill ({p.get('kernel', 'triton')} kernel), batch {p['batch']} x {p['prompt']}-token prompts "
            f"(block {p['block']}, causal): "
            f"{p['t_ms']*1e3:.0f} us ({p['tflops']:.0f} TFLOP/s) vs SDPA causal on contiguous K/V "
            f"{p['sdpa_ms']*1e3:.0f} us ({p['sdpa_tflops']:.0f} TFLOP/s, {p['sdpa_form']}): "
            f"{p['sdpa_ms']/p['t_ms']:.2f}x SDPA; rel err vs SDPA {p['err']:.1e}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
