"""The Triton kernels against their torch references, on the CPU through Triton's interpreter.

Every case draws fresh random inputs, uses ragged lengths (1 token, exactly a block, a block plus one, many
blocks), poisons the output with NaN first, fills every cache slot that belongs to no sequence with NaN and
points the block-table entries past each sequence's last block at NaN blocks (or at no block at all): an
output that reads anything it shouldn't, or leaves anything unwritten, fails. Errors are
||out - ref|| / ||ref|| against a float64 reference.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (kernels also cope if it wasn't)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels.paged_decode_attention import choose_num_splits, split_tickets  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 5e-3}
HEAD_DIM = 64
FP8 = torch.float8_e4m3fn


def _ragged(bs: int) -> list[int]:
    return [1, bs, bs + 1, 4 * bs + 3]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output (unwritten or read garbage)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _paged_setup(seq_lens, bs, num_kv_heads, dtype, *, gen, num_layers=2, layer=1, fp8_scale=None):
    """A kv_cache [L, 2, NB, bs, Hkv, D] whose sequence tokens are random and everything else NaN, plus
    block tables (random permutation of blocks) whose padding entries are garbage."""
    nblk = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(nblk) + 4  # 4 spare blocks stay NaN
    width = max(nblk) + 3
    store_dtype = torch.float32 if dtype == FP8 else dtype
    kv = torch.full((num_layers, 2, num_blocks, bs, num_kv_heads, HEAD_DIM), float("nan"), dtype=store_dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    spare = perm[sum(nblk):]
    bt = torch.empty((len(seq_lens), width), dtype=torch.int32)
    i = 0
    for s, (n, nb) in enumerate(zip(seq_lens, nblk)):
        blocks = perm[i : i + nb]
        i += nb
        bt[s, :nb] = blocks.int()
        # garbage past the last block: NaN blocks, and a value that is no block at all
        bt[s, nb:] = spare[torch.randint(0, len(spare), (width - nb,), generator=gen)].int()
        bt[s, -1] = 2**31 - 1
        vals = torch.randn((2, nb * bs, num_kv_heads, HEAD_DIM), generator=gen)
        vals[:, n:] = float("nan")  # the tail of the last block is not part of the sequence
        kv[layer, :, blocks] = vals.view(2, nb, bs, num_kv_heads, HEAD_DIM).to(store_dtype)
    if dtype == FP8:
        kv = (kv / fp8_scale).clamp(-448, 448).to(FP8)  # NaN stays NaN in e4m3fn
    return kv, kv[layer, 0], kv[layer, 1], bt, torch.tensor(seq_lens, dtype=torch.int32)


# ------------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("gqa", [1, 4])
def test_paged_decode_matches_reference(dtype, bs, gqa):
    gen = torch.Generator().manual_seed(1000 + bs * 10 + gqa + (dtype == torch.bfloat16))
    num_kv_heads = 2
    lens = _ragged(bs)
    _, k, v, bt, sl = _paged_setup(lens, bs, num_kv_heads, dtype, gen=gen)
    q = torch.randn((len(lens), num_kv_heads * gqa, HEAD_DIM), generator=gen).to(dtype)
    scale = HEAD_DIM**-0.5
    ref = kernels.paged_decode_attention_ref(q, k, v, bt, sl, scale, out_dtype=torch.float64)
    for splits in (None, 1, 3):  # heuristic (several on CPU), single pass, uneven splits
        out = torch.full_like(q, float("nan"))
        res = kernels.paged_decode_attention(q, k, v, bt, sl, scale, out=out, num_splits=splits)
        assert res is out
        err = _rel_err(out, ref)
        assert err < TOL[dtype], (splits, err)


def test_paged_decode_order_changes_only_the_schedule():
    """The programs may take the sequences in any order (the CUDA graphs pass longest first): every row's
    output is still its own sequence's attention, split or not."""
    gen = torch.Generator().manual_seed(21)
    bs, num_kv_heads, gqa = 16, 2, 4
    lens = _ragged(bs)
    _, k, v, bt, sl = _paged_setup(lens, bs, num_kv_heads, torch.float32, gen=gen)
    q = torch.randn((len(lens), num_kv_heads * gqa, HEAD_DIM), generator=gen)
    ref = kernels.paged_decode_attention_ref(q, k, v, bt, sl, 0.1, out_dtype=torch.float64)
    order = torch.argsort(-sl, stable=True).to(torch.int32)
    assert not torch.equal(order, torch.arange(len(lens), dtype=torch.int32))
    for splits in (1, 3):
        out = torch.full_like(q, float("nan"))
        kernels.paged_decode_attention(q, k, v, bt, sl, 0.1, out=out, num_splits=splits, order=order)
        assert _rel_err(out, ref) < 1e-3, splits


