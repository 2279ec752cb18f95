"""Rotary embedding and KV write in one pass: the rotated queries out, the rotated keys and the values
straight into their cache slots.

qk [T, Hq + Hkv, D] (the q|k columns of the fused qkv projection, any strides, last dim contiguous), v [T,
Hkv, D], cos / sin [T, D/2] (or [T, 1, D/2]): returns q rotated, a new contiguous [T, Hq, D] tensor, and
writes rotated k and v at slot_mapping (negative = padding: nothing written). One program per token, all its
heads. The rotation is computed in float32 and rounded once to the input dtype (as kernels.rotary does);
the cache gets that rounded key, cast, or for FP8 (e4m3) caches clamp(key / scale, +-448) as
kernels.reshape_and_cache stores it: the results are bitwise those of rotary followed by
reshape_and_cache, in one launch instead of two and without the rotated keys' round trip through memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FP8_E4M3_MAX, cache_strides, check_cache, is_fp8, kernel_for, kv_scales, next_pow2
from .fused_elementwise import rotary_ref, rotate_halves
from .reshape_and_cache import cache_values, reshape_and_cache_ref


@triton.jit
def _rotary_and_cache_kernel(
    qk_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    inv_k_scale, inv_v_scale,
    stride_qkt, stride_qkh, stride_vt, stride_vh, stride_ct, stride_st, stride_qot, stride_qoh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vbt, stride_vbh,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    PAGE_SIZE: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, SOFT_FP8_ROUND: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dtype = q_out_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cos_ptr + t * stride_ct + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_st + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    row = qk_ptr + t * stride_qkt

    offs_q = tl.arange(0, BLOCK_HQ)
    mask_q = (offs_q[:, None] < NUM_Q_HEADS) & mask_d[None, :]
    q1, q2 = rotate_halves(row, stride_qkh, cos, sin, offs_q, offs_d, mask_q, HALF)
    qo = q_out_ptr + t * stride_qot + offs_q[:, None].to(tl.int64) * stride_qoh + offs_d[None, :]
    tl.store(qo, q1.to(dtype), mask=mask_q)
    tl.store(qo + HALF, q2.to(dtype), mask=mask_q)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // PAGE_SIZE
        off = slot % PAGE_SIZE
        offs_k = tl.arange(0, BLOCK_HKV)
        mask_k = (offs_k[:, None] < NUM_KV_HEADS) & mask_d[None, :]
        k1, k2 = rotate_halves(row + NUM_Q_HEADS * stride_qkh, stride_qkh, cos, sin, offs_k, offs_d, mask_k, HALF)
        # the key as the rotary kernel stores it (rounded to the input dtype), then as the cache stores it
        k1 = cache_values(k1.to(dtype), inv_k_scale, FP8, FP8_MAX, SOFT_FP8_ROUND)
        k2 = cache_values(k2.to(dtype), inv_k_scale, FP8, FP8_MAX, SOFT_FP8_ROUND)
        vp = v_ptr + t * stride_vt + offs_k[:, None].to(tl.int64) * stride_vh + offs_d[None, :]
        v1 = cache_values(tl.load(vp, mask=mask_k, other=0.0), inv_v_scale, FP8, FP8_MAX, SOFT_FP8_ROUND)
        v2 = cache_values(tl.load(vp + HALF, mask=mask_k, other=0.0), inv_v_scale, FP8, FP8_MAX, SOFT_FP8_ROUND)
        heads = offs_k[:, None].to(tl.int64)
        kd = k_cache_ptr + blk * stride_kb + off * stride_kt + heads * stride_kh + offs_d[None, :]
        vd = v_cache_ptr + blk * stride_vb + off * stride_vbt + heads * stride_vbh + offs_d[None, :]
        cdt = k_cache_ptr.dtype.element_ty
        tl.store(kd, k1.to(cdt), mask=mask_k)
        tl.store(kd + HALF, k2.to(cdt), mask=mask_k)
        tl.store(vd, v1.to(cdt), mask=mask_k)
        tl.store(vd + HALF, v2.to(cdt), mask=mask_k)


def rotary_and_cache(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Rotated q ([T, Hq, D], new) of qk [T, Hq + Hkv, D]; rotated k and v written at slot_mapping."""
    block_size, num_kv_heads, head_dim = check_cache(k_cache, v_cache)
    T, H, D = qk.shape
    hq = H - num_kv_heads
    half = D // 2
    if D != head_dim or v.shape != (T, num_kv_heads, D) or hq <= 0:
        raise ValueError(f"qk [T, Hq + {num_kv_heads}, {head_dim}] and v [T, {num_kv_heads}, {head_dim}] expected, "
                         f"got {tuple(qk.shape)}, {tuple(v.shape)}")
    if qk.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("qk and v need a contiguous last dim")
    cos2, sin2 = cos.reshape(T, -1), sin.reshape(T, -1)
    if cos2.shape[1] != half or sin2.shape[1] != half or cos2.stride(-1) != 1 or sin2.stride(-1) != 1:
        raise ValueError("cos / sin must be [T, 1, D/2] with a contiguous last dim")
    if slot_mapping.shape[0] < T:
        raise ValueError("slot_mapping shorter than qk")
    fp8 = is_fp8(k_cache.dtype)
    if fp8 and k_cache.dtype != torch.float8_e4m3fn:
        raise NotImplementedError("FP8 KV caches are e4m3 (torch.float8_e4m3fn)")
    q = torch.empty((T, hq, D), dtype=qk.dtype, device=qk.device)
    if T == 0:
        return q
    ks, vs = kv_scales(k_cache.dtype, k_scale, v_scale)
    kernel_for(_rotary_and_cache_kernel, qk.device)[(T,)](
        qk, v, cos2, sin2, q, k_cache, v_cache, slot_mapping.contiguous(), 1.0 / ks, 1.0 / vs,
        qk.stride(0), qk.stride(1), v.stride(0), v.stride(1), cos2.stride(0), sin2.stride(0),
        q.stride(0), q.stride(1), *cache_strides(k_cache, v_cache),
        NUM_Q_HEADS=hq, NUM_KV_HEADS=num_kv_heads, HALF=half,
        BLOCK_HQ=next_pow2(hq), BLOCK_HKV=next_pow2(num_kv_heads), BLOCK_HALF=next_pow2(half),
        PAGE_SIZE=block_size, FP8=fp8, FP8_MAX=FP8_E4M3_MAX, SOFT_FP8_ROUND=qk.device.type == "cpu",
        num_warps=4,
    )
    return q


def rotary_and_cache_ref(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Torch reference: the rotation of both, then the KV write (in place); returns q."""
    hq = qk.shape[1] - k_cache.shape[2]
    T, half = qk.shape[0], qk.shape[-1] // 2
    rot = rotary_ref(qk.float(), cos.reshape(T, 1, half).float(), sin.reshape(T, 1, half).float()).to(qk.dtype)
    reshape_and_cache_ref(rot[:, hq:], v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return rot[:, :hq].contiguous()


__all__ = ["rotary_and_cache", "rotary_and_cache_ref"]
