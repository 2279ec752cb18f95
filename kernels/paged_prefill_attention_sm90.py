"""Paged prefill attention for Hopper (sm_90), written in Gluon: the contract of `paged_prefill_attention.py`
(whose torch reference, `paged_prefill_attention_ref`, is this kernel's oracle too), with the schedule
spelled out instead of left to Triton's pipeliner.

Why a second kernel: on an H100 the Triton kernel reaches ~370 TFLOP/s on 8 x 2048 causal prefill, cuDNN
~490: Triton's warps issue q.k, wait, run the softmax, then issue p.v, and stop at CTA-wide barriers for
every K/V tile. Here, as in FlashAttention-3:
- warp specialisation: one producer warp issues TMA loads of K/V pages into a NUM_STAGES ring of shared
  memory (mbarriers say a slot is full or free); two consumer warpgroups, each its own partition with 64
  query rows, never wait for each other;
- inside a consumer the next tile's q.k runs on the tensor cores during this tile's softmax:

      issue  S_{j+1} = Q K_{j+1}^T      (async wgmma)
      issue  O      += P_j V_j          (async wgmma)
      wait until only P_j V_j is in flight; softmax of S_{j+1}
      wait for P_j V_j, free the slot, rescale O

Work layout as in the Triton kernel: a program owns BLOCK_Q = 128 / QPK query tokens of one sequence times
the QPK query heads of one KV head (row r = token r // QPK, head r % QPK), so a K/V tile serves the whole GQA
group. K/V are read through the block table page by page (TMA boxes of min(page, BLOCK_N) rows of a 2-D
view of the cache); pages past the context are pointed past the end of that view, which TMA fills with
zeros; slots past the context inside its last page are masked out of the scores and zeroed in the V tile
(whatever they hold, NaN included). bf16 / fp16, head_dim 64 or 128, contiguous caches (FP8 caches are
widened to q's dtype first, kernels/widen_pages.py); everything else uses the Triton kernel.
"""
from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._common import LOG2E, launch_kernel
from .prefill_common import find_query_block, prepare_prefill_call

ROWS_PER_WARPGROUP = 64
_SMEM_BYTES = 200 * 1024  # of the 227 KB a Hopper block may use: room for barriers and the epilogue's scratch
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _softmax_step(s, m_i, l_i, start_n, q_pos, last_pos, qk_scale, MASKED: gl.constexpr, BLOCK_N: gl.constexpr,
                  s_layout: gl.constexpr, p_layout: gl.constexpr, dtype: gl.constexpr):
    """One online-softmax step (base 2) on a score tile: (p as the next wgmma's A operand, alpha, m, l)."""
    if MASKED:  # the causal diagonal and the ragged end of the context
        offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < last_pos)
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet: keep exp2 finite
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    l_new = l_i * alpha + gl.sum(p, 1)
    return gl.convert_layout(p.to(dtype), p_layout), alpha, m_new, l_new


