"""Helpers shared by the kernels: launching on CUDA or (interpreted) on the CPU, device facts, dtypes."""
from __future__ import annotations

import functools
import math

import torch
import triton

try:  # the interpreter is part of every Triton wheel; guard anyway.
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except Exception:  # pragma: no cover
    _InterpretedFunction = None

FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)
FP8_E4M3_MAX = 448.0
LOG2E = 1.4426950408889634

_interpreted: dict[int, object] = {}


def kernel_for(kernel, device: torch.device):
    """The launchable form of `kernel` for tensors on `device`.

    On CUDA this is the JIT function itself. On the CPU it is Triton's interpreter: when the module was
    imported with TRITON_INTERPRET=1 the decorator already returned an interpreted function; otherwise
    (another module imported triton-jitted code first) we wrap the Python source in one here, so CPU tensors
    work whatever the import order was.
    """
    if device.type != "cpu":
        return kernel
    if _InterpretedFunction is None or isinstance(kernel, _InterpretedFunction):
        return kernel
    fn = _interpreted.get(id(kernel))
    if fn is None:
        fn = _InterpretedFunction(kernel.fn)
        _interpreted[id(kernel)] = fn
    return fn


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a host-side property: no sync); 8 on the CPU."""
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(idx)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def as_float(x) -> float:
    """Scales are per-layer Python floats; a 0-dim CPU tensor is accepted too (no device sync)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError("k_scale / v_scale must be Python floats (reading a CUDA tensor would sync)")
        return float(x.item())
    return float(x)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"caches must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must be contiguous along head_dim")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return block_size, num_kv_heads, head_dim


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact (IEEE) fp32 products; 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def log2e() -> float:
    return LOG2E


__all__ = [
    "FP8_DTYPES",
    "FP8_E4M3_MAX",
    "LOG2E",
    "as_float",
    "cdiv",
    "check_cache",
    "dot_precision",
    "is_fp8",
    "kernel_for",
    "math",
    "next_pow2",
    "num_sms",
    "triton",
]
