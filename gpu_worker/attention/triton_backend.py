"""The Triton attention backend: the kernels of `kernels/` behind the AttentionBackend interface.

write_kv -> kernels.reshape_and_cache (one launch per layer, padding slots skipped);
rotary_and_write_kv -> kernels.rotary_and_cache (the layer's rotation and KV write in one launch);
forward  -> kernels.paged_decode_attention when every sequence has exactly one new token, else
            kernels.paged_prefill_attention (chunked prefill, prefix-cache hits); a mixed step (the
            scheduler puts its decodes first) takes the decode kernel for its leading one-token sequences
            and the prefill kernel for the rest, so the prefill kernel's 128-row tiles are not spent on
            single rows and an FP8 prefill widens only the prefill sequences' pages (kernels/widen_pages.py).
Nothing here reads device tensors on the host, so a decode step can be captured in a CUDA graph; the
number of KV splits of the decode kernel follows meta.max_seq_len (a host int of the metadata).
Meant for CUDA tensors; CPU tensors also work through Triton's interpreter (slowly: tests only).
"""
from __future__ import annotations

import numpy as np
import torch

from gpu_worker.attention.backend import AttentionBackend
from gpu_worker.attention.metadata import AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        import kernels  # imported here: importing triton stays out of the torch-only paths

        self._k = kernels

    def prepare(self, meta: AttentionMetadata) -> None:
        """A mixed step: the views of its leading decodes and of the rest, once for every layer."""
        q_lens = meta.query_lens_cpu
        if meta.is_decode_only or q_lens is None or not len(q_lens) or q_lens[0] != 1:
            return
        n = int(np.argmax(q_lens != 1))  # leading one-token sequences (some sequence has more: not decode-only)
        width = -(-int(meta.seq_lens_cpu[n:].max()) // meta.block_size)  # the prefill sequences' widest table
        # the prefill part's tensors copied, not sliced: a slice starting at row n is 16-byte aligned or not
        # with n, and Triton compiles a kernel variant per pointer alignment (on the step loop, seconds each)
        meta.extras["split"] = (
            n,
            (meta.block_tables[:n], meta.seq_lens[:n]),
            (meta.block_tables[n:, :width].clone(), meta.seq_lens[n:].clone(), meta.query_start_loc[n:] - n),
        )

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        self._k.reshape_and_cache(key, value, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)

    def rotary_and_write_kv(self, qk: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        return self._k.rotary_and_cache(qk, value, cos, sin, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)

    def forward(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        k = self._k
        if meta.is_decode_only:
            return k.paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                            k_scale=k_scale, v_scale=v_scale, max_seq_len=meta.max_seq_len or None,
                                            order=meta.decode_order)
        split = meta.extras.get("split")
        if split is None:
            return k.paged_prefill_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                             meta.query_start_loc, meta.max_query_len, scale, k_scale=k_scale,
                                             v_scale=v_scale)
        n, (d_bt, d_lens), (p_bt, p_lens, p_qsl) = split
        out = torch.empty_like(query)
        # one KV split whatever n: the kernel variant a CUDA graph of a large batch compiled already (a split
        # count per n would compile new variants on the step loop), and the prefill part outweighs the decodes
        k.paged_decode_attention(query[:n], k_cache, v_cache, d_bt, d_lens, scale, out=out[:n], k_scale=k_scale,
                                 v_scale=v_scale, num_splits=1)
        k.paged_prefill_attention(query[n:], k_cache, v_cache, p_bt, p_lens, p_qsl, meta.max_query_len, scale,
                                  out=out[n:], k_scale=k_scale, v_scale=v_scale)
        return out


TritonBackend = TritonAttentionBackend

__all__ = ["TritonAttentionBackend", "TritonBackend"]