def test_paged_decode_fp8_cache():
    gen = torch.Generator().manual_seed(7)
    bs, num_kv_heads, gqa = 16, 2, 4
    ks = vs = 0.02
    lens = _ragged(bs)
    _, k, v, bt, sl = _paged_setup(lens, bs, num_kv_heads, FP8, gen=gen, fp8_scale=ks)
    q = torch.randn((len(lens), num_kv_heads * gqa, HEAD_DIM), generator=gen).bfloat16()
    scale = HEAD_DIM**-0.5
    ref = kernels.paged_decode_attention_ref(q, k, v, bt, sl, scale, k_scale=ks, v_scale=vs, out_dtype=torch.float64)
    out = torch.full_like(q, float("nan"))
    kernels.paged_decode_attention(q, k, v, bt, sl, scale, out=out, k_scale=ks, v_scale=vs, num_splits=2)
    assert _rel_err(out, ref) < 1e-2
    # the scales matter: the reference without them is far off
    wrong = kernels.paged_decode_attention_ref(q, k, v, bt, sl, scale, out_dtype=torch.float64)
    assert _rel_err(out, wrong) > 0.5


def test_paged_decode_strided_out_and_long_context():
    """out as a strided view, many blocks per sequence, tiles spanning several blocks."""
    gen = torch.Generator().manual_seed(11)
    bs, num_kv_heads, gqa = 8, 1, 4
    lens = [200, 3]
    _, k, v, bt, sl = _paged_setup(lens, bs, num_kv_heads, torch.float32, gen=gen)
    q = torch.randn((2, gqa, HEAD_DIM), generator=gen)
    big = torch.full((2, gqa * 2, HEAD_DIM), float("nan"))
    out = big[:, ::2]
    kernels.paged_decode_attention(q, k, v, bt, sl, 0.1, out=out, num_splits=4, block_n=16)
    ref = kernels.paged_decode_attention_ref(q, k, v, bt, sl, 0.1, out_dtype=torch.float64)
    assert _rel_err(out, ref) < 1e-3
    assert torch.isnan(big[:, 1::2]).all()  # nothing written outside out
    # the split merge is done by whichever program draws the last ticket; it leaves every ticket at zero,
    # so a second call (or a CUDA-graph replay) merges again
    assert not split_tickets(q.device, 1).any()
    q2 = torch.randn_like(q)
    kernels.paged_decode_attention(q2, k, v, bt, sl, 0.1, out=out, num_splits=4, block_n=16)
    assert _rel_err(out, kernels.paged_decode_attention_ref(q2, k, v, bt, sl, 0.1, out_dtype=torch.float64)) < 1e-3


def test_num_splits_heuristic():
    sms = 132
    assert choose_num_splits(1, 8, 4096, sms) >= 8  # batch 1: fill the GPU by splitting the context
    assert choose_num_splits(256, 8, 1024, sms) == 1
    assert choose_num_splits(64, 8, 32, sms) == 1  # short contexts are never split
    for b, h, n in [(1, 8, 4096), (16, 8, 16384), (64, 8, 2048), (3, 2, 100000)]:
        s = choose_num_splits(b, h, n, sms)
        assert s & (s - 1) == 0 and 1 <= s <= 32


