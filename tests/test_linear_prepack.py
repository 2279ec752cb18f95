"""CPU bf16 linears in oneDNN's weight layout (gpu_worker/layers/linear.py): same numbers as F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_worker.layers import Linear
from gpu_worker.layers.linear import linear_prepacked, prepack_cpu_weight


# oneDNN's bf16 weight reorder needs AVX-512 (BF16) on x86: without it the layers stay on F.linear
CAN_PACK = prepack_cpu_weight(torch.zeros(64, 64, dtype=torch.bfloat16)) is not None


@pytest.mark.skipif(not CAN_PACK, reason="this CPU has no oneDNN bf16 weight packing (no AVX-512)")
@pytest.mark.parametrize("rows", [1, 5, 32, 100])
def test_prepacked_linear_equals_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(384, 96, generator=gen).bfloat16()
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    packed = prepack_cpu_weight(w)
    assert packed is not None, "oneDNN is part of every x86 CPU build of torch"
    assert torch.equal(linear_prepacked(x, packed), F.linear(x, w))


def test_linear_layer_prepacks_only_cpu_bf16():
    lin = Linear(64, 32, dtype=torch.bfloat16)
    lin.weight.normal_()
    x = torch.randn(3, 64).bfloat16()
    before = lin(x)
    if CAN_PACK:
        assert lin.prepack() and lin.packed is not None
    else:  # no packing here: the layer says so and keeps computing the same numbers with F.linear
        assert not lin.prepack() and lin.packed is None
    assert torch.equal(lin(x), before)
    fp32 = Linear(64, 32, dtype=torch.float32)
    assert not fp32.prepack() and fp32.packed is None  # float32 stays on F.linear (the HF-identical path)
