"""Paged prefill attention (chunked prefill, prefix-cache hits, mixed batches).

q [num_tokens, num_q_heads, head_dim] is flat over sequences: sequence i owns rows
query_start_loc[i] : query_start_loc[i+1], and those queries are the LAST q_len_i positions of its
seq_lens[i]-token context. Each query attends causally to itself and everything before it; its own K/V (and
those of the earlier new tokens) were already written to the cache by reshape_and_cache.

Kernel design
- Grid (num_kv_heads, num_q_blocks_upper_bound): a program takes BLOCK_Q query tokens of one sequence and
  the QUERIES_PER_KV query heads sharing one KV head, i.e. a [BLOCK_M = BLOCK_Q * QUERIES_PER_KV, head_dim]
  tile (row r = token r // QPK, head r % QPK), so every K/V tile serves the whole GQA group. The program's
  sequence is found by a binary search over query_start_loc (no host-side tables, no sync); surplus
  programs of the upper bound num_tokens // BLOCK_Q + num_seqs exit at once. Program ids are reversed so
  the longest (last) query blocks start first.
- K/V are gathered through the block table per BLOCK_N-token tile. The KV loop has two phases: tiles wholly
  below the tile's first query position need no mask at all; the rest (the causal diagonal) are masked.
- fp32 online softmax (base 2), fp32 accumulator, FP8 caches widened on load (k_scale folded into the score
  multiplier, v_scale applied to the output).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    cache_strides,
    compute_mode,
    dot_precision,
    gather_context_ref,
    is_fp8,
    kernel_for,
    kv_scales,
    next_pow2,
)
from .prefill_common import find_query_block, prepare_prefill_call


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    bt_ptr,
    seq_lens_ptr,
    qsl_ptr,
    qk_scale,  # softmax scale * k_scale * log2(e)
    v_scale,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    COMPUTE: tl.constexpr,  # operand dtype of the two products: "q" (q's dtype), "fp16" or "fp32"
):
    kvh = tl.program_id(0)
    qb = tl.num_programs(1) - 1 - tl.program_id(1)  # heavy (late) query blocks first
    seq, q_begin, q_len, q_block = find_query_block(qsl_ptr, num_seqs, qb, BLOCK_Q)
    if q_block * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - q_len  # keys already in the cache before these queries

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_bn = tl.arange(0, BLOCK_N)
        q_tok = q_block * BLOCK_Q + offs_m // QUERIES_PER_KV  # token within the sequence's queries
        heads = kvh * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
        mask_m = (q_tok < q_len) & (offs_m < BLOCK_Q * QUERIES_PER_KV)
        if BLOCK_D == HEAD_DIM:
            mask_md = mask_m[:, None]
        else:
            mask_md = mask_m[:, None] & (offs_d[None, :] < HEAD_DIM)
        q_pos = context + q_tok  # absolute position of each row's query
        row_off = (q_begin + q_tok).to(tl.int64)

        if COMPUTE == "fp32":
            cdtype = tl.float32
        elif COMPUTE == "fp16":
            cdtype = tl.float16
        else:
            cdtype = q_ptr.dtype.element_ty
        q = tl.load(q_ptr + row_off[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_md, other=0.0).to(cdtype)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        k_head = k_ptr + kvh.to(tl.int64) * stride_kh
        v_head = v_ptr + kvh.to(tl.int64) * stride_vh
        first_pos = context + q_block * BLOCK_Q  # every row may see keys <= first_pos
        last_pos = tl.minimum(context + q_block * BLOCK_Q + BLOCK_Q, seq_len)  # exclusive end of keys seen
        full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N

        # loop-invariant in-page offsets (int32): row r of a tile is token r % PAGE_SIZE of its page when a
        # tile spans several pages, token (start_n % PAGE_SIZE) + r of one page otherwise
        if PAGE_SIZE >= BLOCK_N:
            k_off = offs_bn[:, None] * stride_kt + offs_d[None, :]
            v_off = offs_bn[:, None] * stride_vt + offs_d[None, :]
        else:
            NPAGES: tl.constexpr = BLOCK_N // PAGE_SIZE
            k_off = (offs_bn % PAGE_SIZE)[:, None] * stride_kt + offs_d[None, :]
            v_off = (offs_bn % PAGE_SIZE)[:, None] * stride_vt + offs_d[None, :]
            offs_pg = tl.arange(0, NPAGES)
        if BLOCK_D == HEAD_DIM:
            d_mask = None
        else:
            d_mask = offs_d[None, :] < HEAD_DIM

        # phase 1: key tiles every row sees completely (no causal mask, no bounds checks)
        for start_n in range(0, full_end, BLOCK_N):
            if PAGE_SIZE >= BLOCK_N:
                page = tl.load(bt_row + start_n // PAGE_SIZE).to(tl.int64)
                in_pg = start_n % PAGE_SIZE
                k_ptrs = k_head + (page * stride_kb + in_pg * stride_kt) + k_off
                v_ptrs = v_head + (page * stride_vb + in_pg * stride_vt) + v_off
            else:
                pages = tl.load(bt_row + start_n // PAGE_SIZE + offs_pg).to(tl.int64)  # one id per page
                row_pg = tl.reshape(tl.broadcast_to(pages[:, None], (NPAGES, PAGE_SIZE)), (BLOCK_N,))
                k_ptrs = k_head + (row_pg * stride_kb)[:, None] + k_off
                v_ptrs = v_head + (row_pg * stride_vb)[:, None] + v_off
            if BLOCK_D == HEAD_DIM:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_mask, other=0.0)
                v = tl.load(v_ptrs, mask=d_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(cdtype)), input_precision=DOT_PRECISION)
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(cdtype), v.to(cdtype), input_precision=DOT_PRECISION)
            m_i = m_new

        # phase 2: the causal diagonal (and the ragged end of the context)
        for start_n in range(full_end, last_pos, BLOCK_N):
            offs_n = start_n + offs_bn
            mask_n = offs_n < last_pos
            if PAGE_SIZE >= BLOCK_N:
                page = tl.load(bt_row + start_n // PAGE_SIZE).to(tl.int64)
                in_pg = start_n % PAGE_SIZE
                k_ptrs = k_head + (page * stride_kb + in_pg * stride_kt) + k_off
                v_ptrs = v_head + (page * stride_vb + in_pg * stride_vt) + v_off
            else:
                pg_idx = start_n // PAGE_SIZE + offs_pg
                pages = tl.load(bt_row + pg_idx, mask=pg_idx * PAGE_SIZE < last_pos, other=0).to(tl.int64)
                row_pg = tl.reshape(tl.broadcast_to(pages[:, None], (NPAGES, PAGE_SIZE)), (BLOCK_N,))
                k_ptrs = k_head + (row_pg * stride_kb)[:, None] + k_off
                v_ptrs = v_head + (row_pg * stride_vb)[:, None] + v_off
            if BLOCK_D == HEAD_DIM:
                kv_mask = mask_n[:, None]
            else:
                kv_mask = mask_n[:, None] & d_mask
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(cdtype)), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where((offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(cdtype), v.to(cdtype), input_precision=DOT_PRECISION)
            m_i = m_new

        o = acc * (v_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
        tl.store(out_ptr + row_off[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_md)


def _default_config(device: torch.device, head_dim: int, qpk: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if device.type != "cuda":
        return 32, 32, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim >= 128:
        return 256, 64, 16, 4  # H100, 8 x 2048 bf16: 739 us vs 759-775 us at 8 warps / 3 stages
    return 256, 64, 8, 3


# FP8 caches widened for the Gluon kernel (K + V of one call): past this (say, a whole mixed batch's contexts
# in one call) the Triton kernel reads the FP8 pages itself
WIDEN_MAX_BYTES = 1 << 28


def _sm90_form(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor) -> str | None:
    """How the Gluon kernel serves this call on Hopper: "direct", "widened" (FP8 caches, kernels/widen_pages.py)
    or None (the Triton kernel; always with PAGEDFLEET_SM90_PREFILL=0)."""
    if os.environ.get("PAGEDFLEET_SM90_PREFILL", "1") == "0" or q.device.type != "cuda":
        return None
    try:
        from .paged_prefill_attention_sm90 import supports
    except ImportError:  # a Triton without Gluon
        return None
    if supports(q, k_cache, v_cache):
        return "direct"
    widened_bytes = 2 * block_tables.numel() * k_cache[0].numel() * q.element_size()
    if is_fp8(k_cache.dtype) and widened_bytes <= WIDEN_MAX_BYTES and supports(q, k_cache, v_cache, widened=True):
        return "widened"
    return None


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Causal attention of new tokens over a paged KV cache; returns `out` ([num_tokens, q_heads, head_dim]).

    `max_query_len` is accepted for interface compatibility (the grid is sized from num_tokens and
    num_seqs, which needs no bound). k_scale / v_scale dequantise FP8 caches and are ignored otherwise.
    `kernel`: "triton" (this file's kernel), "sm90" (the Gluon kernel for Hopper,
    paged_prefill_attention_sm90.py) or "auto" (sm90 where it applies, else triton; a tile configuration
    passed with "auto" is this kernel's, so it selects "triton").
    """
    del max_query_len
    if kernel not in ("auto", "triton", "sm90"):
        raise ValueError(f"unknown prefill kernel {kernel!r}")
    tile_config = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    # a tile configuration given with "auto" is one of this kernel's (the Gluon kernel has its own knobs)
    form = None
    if kernel == "sm90" or (kernel == "auto" and all(v is None for v in tile_config.values())):
        form = _sm90_form(q, k_cache, v_cache, block_tables) or ("direct" if kernel == "sm90" else None)
    if form is not None:
        from .paged_prefill_attention_sm90 import paged_prefill_attention_sm90

        if form == "widened":
            from .widen_pages import widen_pages

            k_cache, v_cache, block_tables = widen_pages(k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale,
                                                         q.dtype)
        cfg = {k: v for k, v in dict(block_n=block_n, num_stages=num_stages).items() if v is not None}
        return paged_prefill_attention_sm90(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                            out=out, **cfg)
    return _prefill_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out,
                           k_scale, v_scale, **tile_config)


