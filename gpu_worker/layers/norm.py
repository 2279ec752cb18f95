from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
