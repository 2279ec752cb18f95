"""Linear and embedding layers whose weights start uninitialised (the loader fills them), so building a
large model does not pay for a default init it throws away.

On the CPU in bf16, `prepack_cpu_weight` gives a weight in oneDNN's blocked layout: F.linear hands oneDNN
the plain weight and it reorders it on every call, which at decode sizes (a few dozen rows) costs more
than the product itself.

FP8 weights (`Linear.quantize_fp8`, the worker's `quantization="fp8"`): the weight becomes float8_e4m3fn
with one scale per output channel, and each call quantizes its input per row (dynamic, one scale per
token) and multiplies with `torch._scaled_mm` (FP8 tensor cores on Hopper): half the weight bytes a decode
step reads and twice the dense rate of a prefill, as vLLM's dynamic FP8 does."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker import distributed
from gpu_worker.layers._fused import fused


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)

        self.packed: torch.Tensor | None = None  # prepack_cpu_weight(self.weight), set by prepack()
        self.weight_fp8: torch.Tensor | None = None  # [out, in] float8_e4m3fn, set by quantize_fp8()
        self.weight_scale: torch.Tensor | None = None  # [1, out] float32: weight = weight_fp8 * scale

    def prepack(self) -> bool:
        if self.weight_fp8 is not None:
            return False
        self.packed = prepack_cpu_weight(self.weight)
        return self.packed is not None

    def quantize_fp8(self) -> None:
        """Replace the weight by its FP8 form (per-output-channel scales) and free the original."""
        from kernels.quantize_fp8 import quantize_fp8_rowwise_ref

        self.weight_fp8, scale = quantize_fp8_rowwise_ref(self.weight)
        self.weight_scale = scale.reshape(1, -1).contiguous()
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        self.packed = None

    @property
    def takes_fp8(self) -> bool:
        """Whether the layer before may hand this one its output quantized (an `FP8Input`)."""
        return self.weight_fp8 is not None

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, FP8Input):
            return x.matmul(self.weight_fp8, self.weight_scale)
        if self.weight_fp8 is not None:
            return linear_fp8(x, self.weight_fp8, self.weight_scale)
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


class VocabParallelEmbedding(Embedding):
    """A tensor-parallel rank's rows [start, start + rows) of the embedding: ids outside them give zeros,
    and the all-reduce over the ranks sums the one rank's row that each id has (gpu_worker/distributed.py).
    Only built at tensor_parallel_size > 1."""

    def __init__(self, rows: int, dim: int, start: int, *, device=None, dtype=None):
        super().__init__(rows, dim, device=device, dtype=dtype)
        self.start, self.rows = start, rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return distributed.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0.0))


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


class FP8Input(NamedTuple):
    """An FP8 linear layer's input quantized by the kernel that produced it (the fused add_rms_norm and
    silu_and_mul on CUDA): [rows, cols] float8_e4m3fn, its per-row float32 scale, the output dtype."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def matmul(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        # fast accumulation on CUDA: 1.1-2x faster at decode sizes on an H100, and its error (2e-3 of the
        # product, measured) is a tenth of the FP8 rounding's (3.7e-2)
        return torch._scaled_mm(self.data, weight_fp8.t(), scale_a=self.scale, scale_b=weight_scale,
                                out_dtype=self.dtype, use_fast_accum=self.data.is_cuda)


def linear_fp8(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for an FP8 weight (`Linear.quantize_fp8`), x quantized per row on the fly (one Triton
    launch on CUDA, kernels/quantize_fp8.py), output in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    ops = fused(x)
    if ops is not None:
        quantize = ops.quantize_fp8_rowwise
    else:
        from kernels.quantize_fp8 import quantize_fp8_rowwise_ref as quantize
    x_fp8, x_scale = quantize(x2 if x2.stride(-1) == 1 else x2.contiguous())
    out = FP8Input(x_fp8, x_scale, x.dtype).matmul(weight_fp8, weight_scale)
    return out.reshape(*shape[:-1], weight_fp8.shape[0])
