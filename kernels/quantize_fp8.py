"""Per-row dynamic FP8 quantization of activations (the input of an FP8 linear layer, one scale per token):
x [rows, cols] -> (float8_e4m3fn x / scale, float32 scale [rows, 1]) with scale = max|row| / 448 (at least
1e-12). One launch, one read of x, instead of the six torch passes of the reference (float copy, abs, amax,
divide, clamp, cast). Capturable in CUDA graphs."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import kernel_for, next_pow2
from .reshape_and_cache import _round_to_e4m3_grid

FP8_E4M3_MAX = 448.0


@triton.jit
def quantize_row(x, SOFT_FP8_ROUND: tl.constexpr):
    """fp32 row x (padding lanes 0) -> (its values / scale on the e4m3 grid, as fp32; scale). Also the epilogue
    of the fused kernels that feed an FP8 linear layer (fused_elementwise.py)."""
    scale = tl.maximum(tl.max(tl.abs(x), 0) / 448.0, 1e-12)
    y = tl.clamp(x / scale, -448.0, 448.0)  # the division can round one ulp past the largest value
    if SOFT_FP8_ROUND:  # the CPU interpreter's own cast truncates (see reshape_and_cache)
        y = _round_to_e4m3_grid(y)
    return y, scale


@triton.jit
def _quantize_fp8_rowwise_kernel(x_ptr, out_ptr, scale_ptr, cols, stride_x, stride_o, BLOCK: tl.constexpr,
                                 SOFT_FP8_ROUND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    y, scale = quantize_row(x, SOFT_FP8_ROUND)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_fp8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] (last dim contiguous) -> (float8_e4m3fn [rows, cols], float32 scale [rows, 1])."""
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, scale
    block = next_pow2(cols)
    kernel_for(_quantize_fp8_rowwise_kernel, x.device)[(rows,)](
        x, out, scale, cols, x.stride(0), out.stride(0), BLOCK=block, SOFT_FP8_ROUND=x.device.type == "cpu",
        num_warps=4 if block <= 4096 else 8 if block <= 8192 else 16)
    return out, scale


def quantize_fp8_rowwise_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference (and the CPU path of the FP8 linear layer)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


__all__ = ["quantize_fp8_rowwise", "quantize_fp8_rowwise_ref"]
