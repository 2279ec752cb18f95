from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.layers._fused import fused
from gpu_worker.layers.linear import FP8Input


class SiluAndMul(nn.Module):
    """SwiGLU on a fused [gate | up] projection: silu(x[..., :d]) * x[..., d:]."""

    def forward(self, x: torch.Tensor, fp8: bool = False):
        """``fp8``: the next layer takes FP8 input; on CUDA the result comes quantized (an `FP8Input`)."""
        ops = fused(x)  # CUDA: one Triton kernel
        if ops is not None:
            if fp8:
                return FP8Input(*ops.silu_and_mul_fp8(x), x.dtype)
            return ops.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
