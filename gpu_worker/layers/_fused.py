"""The Triton kernels the layers call on CUDA tensors (kernels/fused_elementwise.py, kernels/quantize_fp8.py).

``fused(x)`` returns the `kernels` package when x is on a CUDA device, Triton imports and the environment
does not say PAGEDFLEET_FUSED_KERNELS=0; else None and the layers use their torch compositions (always the
case on the CPU, so CPU results do not change).
"""
from __future__ import annotations

import os

_ops = None  # None: not tried yet; False: unavailable


def _load():
    global _ops
    try:
        if os.environ.get("PAGEDFLEET_FUSED_KERNELS", "1") == "0":
            raise ImportError("disabled by PAGEDFLEET_FUSED_KERNELS=0")
        import kernels

        _ops = kernels
    except Exception:
        _ops = False
    return _ops


def fused(x):
    if not x.is_cuda:
        return None
    ops = _ops if _ops is not None else _load()
    return ops or None
