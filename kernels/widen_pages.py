"""Widen the pages a prefill reads from FP8 K/V caches into a compact cache of the query's dtype, so the
Gluon prefill kernel for Hopper (which takes 16-bit caches only) serves FP8 caches too.

Output page s * width + j is page j of sequence s (width = block_tables.shape[1]) times its scale; the
returned block table points each sequence at its own pages of the output. Pages at or past a sequence's
context (cdiv(seq_lens[s], block_size)) are not written: the attention never reads them. One launch for K
and V together, no host sync (nothing but the shapes is read on the host). On a prefill step the prefill
sequences' pages are a few MB per layer, widened at the copy rate, while the attention over them is
compute-bound: the widening costs a few percent of what the 16-bit kernel saves over the FP8 Triton one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_float, kernel_for

_BLOCK = 4096  # elements per program (a page of 16 tokens x 8 KV heads x 128 dims is 4 programs)


@triton.jit
def _widen_pages_kernel(k_ptr, v_ptr, k_out_ptr, v_out_ptr, bt_ptr, seq_lens_ptr, k_scale, v_scale, width,
                        stride_bt, stride_kb, stride_vb, PAGE_SIZE: tl.constexpr, PAGE_ELEMS: tl.constexpr,
                        BLOCK: tl.constexpr):
    page = tl.program_id(0)  # s * width + j
    s = page // width
    j = page % width
    if j * PAGE_SIZE < tl.load(seq_lens_ptr + s):
        src = tl.load(bt_ptr + s.to(tl.int64) * stride_bt + j).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < PAGE_ELEMS
        dst = page.to(tl.int64) * PAGE_ELEMS + offs
        k = tl.load(k_ptr + src * stride_kb + offs, mask=mask).to(tl.float32) * k_scale
        tl.store(k_out_ptr + dst, k.to(k_out_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + src * stride_vb + offs, mask=mask).to(tl.float32) * v_scale
        tl.store(v_out_ptr + dst, v.to(v_out_ptr.dtype.element_ty), mask=mask)


_aranges: dict[torch.device, torch.Tensor] = {}


def _own_pages_table(num_seqs: int, width: int, device: torch.device) -> torch.Tensor:
    """[num_seqs, width] int32: sequence s owns pages s * width ... (a view of one arange kept per device)."""
    n = num_seqs * width
    a = _aranges.get(device)
    if a is None or a.numel() < n:
        a = _aranges[device] = torch.arange(max(n, 1 << 12), dtype=torch.int32, device=device)
    return a[:n].view(num_seqs, width)


def _check(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for c in (k_cache, v_cache):
        if c.dim() != 4 or c[0].stride() != (c.shape[2] * c.shape[3], c.shape[3], 1):
            raise ValueError("widen_pages needs caches [num_blocks, block_size, num_kv_heads, head_dim], each page "
                             "contiguous")


def widen_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                k_scale, v_scale, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, v, block_tables) of a compact `dtype` cache holding each sequence's pages of k_cache / v_cache
    dequantized (stored value * scale): attention over them with the returned table (and scales 1) equals
    attention over the FP8 caches with the given scales."""
    _check(k_cache, v_cache)
    num_seqs, width = block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    page_elems = block_size * num_kv_heads * head_dim
    shape = (num_seqs * width, block_size, num_kv_heads, head_dim)
    k_out = torch.empty(shape, dtype=dtype, device=k_cache.device)
    v_out = torch.empty(shape, dtype=dtype, device=k_cache.device)
    if num_seqs and width:
        bt = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
        grid = (num_seqs * width, triton.cdiv(page_elems, _BLOCK))
        kernel_for(_widen_pages_kernel, k_cache.device)[grid](
            k_cache, v_cache, k_out, v_out, bt, seq_lens, as_float(k_scale), as_float(v_scale), width, bt.stride(0),
            k_cache.stride(0), v_cache.stride(0), PAGE_SIZE=block_size, PAGE_ELEMS=page_elems, BLOCK=_BLOCK,
            num_warps=4)
    return k_out, v_out, _own_pages_table(num_seqs, width, k_cache.device)


def widen_pages_ref(k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, dtype):
    """Torch reference: the same pages widened the same way; pages past a context stay zero."""
    num_seqs, width = block_tables.shape
    bs = k_cache.shape[1]
    shape = (num_seqs * width, *k_cache.shape[1:])
    k, v = (torch.zeros(shape, dtype=dtype, device=k_cache.device) for _ in range(2))
    for s in range(num_seqs):
        n = -(-int(seq_lens[s]) // bs)
        src = block_tables[s, :n].long()
        k[s * width: s * width + n] = (k_cache[src].float() * float(k_scale)).to(dtype)
        v[s * width: s * width + n] = (v_cache[src].float() * float(v_scale)).to(dtype)
    table = torch.arange(num_seqs * width, dtype=torch.int32, device=k_cache.device).view(num_seqs, width)
    return k, v, table


__all__ = ["widen_pages", "widen_pages_ref"]