def _prefill_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, k_scale, v_scale,
                    block_m, block_n, num_warps, num_stages) -> torch.Tensor:
    """This file's kernel: tiles from the defaults for the device unless given."""
    q, block_tables, out, block_size, num_kv_heads, head_dim, seq_lens, query_start_loc = prepare_prefill_call(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    num_tokens, num_q_heads, _ = q.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out

    ks, vs = kv_scales(k_cache.dtype, k_scale, v_scale)
    device = q.device
    qpk = num_q_heads // num_kv_heads
    d_bm, d_bn, d_nw, d_ns = _default_config(device, head_dim, qpk, q.dtype)
    block_m = max(block_m or d_bm, next_pow2(qpk))
    block_n = block_n or d_bn
    block_q = max(1, block_m // qpk)
    num_q_blocks = num_tokens // block_q + num_seqs
    kernel_for(_paged_prefill_kernel, device)[(num_kv_heads, num_q_blocks)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        seq_lens,
        query_start_loc,
        float(scale) * ks * LOG2E,
        vs,
        num_seqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *cache_strides(k_cache, v_cache),
        block_tables.stride(0),
        QUERIES_PER_KV=qpk,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        PAGE_SIZE=block_size,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        COMPUTE=compute_mode(q.dtype, k_cache.dtype, device),
        num_warps=num_warps or d_nw,
        num_stages=num_stages or d_ns,
    )
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    compute_dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype | None = None,
    **_ignored,
) -> torch.Tensor:
    """Torch reference: per sequence, gather its context through the block table and run causal attention
    of its last q_len positions in `compute_dtype`."""
    num_kv_heads = k_cache.shape[2]
    num_tokens, num_q_heads, head_dim = q.shape
    qpk = num_q_heads // num_kv_heads
    ks, vs = kv_scales(k_cache.dtype, k_scale, v_scale)
    res = torch.zeros((num_tokens, num_q_heads, head_dim), dtype=compute_dtype, device=q.device)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, n in enumerate(lens):
        n = int(n)
        a, b = int(qsl[i]), int(qsl[i + 1])
        ql = b - a
        if ql == 0:
            continue
        k = gather_context_ref(k_cache, block_tables[i], n, ks, compute_dtype)  # [n, Hkv, D]
        v = gather_context_ref(v_cache, block_tables[i], n, vs, compute_dtype)
        k = k.repeat_interleave(qpk, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(qpk, dim=1)
        s = torch.einsum("qhd,nhd->hqn", q[a:b].to(compute_dtype), k) * scale
        pos = torch.arange(n - ql, n, device=q.device)
        allowed = torch.arange(n, device=q.device)[None, :] <= pos[:, None]  # [ql, n]
        s = s.masked_fill(~allowed[None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        res[a:b] = torch.einsum("hqn,nhd->qhd", p, v)
    if out is None:
        return res.to(out_dtype or q.dtype)
    out.copy_(res)
    return out


__all__ = ["paged_prefill_attention", "paged_prefill_attention_ref"]
