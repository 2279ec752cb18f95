"""Batched block copy (copy-on-write forks, swaps inside one device): one launch for all pairs of all layers.

kv_cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]; src_dst [n, 2] int64 pairs
(src block, dst block). Program (pair, layer * 2 + k/v, chunk) copies one contiguous chunk of one block.
Destinations must be distinct and no destination may also be a source in the same call (as for
copy-on-write); the copy is bitwise (FP8 caches are moved as bytes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import is_fp8, kernel_for


@triton.jit
def _copy_blocks_kernel(
    cache_ptr,
    pairs_ptr,
    stride_layer,
    stride_kv,
    stride_block,
    BLOCK_NUMEL: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    lk = tl.program_id(1)
    chunk = tl.program_id(2)
    src = tl.load(pairs_ptr + 2 * pair)
    dst = tl.load(pairs_ptr + 2 * pair + 1)
    base = cache_ptr + (lk // 2).to(tl.int64) * stride_layer + (lk % 2).to(tl.int64) * stride_kv
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    if BLOCK_NUMEL % CHUNK == 0:
        x = tl.load(base + src * stride_block + offs)
        tl.store(base + dst * stride_block + offs, x)
    else:
        mask = offs < BLOCK_NUMEL
        x = tl.load(base + src * stride_block + offs, mask=mask)
        tl.store(base + dst * stride_block + offs, x, mask=mask)


def _bits_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """Same memory as an integer dtype of the same width (bitwise copy; FP8 loads stay out of the kernel)."""
    size = kv_cache.element_size()
    if is_fp8(kv_cache.dtype) or kv_cache.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return kv_cache.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])
    return kv_cache


def copy_blocks(kv_cache: torch.Tensor, src_dst: torch.Tensor) -> None:
    """In place: for every (src, dst) row of `src_dst`, kv_cache[:, :, dst] = kv_cache[:, :, src]."""
    if kv_cache.dim() != 6:
        raise ValueError("kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]")
    if src_dst.dim() != 2 or src_dst.shape[1] != 2:
        raise ValueError(f"src_dst must be [n, 2], got {tuple(src_dst.shape)}")
    n = src_dst.shape[0]
    if n == 0:
        return
    num_layers, two, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    if (kv_cache.stride(5), kv_cache.stride(4), kv_cache.stride(3)) != (1, head_dim, num_kv_heads * head_dim):
        raise ValueError("each block of kv_cache must be contiguous")
    pairs = src_dst.to(device=kv_cache.device, dtype=torch.int64).contiguous()
    cache = _bits_view(kv_cache)
    block_numel = block_size * num_kv_heads * head_dim
    chunk = min(4096, triton.next_power_of_2(block_numel))
    grid = (n, num_layers * two, triton.cdiv(block_numel, chunk))
    kernel_for(_copy_blocks_kernel, kv_cache.device)[grid](
        cache,
        pairs,
        cache.stride(0),
        cache.stride(1),
        cache.stride(2),
        BLOCK_NUMEL=block_numel,
        CHUNK=chunk,
        num_warps=4,
    )


def copy_blocks_ref(kv_cache: torch.Tensor, src_dst: torch.Tensor) -> None:
    """Torch reference (in place): one indexed copy over all layers."""
    if src_dst.shape[0] == 0:
        return
    pairs = src_dst.to(device=kv_cache.device, dtype=torch.int64)
    kv_cache[:, :, pairs[:, 1]] = kv_cache[:, :, pairs[:, 0]]


__all__ = ["copy_blocks", "copy_blocks_ref"]
