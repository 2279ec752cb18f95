"""Triton kernels of PagedFleet, one per file, each with its torch reference beside it.

Runs on CUDA tensors, and on CPU tensors through Triton's interpreter (set TRITON_INTERPRET=1 before
importing triton; CPU tensors are interpreted even if it wasn't set, only more slowly to start).
"""
from .copy_blocks import copy_blocks, copy_blocks_ref
from .fused_elementwise import (
    add_rms_norm,
    add_rms_norm_ref,
    rotary,
    rotary_ref,
    silu_and_mul,
    silu_and_mul_fp8,
    silu_and_mul_ref,
)
from .paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from .paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from .quantize_fp8 import quantize_fp8_rowwise, quantize_fp8_rowwise_ref
from .reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
from .rotary_and_cache import rotary_and_cache, rotary_and_cache_ref
from .widen_pages import widen_pages, widen_pages_ref

__all__ = [
    "add_rms_norm",
    "add_rms_norm_ref",
    "copy_blocks",
    "copy_blocks_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "quantize_fp8_rowwise",
    "quantize_fp8_rowwise_ref",
    "reshape_and_cache",
    "reshape_and_cache_ref",
    "rotary",
    "rotary_and_cache",
    "rotary_and_cache_ref",
    "rotary_ref",
    "silu_and_mul",
    "silu_and_mul_fp8",
    "silu_and_mul_ref",
    "widen_pages",
    "widen_pages_ref",
]
