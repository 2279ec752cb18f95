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
  normalised partial output and its log-sum-exp, then takes a ticket from a per-(sequence, KV head)
  counter; the program that draws the last ticket merges the splits and resets the counter. One launch
  per call instead of a split kernel plus a merge kernel: at batch 1 the whole step is ~20 us of GPU work
  and a second Python launch costs as much again on the host. NUM_SPLITS is
  chosen on the host from batch size, KV heads, a max-length bound known without reading seq_lens (the
  caller's `max_seq_len` hint, else block_tables.shape[1] * block_size) and the SM count: no host sync, so
  the call can be captured in a CUDA graph. With one split the kernel writes the output directly.
- Load balance: the grid's slowest axis walks the sequences in the caller's `order` (the CUDA graphs pass
  longest first), so the long programs start first and the short ones fill the SMs at the end instead of a
  long sequence starting last and running alone (longest-processing-time-first scheduling). Without an
  order, rows in batch order.
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
    launch_kernel,
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
    order_ptr,  # int32 [batch]: the row each program column takes (longest first: the SMs finish together)
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    ticket_ptr,  # int32 [batch * num_kv_heads], zero between calls (the merging program resets its entry)
    qk_scale,  # softmax scale * k_scale * log2(e)
    v_scale,
    num_q_heads,
    num_kv_heads,
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
    BLOCK_S: tl.constexpr,  # next_pow2(NUM_SPLITS)
    DOT_PRECISION: tl.constexpr,
    COMPUTE: tl.constexpr,  # operand dtype of the two products: "q" (q's dtype), "fp16" or "fp32"
):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.load(order_ptr + tl.program_id(2))

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
        # every thread's partial stores happen before the ticket (barrier, then a gpu-scope acq_rel atomic),
        # so the program drawing the last ticket sees all splits; it reads them through L2 (.cg), never L1
        tl.debug_barrier()
        ticket = ticket_ptr + b64 * num_kv_heads + kvh
        if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
            offs_s = tl.arange(0, BLOCK_S)
            mask_s = offs_s < NUM_SPLITS
            for i in tl.static_range(QUERIES_PER_KV):  # one query head of the group at a time
                hrow = (b64 * num_q_heads + kvh * QUERIES_PER_KV + i) * NUM_SPLITS
                lse_s = tl.load(part_lse_ptr + hrow + offs_s, mask=mask_s, other=float("-inf"),
                                cache_modifier=".cg")
                m_s = tl.max(lse_s, 0)
                valid = lse_s > float("-inf")
                w = tl.where(valid, tl.exp2(tl.where(valid, lse_s - m_s, 0.0)), 0.0)
                po = tl.load(part_o_ptr + (hrow + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                             mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0, cache_modifier=".cg")
                denom = tl.sum(w, 0)
                o_h = tl.sum(po * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
                tl.store(out_ptr + b64 * stride_ob + (kvh * QUERIES_PER_KV + i) * stride_oh + offs_d,
                         o_h.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
            tl.atomic_xchg(ticket, 0, sem="relaxed", scope="gpu")  # ready for the next call (or graph replay)


# ----------------------------------------------------------------------------------------------------------
# launch configuration (tuned on an H100: benchmarks/results/kernels-h100.md)

MIN_TOKENS_PER_SPLIT = 64
MAX_SPLITS = 32  # the in-kernel merge reads every split: 1 x 4096 took 21 us at 32 splits, 26 us at 64
# programs per SM the split count aims at (2: about one wave of this kernel's CTAs); 4 and 8 (more, shorter
# programs for the longest-first order to balance) made 'mixed' no faster on an H100 (2026-12-07)
CTAS_PER_SM = 2


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, sms: int) -> int:
    """Splits so that batch * kv_heads * splits programs give every SM about CTAS_PER_SM programs, without
    making a split shorter than MIN_TOKENS_PER_SPLIT tokens. A power of two (it is a compile-time constant).
    On an H100 (132 SMs, 8 KV heads): batch 1 x 4096 -> 32, 16 x 16384 -> 4, 64 x 2048 -> 1."""
    base = max(1, batch * num_kv_heads)
    want = next_pow2(cdiv(CTAS_PER_SM * sms, base))
    cap = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    cap = 1 << (cap.bit_length() - 1)
    return max(1, min(want, cap, MAX_SPLITS))


# Split-KV tickets: one zeroed int32 counter per (sequence, KV head), kept per device and reused by every call
# (each call leaves them zero again). Grown, never freed: a CUDA graph captured with an older buffer keeps
# replaying against it.
_tickets: dict[torch.device, list[torch.Tensor]] = {}


def split_tickets(device: torch.device, n: int) -> torch.Tensor:
    bufs = _tickets.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device))
    return bufs[-1]


# The identity order (batch rows as they come), per device, grown, never freed (a captured graph keeps it).
_identity: dict[torch.device, torch.Tensor] = {}


def _identity_order(device: torch.device, n: int) -> torch.Tensor:
    buf = _identity.get(device)
    if buf is None or buf.numel() < n:
        buf = _identity[device] = torch.arange(max(n, 1024), dtype=torch.int32, device=device)
    return buf[:n]