# ------------------------------------------------------------------------------------------------ prefill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("gqa", [1, 4])
def test_paged_prefill_matches_reference(dtype, bs, gqa):
    gen = torch.Generator().manual_seed(2000 + bs * 10 + gqa + (dtype == torch.bfloat16))
    num_kv_heads = 2
    # (context after the step, new tokens): a fresh prompt of one token, a whole prompt of exactly one
    # block, a chunk on top of a prefix (block + 1), a decode token inside a mixed batch, a long chunk
    lens = [1, bs, bs + 1, 4 * bs + 3, 3 * bs + 5]
    qlens = [1, bs, 2, 1, 2 * bs + 1]
    _, k, v, bt, sl = _paged_setup(lens, bs, num_kv_heads, dtype, gen=gen)
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(qlens)]), dtype=torch.int32)
    q = torch.randn((int(qsl[-1]), num_kv_heads * gqa, HEAD_DIM), generator=gen).to(dtype)
    scale = HEAD_DIM**-0.5
    ref = kernels.paged_prefill_attention_ref(q, k, v, bt, sl, qsl, max(qlens), scale, out_dtype=torch.float64)
    out = torch.full_like(q, float("nan"))
    res = kernels.paged_prefill_attention(q, k, v, bt, sl, qsl, max(qlens), scale, out=out)
    assert res is out
    assert _rel_err(out, ref) < TOL[dtype]


def test_paged_prefill_fp8_and_small_tiles():
    gen = torch.Generator().manual_seed(5)
    bs, num_kv_heads, gqa = 16, 2, 2
    ks, vs = 0.03, 0.01
    lens, qlens = [40, 17, 70], [40, 17, 9]
    _, k, v, bt, sl = _paged_setup(lens, bs, num_kv_heads, FP8, gen=gen, fp8_scale=ks)
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(qlens)]), dtype=torch.int32)
    q = torch.randn((int(qsl[-1]), num_kv_heads * gqa, HEAD_DIM), generator=gen).bfloat16()
    ref = kernels.paged_prefill_attention_ref(q, k, v, bt, sl, qsl, 40, 0.125, k_scale=ks, v_scale=vs,
                                              out_dtype=torch.float64)
    for kw in ({}, {"block_m": 16, "block_n": 16}):
        out = torch.full_like(q, float("nan"))
        kernels.paged_prefill_attention(q, k, v, bt, sl, qsl, 40, 0.125, out=out, k_scale=ks, v_scale=vs, **kw)
        assert _rel_err(out, ref) < 1e-2, kw


