"""Paged decode attention: one query token per sequence, K/V read straight through the block table.

Layout (docs/architecture.md): q [batch, num_q_heads, head_dim]; k_cache / v_cache
[num_blocks, block_size, num_kv_heads, head_dim] (any stride on the block axis); block_tables
[batch, max_blocks_per_seq] int32 (entries past a sequence's last block are never read); seq_lens [batch] int32.

Kernel design
- One program handles one (sequence, KV head, split): the QUERIES_PER_KV query heads that share the KV head
  are the rows of one [BLOCK_H, head_dim] query tile (padded to 16 rows for the tensor cores), so each K/V
  byte is read from memory once for the whole GQA group.
- K/V tiles of BLOCK_N tokens are gathered through the block table: token n lives in physical block
  block_tables[b, n // block_size] at offset n % block_size. When a tile lies inside one block (block_size
  >= BLOCK_N) a single table entry is read per tile.
- Online softmax in fp32 (base-2 exponentials, scale folded into one multiplier); fp32 accumulator.
- Split-KV (flash-decoding): the context is cut into NUM_SPLITS contiguous ranges, each program writes a
  normalised partial output and its log-sum-exp, and `_decode_reduce_kernel` merges them. NUM_SPLITS is
  chosen on the host from batch size, KV heads, a max-length bound known without reading seq_lens (the
  caller's `max_seq_len` hint, else block_tables.shape[1] * block_size) and the SM count: no host sync, so
  the call can be captured in a CUDA graph. With one split the kernel writes the output directly.
- FP8 (e4m3) caches are dequantised on load: K is widened to the query dtype and k_scale is folded into the
  score multiplier; v_scale multiplies the output once at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    cdiv,
    cache_strides,
    compute_mode,
    dot_precision,
    gather_context_ref,
    is_fp8,
    kernel_for,
    kv_scales,
    next_pow2,
    prepare_attention_call,
    num_sms,
)


@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_lens_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    qk_scale,  # softmax scale * k_scale * log2(e)
    v_scale,
    num_q_heads,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    COMPUTE: tl.constexpr,  # operand dtype of the two products: "q" (q's dtype), "fp16" or "fp32"
):
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    # contiguous token range of this split, a multiple of BLOCK_N long (so tiles never straddle splits)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_bn = tl.arange(0, BLOCK_N)
    heads = kvh * QUERIES_PER_KV + offs_h
    mask_h = offs_h < QUERIES_PER_KV
    if BLOCK_D == HEAD_DIM:
        mask_hd = mask_h[:, None]
    else:
        mask_hd = mask_h[:, None] & (offs_d[None, :] < HEAD_DIM)

    # operand dtype of the two matrix products: the query dtype (K/V widened to it); fp16 for FP8 caches
    # (e4m3 -> fp16 is one packed conversion per two values, e4m3 -> bf16 goes through fp32); fp32 for fp32
    # inputs and under the CPU interpreter (its dot can't take 16-bit floats)
    if COMPUTE == "fp32":
        cdtype = tl.float32
    elif COMPUTE == "fp16":
        cdtype = tl.float16
    else:
        cdtype = q_ptr.dtype.element_ty
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_hd, other=0.0)
    q = q.to(cdtype)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    bt_row = bt_ptr + b64 * stride_bt
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_bn
        mask_n = offs_n < end
        if PAGE_SIZE >= BLOCK_N:
            # the whole tile lies in one block: one table entry
            page = tl.load(bt_row + start_n // PAGE_SIZE).to(tl.int64)
            tok = (offs_n % PAGE_SIZE)[:, None]
            k_off = page * stride_kb + tok * stride_kt
            v_off = page * stride_vb + tok * stride_vt
        else:
            page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)[:, None]
            tok = (offs_n % PAGE_SIZE)[:, None]
            k_off = page * stride_kb + tok * stride_kt
            v_off = page * stride_vb + tok * stride_vt
        if BLOCK_D == HEAD_DIM:
            kv_mask = mask_n[:, None]
        else:
            kv_mask = mask_n[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_head + k_off + offs_d[None, :], mask=kv_mask, other=0.0).to(cdtype)
        v = tl.load(v_head + v_off + offs_d[None, :], mask=kv_mask, other=0.0).to(cdtype)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N], log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(cdtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0.0
    o = acc * (v_scale / tl.where(has, l_i, 1.0))[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask_hd)
    else:
        row = (b64 * num_q_heads + heads) * NUM_SPLITS + split  # [BLOCK_H]
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask_hd)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=mask_h)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    num_q_heads,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * num_q_heads + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    valid = lse > float("-inf")
    w = tl.where(valid, tl.exp2(tl.where(valid, lse - m, 0.0)), 0.0)
    denom = tl.sum(w, 0)
    po = tl.load(
        part_o_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    o = tl.sum(po * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------------------
# launch configuration (tuned on an H100: benchmarks/results/kernels-h100.md)

MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 64
CTAS_PER_SM = 2


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, sms: int) -> int:
    """Splits so that batch * kv_heads * splits programs give every SM about CTAS_PER_SM programs, without
    making a split shorter than MIN_TOKENS_PER_SPLIT tokens. A power of two (it is a compile-time constant).
    On an H100 (132 SMs, 8 KV heads): batch 1 x 4096 -> 64, 16 x 16384 -> 4, 64 x 2048 -> 1."""
    base = max(1, batch * num_kv_heads)
    want = next_pow2(cdiv(CTAS_PER_SM * sms, base))
    cap = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    cap = 1 << (cap.bit_length() - 1)
    return max(1, min(want, cap, MAX_SPLITS))


def _default_config(device: torch.device, block_size: int, head_dim: int, cache_dtype: torch.dtype):
    """(BLOCK_N, num_warps, num_stages)."""
    if device.type != "cuda":
        return 32, 4, 1
    if is_fp8(cache_dtype):
        return 128, 2, 2  # half the bytes per token: twice the tokens per tile
    return 64, 4, 3


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    _compute: str | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache; returns `out` ([batch, num_q_heads, head_dim], q's dtype).

    k_scale / v_scale dequantise FP8 caches (stored = value / scale) and are ignored for other dtypes.
    `max_seq_len` is an optional upper bound on seq_lens used only to choose the number of KV splits
    (default: block_tables.shape[1] * block_size); `num_splits`, `block_n`, `num_warps`, `num_stages`
    override the tuned launch configuration.
    """
    q, block_tables, out, block_size, num_kv_heads, head_dim = prepare_attention_call(
        q, k_cache, v_cache, block_tables, out, "batch")
    batch, num_q_heads, _ = q.shape
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if batch == 0:
        return out

    ks, vs = kv_scales(k_cache.dtype, k_scale, v_scale)
    device = q.device
    qpk = num_q_heads // num_kv_heads
    d_bn, d_nw, d_ns = _default_config(device, block_size, head_dim, k_cache.dtype)
    block_n = block_n or d_bn
    num_warps = num_warps or d_nw
    num_stages = num_stages or d_ns
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(batch, num_kv_heads, int(bound), num_sms(device))
    num_splits = max(1, int(num_splits))

    block_h = max(16, next_pow2(qpk))
    block_d = next_pow2(head_dim)
    if num_splits > 1:
        part_o = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=device)
    else:
        part_o = part_lse = out  # unused
    kernel_for(_paged_decode_kernel, device)[(num_kv_heads, batch, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_o,
        part_lse,
        float(scale) * ks * LOG2E,
        vs,
        num_q_heads,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *cache_strides(k_cache, v_cache),
        block_tables.stride(0),
        QUERIES_PER_KV=qpk,
        BLOCK_H=block_h,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(q.dtype),
        COMPUTE=_compute or compute_mode(q.dtype, k_cache.dtype, device),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        kernel_for(_decode_reduce_kernel, device)[(num_q_heads, batch)](
            part_o,
            part_lse,
            out,
            num_q_heads,
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            BLOCK_S=next_pow2(num_splits),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            num_warps=4 if head_dim * num_splits >= 2048 else 2,
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# reference


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    compute_dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype | None = None,
    **_ignored,
) -> torch.Tensor:
    """Torch reference: gathers each sequence's K/V through its block table and computes in
    `compute_dtype` (float64 by default; float32 where float64 is unavailable, e.g. on MPS).
    Returns `out_dtype` (default q's dtype), or writes into `out`."""
    num_kv_heads = k_cache.shape[2]
    batch, num_q_heads, head_dim = q.shape
    qpk = num_q_heads // num_kv_heads
    ks, vs = kv_scales(k_cache.dtype, k_scale, v_scale)
    res = torch.empty((batch, num_q_heads, head_dim), dtype=compute_dtype, device=q.device)
    lens = seq_lens.tolist()
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            res[b] = 0
            continue
        k = gather_context_ref(k_cache, block_tables[b], n, ks, compute_dtype)  # [n, Hkv, D]
        v = gather_context_ref(v_cache, block_tables[b], n, vs, compute_dtype)
        k = k.repeat_interleave(qpk, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(qpk, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].to(compute_dtype), k) * scale
        p = torch.softmax(s, dim=-1)
        res[b] = torch.einsum("hn,nhd->hd", p, v)
    if out is None:
        return res.to(out_dtype or q.dtype)
    out.copy_(res)
    return out


__all__ = ["paged_decode_attention", "paged_decode_attention_ref", "choose_num_splits"]
