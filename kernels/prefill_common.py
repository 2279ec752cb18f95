"""What the Triton prefill kernel (paged_prefill_attention.py) and the Gluon one for Hopper
(paged_prefill_attention_sm90.py) share: the query-block search of their grids and the preparation of
their arguments. Both import it; neither imports the other at module level."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import prepare_attention_call


@triton.jit
def find_query_block(qsl_ptr, num_seqs, qb, BLOCK_Q: tl.constexpr):
    """Which sequence's queries program `qb` of the flat grid takes: the grid has q_len // BLOCK_Q + 1 blocks
    per sequence in order (an upper bound needing no host-side table), so it is the last s with
    qsl[s] // BLOCK_Q + s <= qb, found by a binary search over query_start_loc. Returns (seq, q_begin, q_len,
    q_block); q_block * BLOCK_Q >= q_len marks a surplus program. (Also called by the Gluon kernel.)"""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        v_mid = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if v_mid <= qb:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_begin = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_begin
    return seq, q_begin, q_len, qb - (q_begin // BLOCK_Q + seq)


def prepare_prefill_call(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out):
    """`prepare_attention_call` plus the prefill's own arguments checked and made int32 contiguous (shared by
    the Triton and the Gluon kernel): (q, block_tables, out, block_size, num_kv_heads, head_dim, seq_lens,
    query_start_loc)."""
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError("query_start_loc must have num_seqs + 1 entries")
    prepared = prepare_attention_call(q, k_cache, v_cache, block_tables, out, "num_tokens")
    return (*prepared, seq_lens.to(torch.int32).contiguous(), query_start_loc.to(torch.int32).contiguous())