@gluon.jit
def _kv_producer(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_free, bt_row, num_tiles, last_pos, kv_col,
                 total_rows, PAGE_SIZE: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr):
    """One warp: TMA loads of K then V of every key tile into the ring, page by page."""
    TMA_ROWS: gl.constexpr = k_desc.block_type.shape[0]
    TILE_BYTES: gl.constexpr = k_desc.block_type.nbytes * (BLOCK_N // TMA_ROWS)
    for t in range(num_tiles):
        slot = t % NUM_STAGES
        mbarrier.wait(kv_free.index(slot), ((t // NUM_STAGES) & 1) ^ 1)  # fresh barriers pass at parity 1
        mbarrier.expect(k_ready.index(slot), TILE_BYTES)
        for i in gl.static_range(BLOCK_N // TMA_ROWS):
            tok = t * BLOCK_N + i * TMA_ROWS
            page = gl.load(bt_row + tok // PAGE_SIZE, mask=tok < last_pos, other=0)
            row = gl.where(tok < last_pos, page * PAGE_SIZE + tok % PAGE_SIZE, total_rows)  # past the end: zeros
            tma.async_copy_global_to_shared(k_desc, [row, kv_col], k_ready.index(slot),
                                            k_smem.index(slot).slice(i * TMA_ROWS, TMA_ROWS))
        mbarrier.expect(v_ready.index(slot), TILE_BYTES)
        for i in gl.static_range(BLOCK_N // TMA_ROWS):
            tok = t * BLOCK_N + i * TMA_ROWS
            page = gl.load(bt_row + tok // PAGE_SIZE, mask=tok < last_pos, other=0)
            row = gl.where(tok < last_pos, page * PAGE_SIZE + tok % PAGE_SIZE, total_rows)
            tma.async_copy_global_to_shared(v_desc, [row, kv_col], v_ready.index(slot),
                                            v_smem.index(slot).slice(i * TMA_ROWS, TMA_ROWS))


@gluon.jit
def _attention_consumer(q_ptr, out_ptr, q_smem, k_smem, v_smem, k_ready, v_ready, kv_free, tail_zeroed, qk_scale,
                        kvh, q_begin, q_len, q_block, context, num_tiles, num_full, last_pos, seq_len, stride_qt,
                        stride_qh, stride_ot, stride_oh, WARPGROUP: gl.constexpr, QUERIES_PER_KV: gl.constexpr,
                        BLOCK_Q: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                        NUM_STAGES: gl.constexpr):
    """One warpgroup: 64 query rows of the program's tile, all key tiles."""
    ROWS: gl.constexpr = 64
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    TPW_D: gl.constexpr = HEAD_DIM // 8  # 16 bytes per thread along head_dim
    io_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // TPW_D, TPW_D],
                                               warps_per_cta=[4, 1], order=[1, 0])

    # this warpgroup's Q rows -> shared memory (the wgmma reads A from there)
    offs_r = WARPGROUP * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, io_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
    q_tok = q_block * BLOCK_Q + offs_r // QUERIES_PER_KV
    heads = kvh * QUERIES_PER_KV + offs_r % QUERIES_PER_KV
    row_ok = q_tok < q_len
    rows = (q_begin + q_tok).to(gl.int64)
    q = gl.load(q_ptr + (rows * stride_qt + heads * stride_qh)[:, None] + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    q_smem.store(q)
    fence_async_shared()
    gl.thread_barrier()

    q_pos = context + q_block * BLOCK_Q + (WARPGROUP * ROWS + gl.arange(0, ROWS, layout=row_s)) // QUERIES_PER_KV
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)

    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    if num_full > 0:
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, q_pos, last_pos, qk_scale, False, BLOCK_N, s_layout,
                                           p_layout, dtype)
    else:
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, q_pos, last_pos, qk_scale, True, BLOCK_N, s_layout,
                                           p_layout, dtype)

    for j in range(0, num_tiles - 1):
        cur = j % NUM_STAGES
        nxt = (j + 1) % NUM_STAGES
        mbarrier.wait(k_ready.index(nxt), ((j + 1) // NUM_STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(cur), (j // NUM_STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(cur), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))  # S_{j+1} is done; P_j V_j may still run
        if j + 1 < num_full:
            p_next, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, (j + 1) * BLOCK_N, q_pos, last_pos, qk_scale,
                                                    False, BLOCK_N, s_layout, p_layout, dtype)
        else:
            p_next, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, (j + 1) * BLOCK_N, q_pos, last_pos, qk_scale,
                                                    True, BLOCK_N, s_layout, p_layout, dtype)
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))
        mbarrier.arrive(kv_free.index(cur), count=1)  # both products of tile j are done in this warpgroup
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p = p_next

    last = (num_tiles - 1) % NUM_STAGES
    mbarrier.wait(v_ready.index(last), ((num_tiles - 1) // NUM_STAGES) & 1)
    if num_tiles * BLOCK_N > seq_len:
        # The last tile reaches past the sequence: rows there came with their page (the tail of its last
        # block) and may hold anything. P is 0 there, but 0 * NaN is NaN, so zero every row from last_pos
        # on: each warpgroup its half of the rows, then both wait until both halves are done (the slot is
        # not refilled: no later tile).
        HALF: gl.constexpr = BLOCK_N // 2
        v_half = v_smem.index(last).slice(WARPGROUP * HALF, HALF)
        offs_n = WARPGROUP * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, io_layout))
        v_rows = v_half.load(io_layout)
        v_half.store(gl.where((offs_n < last_pos - (num_tiles - 1) * BLOCK_N)[:, None], v_rows,
                              gl.zeros_like(v_rows)))
        fence_async_shared()
        mbarrier.arrive(tail_zeroed, count=1)
        mbarrier.wait(tail_zeroed, 0)
    acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))

    l_o = gl.convert_layout(l_i, row_o)
    o = acc / gl.where(l_o > 0.0, l_o, 1.0)[:, None]
    o = gl.convert_layout(o.to(out_ptr.dtype.element_ty), io_layout)
    gl.store(out_ptr + (rows * stride_ot + heads * stride_oh)[:, None] + offs_d[None, :], o, mask=row_ok[:, None])


@gluon.jit(do_not_specialize=["num_seqs", "stride_bt", "total_rows"])
def _paged_prefill_sm90_kernel(
    q_ptr,
    out_ptr,
    k_desc,
    v_desc,
    bt_ptr,
    seq_lens_ptr,
    qsl_ptr,
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    total_rows,  # rows of the 2-D [num_blocks * block_size, num_kv_heads * head_dim] cache view
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    QUERIES_PER_KV: gl.constexpr,
    BLOCK_Q: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    PAGE_SIZE: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
):
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    kvh = gl.program_id(0)
    qb = gl.num_programs(1) - 1 - gl.program_id(1)  # heavy (late) query blocks first
    seq, q_begin, q_len, q_block = find_query_block(qsl_ptr, num_seqs, qb, BLOCK_Q)  # scalar Triton code
    if q_block * BLOCK_Q < q_len:
        seq_len = gl.load(seq_lens_ptr + seq)
        context = seq_len - q_len
        first_pos = context + q_block * BLOCK_Q  # every row may see keys <= first_pos
        last_pos = gl.minimum(first_pos + BLOCK_Q, seq_len)  # exclusive end of the keys any row sees
        num_tiles = gl.cdiv(last_pos, BLOCK_N)
        num_full = (first_pos + 1) // BLOCK_N  # tiles every row sees whole: no mask

        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        kv_free = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        tail_zeroed = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_free.index(i), count=2)  # one arrival per consumer warpgroup
        mbarrier.init(tail_zeroed, count=2)

        bt_row = bt_ptr + seq.to(gl.int64) * stride_bt
        kv_col = kvh * HEAD_DIM
        gl.warp_specialize([
            (_attention_consumer, (q_ptr, out_ptr, q_smem.index(0), k_smem, v_smem, k_ready, v_ready, kv_free,
                                   tail_zeroed, qk_scale, kvh, q_begin, q_len, q_block, context, num_tiles, num_full,
                                   last_pos, seq_len, stride_qt, stride_qh, stride_ot, stride_oh, 0,
                                   QUERIES_PER_KV, BLOCK_Q, HEAD_DIM, BLOCK_N, NUM_STAGES)),
            (_attention_consumer, (q_ptr, out_ptr, q_smem.index(1), k_smem, v_smem, k_ready, v_ready, kv_free,
                                   tail_zeroed, qk_scale, kvh, q_begin, q_len, q_block, context, num_tiles, num_full,
                                   last_pos, seq_len, stride_qt, stride_qh, stride_ot, stride_oh, 1,
                                   QUERIES_PER_KV, BLOCK_Q, HEAD_DIM, BLOCK_N, NUM_STAGES)),
            (_kv_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, kv_free, bt_row, num_tiles, last_pos,
                            kv_col, total_rows, PAGE_SIZE, BLOCK_N, NUM_STAGES)),
        ], [4, 1], [240, 24])

        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(k_ready.index(i))
            mbarrier.invalidate(v_ready.index(i))
            mbarrier.invalidate(kv_free.index(i))
        mbarrier.invalidate(tail_zeroed)