# Split partial outputs and log-sum-exps, one pair per (device, batch, heads, splits, head_dim), kept: each
# call overwrites what it reads before it returns (in stream order), and an allocation per call costs as
# much host time as the launch. Calls on one stream only (the engine's); a CUDA graph keeps its own pair.
_split_buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_workspace(device, batch: int, heads: int, splits: int, head_dim: int):
    key = (device, batch, heads, splits, head_dim, device.type == "cuda" and torch.cuda.is_current_stream_capturing())
    bufs = _split_buffers.get(key)
    if bufs is None or key[-1]:  # while capturing: the graph's own allocation
        bufs = (torch.empty((batch, heads, splits, head_dim), dtype=torch.float32, device=device),
                torch.empty((batch, heads, splits), dtype=torch.float32, device=device))
        if not key[-1]:
            _split_buffers[key] = bufs
    return bufs


def _default_config(device: torch.device, block_size: int, head_dim: int, cache_dtype: torch.dtype):
    """(BLOCK_N, num_warps, num_stages)."""
    if device.type != "cuda":
        return 32, 4, 1
    if is_fp8(cache_dtype):
        return 128, 2, 2  # half the bytes per token: twice the tokens per tile
    return 64, 4, 3


# Launch configuration per call shape, computed once: the host cost of an eager decode call matters as much
# as the kernel at batch 1 (see _common._DirectLauncher).
_launch_configs: dict[tuple, tuple] = {}


def _launch_config(device, q_dtype, cache_dtype, batch, num_q_heads, num_kv_heads, head_dim, block_size, bound_bits,
                   num_splits, block_n, num_warps, num_stages, compute):
    """(grid, splits, keyword arguments of the kernel launch) for one call shape."""
    d_bn, d_nw, d_ns = _default_config(device, block_size, head_dim, cache_dtype)
    if num_splits is None:
        bound = (1 << (bound_bits - 1)) * MIN_TOKENS_PER_SPLIT  # same split cap as the caller's bound
        num_splits = choose_num_splits(batch, num_kv_heads, bound, num_sms(device))
    num_splits = max(1, int(num_splits))
    qpk = num_q_heads // num_kv_heads
    kwargs = dict(
        QUERIES_PER_KV=qpk,
        BLOCK_H=max(16, next_pow2(qpk)),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        PAGE_SIZE=block_size,
        BLOCK_N=block_n or d_bn,
        NUM_SPLITS=num_splits,
        BLOCK_S=next_pow2(num_splits),
        DOT_PRECISION=dot_precision(q_dtype),
        COMPUTE=compute or compute_mode(q_dtype, cache_dtype, device),
        num_warps=num_warps or d_nw,
        num_stages=num_stages or d_ns,
    )
    return (num_kv_heads, num_splits, batch), num_splits, kwargs


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
    order: torch.Tensor | None = None,
    _compute: str | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache; returns `out` ([batch, num_q_heads, head_dim], q's dtype).

    k_scale / v_scale dequantise FP8 caches (stored = value / scale) and are ignored for other dtypes.
    `max_seq_len` is an optional upper bound on seq_lens used only to choose the number of KV splits
    (default: block_tables.shape[1] * block_size); `num_splits`, `block_n`, `num_warps`, `num_stages`
    override the tuned launch configuration. `order` (int32 [batch], a permutation of the rows) is the order
    the programs take the sequences in: longest first balances the SMs; the result does not depend on it.
    """
    q, block_tables, out, block_size, num_kv_heads, head_dim = prepare_attention_call(
        q, k_cache, v_cache, block_tables, out, "batch")
    batch, num_q_heads, _ = q.shape
    if seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        seq_lens = seq_lens.to(torch.int32).contiguous()
    if batch == 0:
        return out
    device = q.device
    bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    # the split heuristic sees the bound only through floor(log2(bound / MIN_TOKENS_PER_SPLIT))
    bound_bits = max(1, int(bound) // MIN_TOKENS_PER_SPLIT).bit_length()
    key = (device, q.dtype, k_cache.dtype, batch, num_q_heads, num_kv_heads, head_dim, block_size, bound_bits,
           num_splits, block_n, num_warps, num_stages, _compute)
    launch = _launch_configs.get(key)
    if launch is None:
        launch = _launch_configs[key] = _launch_config(*key)
    grid, splits, kwargs = launch
    if splits > 1:
        part_o, part_lse = _split_workspace(device, batch, num_q_heads, splits, head_dim)
        tickets = split_tickets(device, batch * num_kv_heads)
    else:
        part_o = part_lse = tickets = out  # unused
    if order is None:
        order = _identity_order(device, batch)
    ks, vs = kv_scales(k_cache.dtype, k_scale, v_scale)
    launch_kernel(_paged_decode_kernel, device, grid, (
        q, k_cache, v_cache, block_tables, seq_lens, order, out, part_o, part_lse, tickets,
        float(scale) * ks * LOG2E, vs, num_q_heads, num_kv_heads,
        *q.stride()[:2], *out.stride()[:2], *cache_strides(k_cache, v_cache), block_tables.stride(0),
    ), kwargs, key)
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
