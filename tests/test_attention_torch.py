"""The torch attention backend (the CPU path and the oracle of the Triton one) against naive attention."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.attention import AttentionMetadata, get_backend


def _naive(q, ks, vs, q_lens, seq_lens, scale):
    """Per sequence: causal attention of its q_len last positions over its whole context (GQA)."""
    out, t = [], 0
    for k, v, ql, L in zip(ks, vs, q_lens, seq_lens):
        qs = q[t: t + ql]  # [ql, Hq, D]
        g = qs.shape[1] // k.shape[1]
        kk = k.repeat_interleave(g, dim=1)  # [L, Hq, D]
        vv = v.repeat_interleave(g, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs.double(), kk.double()) * scale
        pos = torch.arange(L - ql, L)
        s = s.masked_fill(torch.arange(L)[None, None, :] > pos[None, :, None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vv.double()).float())
        t += ql
    return torch.cat(out)


@pytest.mark.parametrize("head_major", [False, True], ids=["contiguous", "head_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn, torch.bfloat16], ids=["fp32", "fp8", "bf16"])
def test_mixed_batch_matches_naive(dtype, head_major):
    """Decodes, a fresh prefill and chunks after a cached prefix in one step, for both cache layouts (the
    CPU runner's head-major storage and the plain contiguous one) and for the SDPA (fp32, fp8 caches) and
    bmm (bf16) paths."""
    torch.manual_seed(0)
    bs, nblocks, hq, hkv, d = 16, 64, 8, 2, 32
    # (context already cached, new tokens): decodes, a fresh prefill, a chunk after a prefix
    cases = [(40, 1), (0, 37), (16, 1), (21, 19), (0, 1), (47, 1)]
    fp8 = dtype == torch.float8_e4m3fn
    # slices of one tensor, like the runner's
    if head_major:
        kv = torch.zeros(3, 2, nblocks, hkv, bs, d, dtype=dtype).transpose(3, 4)
    else:
        kv = torch.zeros(3, 2, nblocks, bs, hkv, d, dtype=dtype)
    k_cache, v_cache = kv[1, 0], kv[1, 1]
    from gpu_worker.attention.torch_backend import is_head_major

    assert is_head_major(k_cache) == head_major
    perm = torch.randperm(nblocks).tolist()
    tables, ks, vs, qs = [], [], [], []
    backend = get_backend("torch", "cpu")
    seq_lens = [c + n for c, n in cases]
    for c, n in cases:
        nb = -(-(c + n) // bs)
        tables.append([perm.pop() for _ in range(nb)])
        ks.append(torch.randn(c + n, hkv, d))
        vs.append(torch.randn(c + n, hkv, d))
        qs.append(torch.randn(n, hq, d))
    if dtype == torch.bfloat16:  # model dtype bf16: q/k/v arrive in bf16, the oracle sees the same values
        ks, vs, qs = ([x.bfloat16().float() for x in xs] for xs in (ks, vs, qs))
    act = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    # the cached prefix is written by an earlier "step"
    pre = [(i, c) for i, (c, n) in enumerate(cases) if c > 0]
    meta0 = AttentionMetadata.build([c for _, c in pre], [c for _, c in pre], [tables[i] for i, _ in pre], bs)
    backend.prepare(meta0)
    backend.write_kv(torch.cat([ks[i][:c] for i, c in pre]).to(act), torch.cat([vs[i][:c] for i, c in pre]).to(act),
                     k_cache, v_cache, meta0, 0.5, 0.25)
    meta = AttentionMetadata.build(seq_lens, [n for _, n in cases], tables, bs)
    assert not meta.is_decode_only and meta.max_query_len == 37
    backend.prepare(meta)
    backend.write_kv(torch.cat([k[c:] for k, (c, _) in zip(ks, cases)]).to(act),
                     torch.cat([v[c:] for v, (c, _) in zip(vs, cases)]).to(act), k_cache, v_cache, meta, 0.5, 0.25)
    out = backend.forward(torch.cat(qs).to(act), k_cache, v_cache, meta, d ** -0.5, 0.5, 0.25)
    assert out.dtype == act
    if fp8:  # the oracle sees what the cache holds
        ks = [(k / 0.5).to(dtype).float() * 0.5 for k in ks]
        vs = [(v / 0.25).to(dtype).float() * 0.25 for v in vs]
    ref = _naive(torch.cat(qs), ks, vs, [n for _, n in cases], seq_lens, d ** -0.5)
    if dtype == torch.bfloat16:  # products in bf16, softmax in fp32, output rounded to bf16
        err = (out.float() - ref).norm() / ref.norm()
        assert err < 1e-2, err
    else:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert kv[0].float().abs().sum() == 0 and kv[2].float().abs().sum() == 0  # other layers untouched


def test_decode_only_and_padding_slots():
    torch.manual_seed(1)
    bs, hq, hkv, d = 4, 4, 4, 8
    k_cache = torch.zeros(10, bs, hkv, d)
    v_cache = torch.zeros(10, bs, hkv, d)
    backend = get_backend("torch", "cpu")
    meta = AttentionMetadata.build([3, 5], [3, 5], [[2], [7, 4]], bs)
    k, v = torch.randn(8, hkv, d), torch.randn(8, hkv, d)
    backend.prepare(meta)
    backend.write_kv(k, v, k_cache, v_cache, meta)
    # a padding slot (-1) is skipped
    meta2 = AttentionMetadata.build([4, 6], [1, 1], [[2], [7, 4]], bs)
    meta2.slot_mapping[1] = -1
    backend.prepare(meta2)
    k2, v2 = torch.randn(2, hkv, d), torch.randn(2, hkv, d)
    before = k_cache.clone()
    backend.write_kv(k2, v2, k_cache, v_cache, meta2)
    assert torch.equal(k_cache[2, 3], k2[0]) and torch.equal(k_cache[4], before[4])
    assert meta2.is_decode_only
    q = torch.randn(2, hq, d)
    out = backend.forward(q, k_cache, v_cache, meta2, 0.3)
    ref0 = _naive(q[:1], [torch.cat([k[:3], k2[:1]])], [torch.cat([v[:3], v2[:1]])], [1], [4], 0.3)
    torch.testing.assert_close(out[:1], ref0, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bs,hkv,grp", [(16, 3, 3), (8, 2, 1), (32, 1, 4)])
def test_cpu_decode_kernel_matches_torch_path(bs, hkv, grp):
    """The C decode kernel (cpu_decode.py, built with the machine's compiler) against the torch bmm path on
    the same head-major bf16 cache: ragged lengths (1 token, a block, a block + 1, many blocks), shuffled
    blocks, GQA 1/3/4."""
    from gpu_worker.attention import cpu_decode
    from gpu_worker.attention.torch_backend import TorchAttentionBackend

    lib = cpu_decode.load()
    assert lib is not None, "the C compiler (gcc) is part of the CI machine"
    gen = torch.Generator().manual_seed(bs + hkv)
    d, nblocks = 64, 96
    lens = [1, bs, bs + 1, 5 * bs + 3, 37]
    kv = torch.randn(2, nblocks, hkv, bs, d, generator=gen).bfloat16().transpose(2, 3)
    perm = torch.randperm(nblocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(-(-n // bs))] for n in lens]
    meta = AttentionMetadata.build(lens, [1] * len(lens), tables, bs)
    q = torch.randn(len(lens), hkv * grp, d, generator=gen).bfloat16()
    backend = TorchAttentionBackend()
    backend.prepare(meta)
    fast = backend.forward(q, kv[0], kv[1], meta, d**-0.5)
    backend._cpu_decode = False  # the torch bmm path
    slow = backend.forward(q, kv[0], kv[1], meta, d**-0.5)
    assert fast.dtype == torch.bfloat16 and not torch.isnan(fast).any()
    assert ((fast.float() - slow.float()).norm() / slow.float().norm()) < 1e-2
    g = meta.extras["torch"].groups[0]
    direct = cpu_decode.paged_decode(lib, q, kv[0], kv[1], g.tables, g.lens, d**-0.5)
    assert torch.equal(direct, fast)  # the backend did take the C path
