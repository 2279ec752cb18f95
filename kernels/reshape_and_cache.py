"""Fused KV write: scatter each new token's key and value into its cache slot.

key / value [num_tokens, num_kv_heads, head_dim]; k_cache / v_cache [num_blocks, block_size, num_kv_heads,
head_dim] (any stride on the block axis); slot_mapping [num_tokens] (int64 or int32): slot =
block * block_size + offset, negative = padding (skipped). One program writes one token's K and V (all
heads). FP8 (e4m3) caches store clamp(value / scale, -448, 448) rounded to nearest; for other cache dtypes
the scales are ignored and values are cast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP8_E4M3_MAX, cache_strides, check_cache, is_fp8, kernel_for, kv_scales, next_pow2


@triton.jit
def _round_to_e4m3_grid(x):
    """Round fp32 `x` (already clamped to +-448) to the nearest e4m3 value, ties to even, in fp32
    arithmetic. Used under the CPU interpreter, whose own fp32->fp8 cast truncates the carry (e.g. it turns
    -125.8 into -64); the GPU's cvt.rn.satfinite does this in hardware."""
    bits = x.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    k = tl.maximum(exp, -6) - 3  # log2 of the e4m3 spacing at |x| (subnormals: 2^-9)
    # adding C = 1.5 * 2^(k + 23) leaves fp32 spacing 2^k, so the addition rounds x to a multiple of 2^k
    c = ((k + 23 + 127) << 23 | 0x400000).to(tl.float32, bitcast=True)
    r = (tl.abs(x) + c) - c
    sign = (bits >> 31) << 31  # keep the sign bit (also of a zero)
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def cache_values(x, inv_scale, FP8: tl.constexpr, FP8_MAX: tl.constexpr, SOFT_FP8_ROUND: tl.constexpr):
    """What the cache stores for x before the cast: for FP8 (e4m3) clamp(x / scale, +-FP8_MAX), rounded on
    the e4m3 grid here under the interpreter (SOFT_FP8_ROUND); for other cache dtypes x itself."""
    if FP8:
        x = tl.clamp(x.to(tl.float32) * inv_scale, -FP8_MAX, FP8_MAX)
        if SOFT_FP8_ROUND:
            x = _round_to_e4m3_grid(x)
    return x


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    k_ptr,
    v_ptr,
    slot_ptr,
    inv_k_scale,
    inv_v_scale,
    stride_key_t,
    stride_key_h,
    stride_val_t,
    stride_val_h,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
    SOFT_FP8_ROUND: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // PAGE_SIZE
        off = slot % PAGE_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
        key = tl.load(key_ptr + t * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :], mask=mask)
        val = tl.load(value_ptr + t * stride_val_t + offs_h[:, None] * stride_val_h + offs_d[None, :], mask=mask)
        key = cache_values(key, inv_k_scale, FP8, FP8_MAX, SOFT_FP8_ROUND)
        val = cache_values(val, inv_v_scale, FP8, FP8_MAX, SOFT_FP8_ROUND)
        k_dst = k_ptr + blk * stride_kb + off * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
        v_dst = v_ptr + blk * stride_vb + off * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        tl.store(k_dst, key.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst, val.to(v_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write key/value [num_tokens, kv_heads, head_dim] into the caches at `slot_mapping` (in place)."""
    block_size, num_kv_heads, head_dim = check_cache(k_cache, v_cache)
    if key.dim() != 3 or key.shape[1:] != (num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(
            f"key/value must be [num_tokens, {num_kv_heads}, {head_dim}], got {tuple(key.shape)}, "
            f"{tuple(value.shape)}"
        )
    num_tokens = key.shape[0]
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError("slot_mapping shorter than key")
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    slot_mapping = slot_mapping.contiguous()
    fp8 = is_fp8(k_cache.dtype)
    if fp8 and k_cache.dtype != torch.float8_e4m3fn:
        raise NotImplementedError("FP8 KV caches are e4m3 (torch.float8_e4m3fn)")
    ks, vs = kv_scales(k_cache.dtype, k_scale, v_scale)
    block_h = next_pow2(num_kv_heads)
    block_d = next_pow2(head_dim)
    kernel_for(_reshape_and_cache_kernel, key.device)[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        1.0 / ks,
        1.0 / vs,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *cache_strides(k_cache, v_cache),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        PAGE_SIZE=block_size,
        FP8=fp8,
        FP8_MAX=FP8_E4M3_MAX,
        SOFT_FP8_ROUND=key.device.type == "cpu",
        num_warps=4 if block_h * block_d >= 1024 else 2,
    )


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Torch reference (in place): index_put of the non-padding tokens."""
    block_size = k_cache.shape[1]
    n = key.shape[0]
    slots = slot_mapping[:n].long()
    keep = slots >= 0
    slots = slots[keep]
    blk, off = slots // block_size, slots % block_size
    k, v = key[keep], value[keep]
    if is_fp8(k_cache.dtype):
        ks, vs = kv_scales(k_cache.dtype, k_scale, v_scale)
        k = (k.float() * (1.0 / ks)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        v = (v.float() * (1.0 / vs)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    k_cache[blk, off] = k.to(k_cache.dtype)
    v_cache[blk, off] = v.to(v_cache.dtype)


__all__ = ["reshape_and_cache", "reshape_and_cache_ref"]