def test_widened_fp8_pages_give_the_fp8_attention():
    """kernels.widen_pages (how the Hopper prefill kernel takes FP8 caches): each sequence's pages, widened to
    bf16 and rescaled into its own stretch of a compact cache, give the attention over the FP8 caches; the
    table's padding (NaN blocks, a value that is no block) is never read."""
    gen = torch.Generator().manual_seed(6)
    bs, num_kv_heads, gqa = 16, 2, 2
    ks, vs = 0.03, 0.01
    lens, qlens = [40, 17, 70], [40, 17, 9]
    _, k, v, bt, sl = _paged_setup(lens, bs, num_kv_heads, FP8, gen=gen, fp8_scale=ks)
    wk, wv, wbt = kernels.widen_pages(k, v, bt, sl, ks, vs, torch.bfloat16)
    rk, rv, rbt = kernels.widen_pages_ref(k, v, bt, sl, ks, vs, torch.bfloat16)
    assert torch.equal(wbt, rbt) and wk.dtype == torch.bfloat16
    width = bt.shape[1]
    for s, n in enumerate(lens):  # each sequence's tokens (1 ulp: the CPU interpreter's bf16 cast truncates)
        pages = slice(s * width, s * width + -(-n // bs))
        for w, r in ((wk, rk), (wv, rv)):
            torch.testing.assert_close(w[pages].flatten(0, 1)[:n], r[pages].flatten(0, 1)[:n], rtol=2**-7, atol=0)
    qsl = torch.tensor(np.concatenate([[0], np.cumsum(qlens)]), dtype=torch.int32)
    q = torch.randn((int(qsl[-1]), num_kv_heads * gqa, HEAD_DIM), generator=gen).bfloat16()
    ref = kernels.paged_prefill_attention_ref(q, k, v, bt, sl, qsl, 40, 0.125, k_scale=ks, v_scale=vs,
                                              out_dtype=torch.float64)
    out = kernels.paged_prefill_attention(q, wk, wv, wbt, sl, qsl, 40, 0.125)
    assert _rel_err(out, ref) < 1e-2


def test_prefill_equals_decode_for_single_tokens():
    gen = torch.Generator().manual_seed(9)
    bs, num_kv_heads, gqa = 16, 2, 4
    lens = _ragged(bs)
    _, k, v, bt, sl = _paged_setup(lens, bs, num_kv_heads, torch.float32, gen=gen)
    q = torch.randn((len(lens), num_kv_heads * gqa, HEAD_DIM), generator=gen)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    a = kernels.paged_prefill_attention(q, k, v, bt, sl, qsl, 1, 0.2)
    b = kernels.paged_decode_attention(q, k, v, bt, sl, 0.2)
    assert _rel_err(a, b) < 1e-5


# ------------------------------------------------------------------------------------------------ KV write


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, FP8])
@pytest.mark.parametrize("bs", [8, 16, 32])
def test_reshape_and_cache_matches_reference(cache_dtype, bs):
    gen = torch.Generator().manual_seed(3000 + bs)
    num_layers, num_blocks, num_kv_heads = 2, 12, 2
    kv = torch.randn((num_layers, 2, num_blocks, bs, num_kv_heads, HEAD_DIM), generator=gen) * 4
    kv = (kv * 50).to(cache_dtype) if cache_dtype == FP8 else kv.to(cache_dtype)
    kv_ref = kv.clone()
    n = 3 * bs + 1
    slots = torch.randperm(num_blocks * bs, generator=gen)[:n]
    slots[::5] = -1  # padding
    in_dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
    key = (torch.randn((n, num_kv_heads, HEAD_DIM), generator=gen) * 3).to(in_dtype)
    value = (torch.randn((n, num_kv_heads, HEAD_DIM), generator=gen) * 3).to(in_dtype)
    ks, vs = (0.01, 0.02) if cache_dtype == FP8 else (1.0, 1.0)
    kernels.reshape_and_cache(key, value, kv[1, 0], kv[1, 1], slots, ks, vs)
    kernels.reshape_and_cache_ref(key, value, kv_ref[1, 0], kv_ref[1, 1], slots, ks, vs)
    assert torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
    # the written values are the inputs (FP8: value / scale to within half an e4m3 step, saturated)
    valid = slots >= 0
    got = kv[1, 0][slots[valid] // bs, slots[valid] % bs].float()
    want = key[valid].float() / ks
    if cache_dtype == FP8:
        want = want.clamp(-448, 448)
        assert ((got - want).abs() <= want.abs() / 16 + 2**-10).all()
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, FP8])
def test_rotary_and_cache_is_rotary_then_kv_write(cache_dtype):
    """The fused pass gives what the two kernels give one after the other: the rotated queries, and in the
    cache the rotated keys and the values (padding slots untouched), bit for bit."""
    gen = torch.Generator().manual_seed(4000)
    bs, num_blocks, hq, hkv, n = 16, 10, 8, 2, 37
    in_dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
    kv = torch.randn((2, num_blocks, bs, hkv, HEAD_DIM), generator=gen)
    kv = (kv * 50).to(cache_dtype) if cache_dtype == FP8 else kv.to(cache_dtype)
    kv_two = kv.clone()
    qkv = (torch.randn((n, (hq + 2 * hkv) * HEAD_DIM), generator=gen) * 3).to(in_dtype)
    qk = qkv[:, : (hq + hkv) * HEAD_DIM].view(n, hq + hkv, HEAD_DIM)  # strided, as the layer's view
    v = qkv[:, (hq + hkv) * HEAD_DIM:].view(n, hkv, HEAD_DIM)
    angles = torch.rand((n, HEAD_DIM // 2), generator=gen) * 6.28
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    slots = torch.randperm(num_blocks * bs, generator=gen)[:n]
    slots[::4] = -1
    ks, vs = (0.01, 0.02) if cache_dtype == FP8 else (1.0, 1.0)
    q = kernels.rotary_and_cache(qk, v, cos, sin, kv[0], kv[1], slots, ks, vs)
    rot = kernels.rotary(qk, cos, sin)
    kernels.reshape_and_cache(rot[:, hq:], v, kv_two[0], kv_two[1], slots, ks, vs)
    assert torch.equal(q, rot[:, :hq])
    assert torch.equal(kv.view(torch.uint8), kv_two.view(torch.uint8))
    q_ref = kernels.rotary_and_cache_ref(qk, v, cos, sin, kv_two[0], kv_two[1], slots, ks, vs)
    assert ((q.float() - q_ref.float()).abs() <= 1e-2 * q_ref.float().abs() + 1e-5).all()


def test_reshape_and_cache_fp8_rounding_edges():
    """Values at e4m3 rounding boundaries (carry into the next binade, ties, subnormals, saturation)."""
    vals = torch.tensor([-125.78125, 200.0, -200.0, 15.5, 0.0068359375, 0.001, 1000.0, -1000.0, 0.0, 240.0,
                         247.9, 248.0, 3.0e-3, -1.5e-4], dtype=torch.float32)
    n = vals.numel()
    key = torch.zeros((n, 1, HEAD_DIM))
    key[:, 0, :] = vals[:, None]
    kv = torch.zeros((1, 2, 2, 16, 1, HEAD_DIM), dtype=FP8)
    kv_ref = kv.clone()
    slots = torch.arange(n)
    kernels.reshape_and_cache(key, key, kv[0, 0], kv[0, 1], slots, 1.0, 1.0)
    kernels.reshape_and_cache_ref(key, key, kv_ref[0, 0], kv_ref[0, 1], slots, 1.0, 1.0)
    assert torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))


