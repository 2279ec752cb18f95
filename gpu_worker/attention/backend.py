"""The attention backend interface (the backends and their lookup: attention/registry.py).

A backend writes the new tokens' K/V into the paged cache (``write_kv``) and computes attention of the
new queries over each sequence's whole context read through the block table (``forward``). Caches are
``[num_blocks, block_size, num_kv_heads, head_dim]`` views of the runner's one kv_cache tensor (any
stride along the block axis). FP8 caches (``torch.float8_e4m3fn``) store ``value / scale``.
"""

from __future__ import annotations

import torch

from gpu_worker.attention.metadata import AttentionMetadata
from gpu_worker.layers.rotary import apply_rotary


class AttentionBackend:
    name = "base"

    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per step before the forward pass: build per-step index tensors (optional)."""

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """key/value [num_tokens, kv_heads, head_dim] -> the slots of meta.slot_mapping (-1 skipped)."""
        raise NotImplementedError

    def rotary_and_write_kv(self, qk: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """qk [num_tokens, q_heads + kv_heads, head_dim] rotated (cos / sin [num_tokens, 1, head_dim / 2]):
        the keys and values to their slots, the rotated queries [num_tokens, q_heads, head_dim] returned.
        Here the rotation, then ``write_kv``; a backend may do both in one pass."""
        qk = apply_rotary(qk, cos, sin)
        nq = qk.shape[1] - k_cache.shape[2]
        self.write_kv(qk[:, nq:], value, k_cache, v_cache, meta, k_scale, v_scale)
        return qk[:, :nq]  # a strided view, last dim contiguous

    def forward(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """query [num_tokens, q_heads, head_dim] -> [num_tokens, q_heads, head_dim]."""
        raise NotImplementedError
