"""Linear and embedding layers whose weights start uninitialised (the loader fills them), so building a
large model does not pay for a default init it throws away.

On the CPU in bf16, `prepack_cpu_weight` gives a weight in oneDNN's blocked layout: F.linear hands oneDNN
the plain weight and it reorders it on every call, which at decode sizes (a few dozen rows) costs more
than the product itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)

        self.packed: torch.Tensor | None = None  # prepack_cpu_weight(self.weight), set by prepack()

    def prepack(self) -> bool:
        self.packed = prepack_cpu_weight(self.weight)
        return self.packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return linear_prepacked(x, self.packed)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, device=device, dtype=dtype),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def prepack_cpu_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's layout for `linear_prepacked` (CPU, bf16), or None where that is unavailable."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 32)  # packed for decode-size batches
    except (AttributeError, RuntimeError):
        return None


def linear_prepacked(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with a `prepack_cpu_weight` weight (the op PyTorch Inductor's CPU backend uses)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