# ------------------------------------------------------------------------------------------------ copies


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, FP8])
def test_copy_blocks_matches_reference(dtype):
    gen = torch.Generator().manual_seed(4000)
    kv = torch.randn((3, 2, 10, 16, 2, HEAD_DIM), generator=gen) * 8
    kv = kv.to(dtype)
    kv_ref = kv.clone()
    pairs = torch.tensor([[1, 5], [3, 7], [9, 0], [2, 8]], dtype=torch.int64)
    kernels.copy_blocks(kv, pairs)
    kernels.copy_blocks_ref(kv_ref, pairs)
    assert torch.equal(kv.view(torch.uint8), kv_ref.view(torch.uint8))
    assert torch.equal(kv[:, :, 5].view(torch.uint8), kv[:, :, 1].view(torch.uint8))
    kernels.copy_blocks(kv, torch.empty((0, 2), dtype=torch.int64))  # no pairs: no launch


# ------------------------------------------------------------------------------------------------ backend


@pytest.mark.parametrize("qlens", [[1, 1, 1, 1], [1, 16, 5, 1], [1, 1, 16, 5]])
def test_triton_backend_matches_torch_backend(qlens):
    """Decode-only, and mixed steps whose leading decodes take the decode kernel and the rest the prefill one."""
    from gpu_worker.attention.metadata import AttentionMetadata
    from gpu_worker.attention.torch_backend import TorchAttentionBackend
    from gpu_worker.attention.triton_backend import TritonAttentionBackend

    gen = torch.Generator().manual_seed(77 + sum(qlens))
    bs, num_kv_heads, gqa, num_blocks = 16, 2, 4, 24
    seq_lens = [1, 16, 17, 40]
    decode_only = max(qlens) == 1
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, i = [], 0
    for n in seq_lens:
        nb = -(-n // bs)
        tables.append(perm[i : i + nb])
        i += nb
    meta = AttentionMetadata.build(seq_lens, qlens, tables, bs, device="cpu")
    assert meta.is_decode_only == decode_only
    T = sum(qlens)
    caches = []
    for _ in range(2):
        kv = torch.randn((1, 2, num_blocks, bs, num_kv_heads, HEAD_DIM), generator=gen).bfloat16()
        caches.append(kv)
    caches[1].copy_(caches[0])
    key = torch.randn((T, num_kv_heads, HEAD_DIM), generator=gen).bfloat16()
    value = torch.randn((T, num_kv_heads, HEAD_DIM), generator=gen).bfloat16()
    query = torch.randn((T, num_kv_heads * gqa, HEAD_DIM), generator=gen).bfloat16()
    outs = []
    for backend, kv in zip((TorchAttentionBackend(), TritonAttentionBackend()), caches):
        backend.prepare(meta)
        backend.write_kv(key, value, kv[0, 0], kv[0, 1], meta)
        outs.append(backend.forward(query, kv[0, 0], kv[0, 1], meta, HEAD_DIM**-0.5))
    assert torch.equal(caches[0], caches[1])
    assert ("split" in meta.extras) == (not decode_only)  # the mixed steps did take both kernels
    if not decode_only:  # every tensor a kernel gets is 16-byte aligned: one compiled variant for any split
        _, decode_part, prefill_part = meta.extras["split"]
        assert all(t.data_ptr() % 16 == 0 for t in (*decode_part, *prefill_part))
    assert _rel_err(outs[1], outs[0]) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_match_torch(dtype):
    """rotary on the strided q|k view of a fused qkv projection, silu_and_mul, add_rms_norm: against the
    torch compositions the layers use on the CPU, computed in float64."""
    gen = torch.Generator().manual_seed(11)
    T, nq, nkv, D = 5, 6, 2, 32
    qkv = torch.randn((T, (nq + 2 * nkv) * D), generator=gen).to(dtype)
    qk = qkv[:, : (nq + nkv) * D].view(T, nq + nkv, D)  # strided: row stride (nq + 2 nkv) * D
    cs = torch.randn((T, D), generator=gen).to(dtype)
    cos, sin = cs[:, None, : D // 2], cs[:, None, D // 2:]
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    out = kernels.rotary(qk, cos, sin)
    ref = kernels.rotary_ref(qk.double(), cos.double(), sin.double())
    assert out.dtype == dtype and out.is_contiguous() and _rel_err(out, ref) < tol

    x = torch.randn((T, 2 * 48), generator=gen).to(dtype)
    out = kernels.silu_and_mul(x)
    assert out.shape == (T, 48) and _rel_err(out, kernels.silu_and_mul_ref(x.double())) < tol

    h, res = torch.randn((2, T, 40), generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(40, generator=gen)).to(dtype)
    out, s = kernels.add_rms_norm(h, res, w, 1e-5)
    ref_out, ref_s = kernels.add_rms_norm_ref(h.double(), res.double(), w.double(), 1e-5)
    # the residual stream: the same add, rounded once (bitwise on the GPU; the interpreter's bf16 casts
    # truncate, so only within rounding here)
    assert _rel_err(s, ref_s) < tol
    assert _rel_err(out, ref_out) < tol


# ------------------------------------------------------------------------------------------------ Hopper


@pytest.mark.parametrize("dtype,head_dim,qpk,page", [(torch.bfloat16, 128, 4, 16), (torch.float16, 64, 8, 128)])
def test_sm90_prefill_kernel_builds_for_hopper(dtype, head_dim, qpk, page, tmp_path):
    """The Gluon prefill kernel (warp-specialised, TMA + async wgmma) cannot run without a Hopper GPU; what
    CI can check is that it still compiles for sm_90a, keeps its instruction mix, and that ptxas fits it in
    registers (a spill would cost most of its speed). Its numbers are checked on the GPU by
    benchmarks/kernel_bench.py."""
    import re
    import subprocess
    import sys

    from triton.backends.nvidia.compiler import get_ptxas

    ptx_path = tmp_path / "kernel.ptx"
    # a fresh process: this one runs Triton's interpreter, which leaves triton.language patched
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    code = ("import pathlib, sys, torch; from kernels.paged_prefill_attention_sm90 import compile_for_sm90; "
            f"k = compile_for_sm90(torch.{str(dtype)[6:]}, {head_dim}, {qpk}, {page}); "
            "pathlib.Path(sys.argv[1]).write_text(k.asm['ptx'])")
    subprocess.run([sys.executable, "-c", code, str(ptx_path)], env=env, check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ptx = ptx_path.read_text()
    assert "cp.async.bulk.tensor.2d" in ptx  # K/V arrive by TMA
    assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)  # q.k of the next tile overlaps p.v
    assert "setmaxnreg" in ptx  # warp specialisation hands the producer's registers to the consumers
    res = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx_path), "-o", os.devnull],
                         capture_output=True, text=True, check=True)
    assert "0 bytes spill stores, 0 bytes spill loads" in res.stderr, res.stderr


