from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.layers._fused import fused
from gpu_worker.layers.linear import FP8Input


class RMSNorm(nn.Module):
    """RMSNorm (``x * rsqrt(mean(x^2) + eps) * weight``), optionally fused with the residual add:
    ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # the fused kernel: bit-identical to HF's formula in float32, within rounding in bf16/fp16
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8: bool = False):
        """``fp8``: the next layer takes FP8 input; on CUDA the normed rows come quantized (an `FP8Input`)."""
        if residual is None:
            return self._norm(x)
        ops = fused(x)  # CUDA: the add and the norm in one Triton kernel
        if ops is not None:
            if fp8:
                (q, scale), s = ops.add_rms_norm(x, residual, self.weight, self.eps, fp8=True)
                return FP8Input(q, scale, x.dtype), s
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        x = x + residual
        return self._norm(x), x
