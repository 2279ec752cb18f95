from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.layers._fused import fused


class SiluAndMul(nn.Module):
    """SwiGLU on a fused [gate | up] projection: silu(x[..., :d]) * x[..., d:]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused(x)  # CUDA: one Triton kernel
        if ops is not None:
            return ops.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
