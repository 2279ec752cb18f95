"""The Triton attention backend: the kernels of `kernels/` behind the AttentionBackend interface.

write_kv -> kernels.reshape_and_cache (one launch per layer, padding slots skipped);
forward  -> kernels.paged_decode_attention when every sequence has exactly one new token, else
            kernels.paged_prefill_attention (chunked prefill, prefix-cache hits, mixed batches).
Nothing here reads device tensors on the host, so a decode step can be captured in a CUDA graph; the
number of KV splits of the decode kernel follows meta.max_seq_len (a host int of the metadata).
Meant for CUDA tensors; CPU tensors also work through Triton's interpreter (slowly: tests only).
"""
from __future__ import annotations

import torch

from gpu_worker.attention.backend import AttentionBackend
from gpu_worker.attention.metadata import AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        import kernels  # imported here: importing triton stays out of the torch-only paths

        self._k = kernels

    def prepare(self, meta: AttentionMetadata) -> None:
        """No per-step state: the kernels read the metadata tensors directly."""

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        self._k.reshape_and_cache(key, value, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)

    def forward(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        if meta.is_decode_only:
            return self._k.paged_decode_attention(
                query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                k_scale=k_scale, v_scale=v_scale, max_seq_len=meta.max_seq_len or None,
            )
        return self._k.paged_prefill_attention(
            query, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len,
            scale, k_scale=k_scale, v_scale=v_scale,
        )


TritonBackend = TritonAttentionBackend

__all__ = ["TritonAttentionBackend", "TritonBackend"]
