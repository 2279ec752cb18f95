"""Attention backend lookup by name: the one module that knows every backend (each imports only the
interface, attention/backend.py, so there is no cycle)."""

from __future__ import annotations

import torch

from gpu_worker.attention.backend import AttentionBackend


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401

        import gpu_worker.attention.triton_backend  # noqa: F401
        import kernels  # noqa: F401
    except Exception:
        return False
    return True


def get_backend(name: str = "auto", device: str | torch.device = "cpu") -> AttentionBackend:
    dev = torch.device(device)
    if name == "auto":
        name = "triton" if dev.type == "cuda" and _triton_importable() else "torch"
    if name == "torch":
        from gpu_worker.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        if dev.type != "cuda":
            raise ValueError("attention_backend: 'triton' needs device 'cuda'")
        from gpu_worker.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend: unknown backend {name!r} (auto, torch, triton)")
