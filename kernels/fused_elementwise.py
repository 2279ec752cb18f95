"""Fused elementwise kernels of the Llama layers (one launch instead of 2 to 7 torch kernels each).

- ``rotary(x, cos, sin)``: neox rotary embedding of x [T, H, D] (any strides, last dim contiguous; the
  fused q|k view of the qkv projection) with cos / sin [T, 1, D/2] (views of the per-step cos|sin rows)
  into a new contiguous [T, H, D] tensor. torch: 7 kernels (one allocation, six elementwise passes).
- ``silu_and_mul(x)``: x [T, 2d] -> silu(x[:, :d]) * x[:, d:], [T, d]. torch: 2 kernels on strided halves.
- ``add_rms_norm(x, residual, weight, eps)``: s = x + residual (rounded to x's dtype, as the torch add
  is), returns (rms_norm(s) * weight, s). torch: an add and the rms_norm kernel.
- ``add_rms_norm(..., fp8=True)`` and ``silu_and_mul_fp8(x)``: the same, their output quantized per row
  for an FP8 linear layer (bitwise what quantize_fp8_rowwise gives for the stored output): one pass less
  per layer input.

Each computes in float32 and rounds once at the store, so results can differ from the torch
compositions (which round after every op in bf16/fp16) by an ulp of the storage dtype; in float32 they
agree to rounding. The references beside each kernel are the torch compositions the layers use.
Nothing here reads device memory on the host: the calls can be captured in CUDA graphs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import kernel_for, next_pow2
from .quantize_fp8 import quantize_row


@triton.jit
def rotate_halves(row_ptr, stride_h, cos, sin, offs_h, offs_d, mask, HALF: tl.constexpr):
    """The rotated halves (float32, [heads, D/2] each) of the heads offs_h of one token's row."""
    p = row_ptr + offs_h[:, None].to(tl.int64) * stride_h + offs_d[None, :]
    x1 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    num_heads,
    stride_xt,
    stride_xh,
    stride_ct,
    stride_st,
    stride_ot,
    stride_oh,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    mask = (offs_h[:, None] < num_heads) & mask_d[None, :]
    cos = tl.load(cos_ptr + t * stride_ct + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_st + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    o1, o2 = rotate_halves(x_ptr + t * stride_xt, stride_xh, cos, sin, offs_h, offs_d, mask, HALF)
    op = out_ptr + t * stride_ot + offs_h[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
    tl.store(op, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(op + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] -> [x1 cos - x2 sin, x2 cos + x1 sin] (HF's rotate_half form), a new contiguous tensor.
    cos / sin: [T, 1, D/2] or [T, D/2] (last dim contiguous)."""
    T, H, D = x.shape
    half = D // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos2, sin2 = cos.reshape(T, -1), sin.reshape(T, -1)
    if cos2.shape[1] != half or sin2.shape[1] != half or cos2.stride(-1) != 1 or sin2.stride(-1) != 1:
        raise ValueError("cos / sin must be [T, 1, D/2] with a contiguous last dim")
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block_h = min(16, next_pow2(H))
    kernel_for(_rotary_kernel, x.device)[(T, triton.cdiv(H, block_h))](
        x, cos2, sin2, out, H,
        x.stride(0), x.stride(1), cos2.stride(0), sin2.stride(0), out.stride(0), out.stride(1),
        HALF=half, BLOCK_H=block_h, BLOCK_HALF=next_pow2(half),
        num_warps=4 if block_h * half >= 1024 else 2,
    )
    return out


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@triton.jit
def _silu_mul_row(row_ptr, offs, mask, d):
    """silu(gate) * up in fp32 for the columns ``offs`` of one [gate | up] row."""
    g = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row_ptr + d + offs, mask=mask, other=0.0).to(tl.float32)
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_xt, stride_ot, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    o = _silu_mul_row(x_ptr + t * stride_xt, offs, mask, d)
    tl.store(out_ptr + t * stride_ot + offs, o.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] -> silu(x[..., :d]) * x[..., d:] ([..., d], contiguous)."""
    shape = x.shape
    d = shape[-1] // 2
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    out = torch.empty((T, d), dtype=x.dtype, device=x.device)
    if T:
        block = min(1024, next_pow2(d))
        kernel_for(_silu_and_mul_kernel, x.device)[(T, triton.cdiv(d, block))](
            x2, out, d, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 2)
    return out.view(*shape[:-1], d)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, n, eps,
                         stride_x, stride_r, stride_o, stride_ro, BLOCK: tl.constexpr, FP8_OUT: tl.constexpr,
                         SOFT_FP8_ROUND: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0)
    r = tl.load(res_ptr + t * stride_r + offs, mask=mask, other=0.0)
    s = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)  # the residual stream's dtype
    tl.store(res_out_ptr + t * stride_ro + offs, s, mask=mask)
    sf = s.to(tl.float32)
    var = tl.sum(sf * sf, axis=0) / n
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = sf * tl.rsqrt(var + eps) * w
    if FP8_OUT:  # quantized as quantize_fp8_rowwise would the stored row (rounded to x's dtype first)
        q, scale = quantize_row(y.to(x_ptr.dtype.element_ty).to(tl.float32), SOFT_FP8_ROUND)
        tl.store(out_ptr + t * stride_o + offs, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + t, scale)
    else:
        tl.store(out_ptr + t * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 fp8: bool = False) -> tuple:
    """(rms_norm(x + residual) * weight, x + residual) for x, residual [T, n]; new tensors. ``fp8``: the
    first part as quantize_fp8_rowwise gives it, (float8_e4m3fn [T, n], float32 scale [T, 1]), the input of
    an FP8 linear layer without a pass of its own."""
    n = x.shape[-1]
    x2, r2 = x.reshape(-1, n), residual.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    T = x2.shape[0]
    out = torch.empty((T, n), dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=x.device) if fp8 else out
    res = torch.empty((T, n), dtype=x.dtype, device=x.device)
    if T:
        block = next_pow2(n)
        kernel_for(_add_rms_norm_kernel, x.device)[(T,)](
            x2, r2, weight, out, res, scale, n, float(eps), x2.stride(0), r2.stride(0), out.stride(0), res.stride(0),
            BLOCK=block, FP8_OUT=fp8, SOFT_FP8_ROUND=x.device.type == "cpu", num_warps=8 if block >= 4096 else 4)
    if fp8:
        return (out, scale), res.view(x.shape)
    return out.view(x.shape), res.view(x.shape)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, out_ptr, scale_ptr, d, stride_xt, stride_ot, BLOCK: tl.constexpr,
                             SOFT_FP8_ROUND: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < d
    o = _silu_mul_row(x_ptr + t * stride_xt, offs, mask, d).to(x_ptr.dtype.element_ty).to(tl.float32)  # as stored
    q, scale = quantize_row(o, SOFT_FP8_ROUND)
    tl.store(out_ptr + t * stride_ot + offs, q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + t, scale)


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_rowwise(silu_and_mul(x)) in one pass, one row per program: x [T, 2d] ->
    (float8_e4m3fn [T, d], float32 scale [T, 1])."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    out = torch.empty((T, d), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=x.device)
    if T:
        block = next_pow2(d)
        kernel_for(_silu_and_mul_fp8_kernel, x.device)[(T,)](
            x2, out, scale, d, x2.stride(0), out.stride(0), BLOCK=block, SOFT_FP8_ROUND=x.device.type == "cpu",
            num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return out, scale


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return F.rms_norm(s, weight.shape, weight, eps), s


__all__ = ["rotary", "rotary_ref", "silu_and_mul", "silu_and_mul_fp8", "silu_and_mul_ref", "add_rms_norm",
           "add_rms_norm_ref"]