@functools.lru_cache(maxsize=None)
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None = None, *,
             widened: bool = False) -> bool:
    """Whether this kernel serves the call: Hopper; bf16/fp16 q and caches; head_dim 64 or 128; a GQA ratio
    dividing the 128-row tile; blocks of at least 8 tokens (a TMA box of whole 128-byte swizzle rows); caches
    laid out [num_blocks, block_size, num_kv_heads, head_dim] contiguously (the TMA view). `widened`: whether
    it would serve the caches once widened to q's dtype (kernels/widen_pages.py), whatever their dtype."""
    if q.device.type != "cuda" or not _is_hopper(q.device.index if q.device.index is not None else
                                                 torch.cuda.current_device()):
        return False
    v_cache = k_cache if v_cache is None else v_cache
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        return False
    num_q_heads, num_kv_heads, block_size = q.shape[1], k_cache.shape[2], k_cache.shape[1]
    layout_ok = widened or (k_cache.dtype == q.dtype and v_cache.dtype == q.dtype and k_cache.is_contiguous()
                            and v_cache.is_contiguous())
    return (q.dtype in _GL_DTYPES and layout_ok and q.shape[-1] in (64, 128) and num_q_heads % num_kv_heads == 0
            and (2 * ROWS_PER_WARPGROUP) % (num_q_heads // num_kv_heads) == 0 and block_size >= 8)


@functools.lru_cache(maxsize=None)
def _smem_layout(tma_rows: int, head_dim: int, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([tma_rows, head_dim], _GL_DTYPES[dtype])


def _cache_descriptor(cache: torch.Tensor, tma_rows: int) -> TensorDescriptor:
    """TMA descriptor of the 2-D view [num_blocks * block_size, num_kv_heads * head_dim] of a contiguous
    cache, in boxes of tma_rows x head_dim (the launcher encodes the TMA map from it at every launch)."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    rows, cols = num_blocks * block_size, num_kv_heads * head_dim
    return TensorDescriptor(cache.view(rows, cols), [rows, cols], [cols, 1], [tma_rows, head_dim],
                            _smem_layout(tma_rows, head_dim, cache.dtype))


def paged_prefill_attention_sm90(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    num_stages: int = 4,
) -> torch.Tensor:
    """Causal attention of new tokens over a paged KV cache on Hopper (see `paged_prefill_attention`)."""
    if not supports(q, k_cache, v_cache):
        raise ValueError("the sm90 prefill kernel needs CUDA tensors on a Hopper GPU, bf16 or fp16 q and caches of "
                         "q's dtype, head_dim 64 or 128, a GQA ratio dividing 128, blocks of >= 8 tokens and "
                         "contiguous caches; use kernel='triton'")
    smem = 2 * (2 * ROWS_PER_WARPGROUP + 2 * num_stages * block_n) * q.shape[-1]
    if num_stages < 2 or block_n not in (32, 64, 128) or smem > _SMEM_BYTES:
        raise ValueError(f"block_n {block_n} with {num_stages} stages: need 2+ stages, block_n 32/64/128 and "
                         f"Q + K/V ring within {_SMEM_BYTES} bytes of shared memory ({smem} asked)")
    q, block_tables, out, block_size, num_kv_heads, head_dim, seq_lens, query_start_loc = prepare_prefill_call(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    num_tokens, num_q_heads, _ = q.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    qpk = num_q_heads // num_kv_heads
    block_q = 2 * ROWS_PER_WARPGROUP // qpk  # supports() made sure qpk divides the tile
    tma_rows = min(block_size, block_n)
    grid = (num_kv_heads, num_tokens // block_q + num_seqs)
    args = (q, out, _cache_descriptor(k_cache, tma_rows), _cache_descriptor(v_cache, tma_rows), block_tables,
            seq_lens, query_start_loc, float(scale) * LOG2E, num_seqs, k_cache.shape[0] * block_size,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0))
    kwargs = dict(QUERIES_PER_KV=qpk, BLOCK_Q=block_q, HEAD_DIM=head_dim, PAGE_SIZE=block_size, BLOCK_N=block_n,
                  NUM_STAGES=num_stages, num_warps=4, maxnreg=168)
    launch_kernel(_paged_prefill_sm90_kernel, q.device, grid, args, kwargs)
    return out


def compile_for_sm90(dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, queries_per_kv: int = 4,
                     page_size: int = 16, block_n: int = 64, num_stages: int = 4):
    """Compile one specialisation for sm_90a without a GPU (Triton's compiler and ptxas run on the host):
    lets a CPU-only machine check that the kernel still builds. Returns Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    ty = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    tma_rows = min(page_size, block_n)
    desc = f"tensordesc<{ty}[{tma_rows}, {head_dim}],{_smem_layout(tma_rows, head_dim, dtype)!r}>"
    signature = dict(q_ptr=f"*{ty}", out_ptr=f"*{ty}", k_desc=desc, v_desc=desc, bt_ptr="*i32",
                     seq_lens_ptr="*i32", qsl_ptr="*i32", qk_scale="fp32", num_seqs="i32", total_rows="i32",
                     stride_qt="i32", stride_qh="i32", stride_ot="i32", stride_oh="i32", stride_bt="i32")
    constants = dict(QUERIES_PER_KV=queries_per_kv, BLOCK_Q=2 * ROWS_PER_WARPGROUP // queries_per_kv,
                     HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_N=block_n, NUM_STAGES=num_stages)
    names = list(signature) + list(constants)
    signature.update({name: "constexpr" for name in constants})
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n in ("stride_qt", "stride_qh", "stride_ot",
                                                                             "stride_oh")]
    src = GluonASTSource(_paged_prefill_sm90_kernel, signature,
                         constexprs={(names.index(k),): v for k, v in constants.items()},
                         attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))


__all__ = ["compile_for_sm90", "paged_prefill_attention_sm90", "supports"]