def test_prefill_kernel_choice_is_checked():
    gen = torch.Generator().manual_seed(11)
    _, k, v, bt, sl = _paged_setup([5], 16, 2, torch.bfloat16, gen=gen)
    q = torch.randn((5, 8, HEAD_DIM), generator=gen).bfloat16()
    qsl = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown prefill kernel"):
        kernels.paged_prefill_attention(q, k, v, bt, sl, qsl, 5, 0.1, kernel="cudnn")
    with pytest.raises(ValueError, match="Hopper"):  # CPU tensors: the Gluon kernel does not apply
        kernels.paged_prefill_attention(q, k, v, bt, sl, qsl, 5, 0.1, kernel="sm90")
    ref = kernels.paged_prefill_attention_ref(q, k, v, bt, sl, qsl, 5, 0.1, out_dtype=torch.float64)
    out = kernels.paged_prefill_attention(q, k, v, bt, sl, qsl, 5, 0.1, kernel="auto")  # the Triton kernel here
    assert _rel_err(out, ref) < TOL[torch.bfloat16]


# ------------------------------------------------------------------------------------------------ FP8 activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_fp8_rowwise_matches_reference(dtype):
    gen = torch.Generator().manual_seed(21)
    x = (torch.randn((6, 300), generator=gen) * torch.logspace(-3, 3, 6)[:, None]).to(dtype)
    x[2] = 0.0  # a zero row: a tiny scale, zeros out
    q, s = kernels.quantize_fp8_rowwise(x)
    q_ref, s_ref = kernels.quantize_fp8_rowwise_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6, 1)
    assert torch.equal(s, s_ref)
    assert (q.float() - q_ref.float()).abs().max() <= 0.0625 * q_ref.float().abs().max()  # at most an ulp
    assert (q.float() == q_ref.float()).float().mean() > 0.99
    back = q.double() * s.double()
    assert ((back - x.double()).norm() / x.double().norm()).item() < 0.05  # e4m3: 3 mantissa bits
    assert q[2].float().abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fp8_outputs_equal_quantizing_the_unfused_ones(dtype):
    """add_rms_norm(fp8=True) and silu_and_mul_fp8 (an FP8 linear layer's input in the kernel that makes it):
    bitwise the quantize_fp8_rowwise of what add_rms_norm and silu_and_mul store."""
    gen = torch.Generator().manual_seed(22)
    x = (torch.randn((5, 96), generator=gen) * torch.logspace(-2, 2, 5)[:, None]).to(dtype)
    res = torch.randn((5, 96), generator=gen).to(dtype)
    w = torch.randn(96, generator=gen).to(dtype)
    (q, s), r = kernels.add_rms_norm(x, res, w, 1e-5, fp8=True)
    y, r_plain = kernels.add_rms_norm(x, res, w, 1e-5)
    q_ref, s_ref = kernels.quantize_fp8_rowwise(y)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(r, r_plain) and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    gu = (torch.randn((5, 2 * 80), generator=gen) * 3).to(dtype)
    q, s = kernels.silu_and_mul_fp8(gu)
    q_ref, s_ref = kernels.quantize_fp8_rowwise(kernels.silu_and_mul(gu))
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
