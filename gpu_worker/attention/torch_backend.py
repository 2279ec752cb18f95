"""Paged attention in plain torch: the CPU backend and the oracle for the Triton one.

Per step (``prepare``) the sequences are split into a decode group (one new token each) and a prefill
group (chunks), and for each group the block ids to gather, the query packing and the attention mask
are built once. Per layer each group is then one ``index_select`` of whole blocks for K and one for V
(into reused workspace buffers: fresh large CPU allocations page-fault on every layer) and one batched
SDPA with GQA; there is no Python loop over sequences.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gpu_worker.attention.backend import AttentionBackend
from gpu_worker.attention.metadata import AttentionMetadata


@dataclass
class _Group:
    num_seqs: int
    num_blocks: int  # blocks gathered per sequence
    max_q: int
    blk_flat: torch.Tensor  # [num_seqs * num_blocks] int64
    tok_idx: torch.Tensor | None  # flat token indices of this group (None: all tokens, in order)
    pack_idx: torch.Tensor | None  # row of each token in the padded [num_seqs * max_q] query (None: no padding)
    mask: torch.Tensor | None  # bool [num_seqs, 1, max_q, num_blocks * block_size], True = attend
    additive: torch.Tensor | None = None  # decode groups: the mask as fp32 0 / -inf [1, S, 1, keys] (bmm path)
    tables: np.ndarray | None = None  # decode groups: int32 [num_seqs, num_blocks] block tables (C kernel)
    lens: np.ndarray | None = None  # decode groups: int32 [num_seqs] sequence lengths (C kernel)
    ragged: list[tuple[int, int, int]] | None = None  # chunk groups: (first row, end row, seq_len) per sequence
    causal: dict | None = None  # (q_len, seq_len) -> fp32 additive causal mask [q_len, 1, seq_len] (ragged path)
    rows_hm: torch.Tensor | None = None  # head-major caches: row (block * Hkv + head) of each [head, seq, block]


@dataclass
class _StepState:
    groups: list[_Group]
    slots: torch.Tensor  # [num_tokens] flat slot of each new token (padding clamped to 0, see valid)
    blk: torch.Tensor  # [num_tokens] block of each new token
    off: torch.Tensor  # [num_tokens] offset in the block
    valid: torch.Tensor | None  # [num_tokens] bool when some slots are -1 (padding), else None
    rows_hm: torch.Tensor | None = None  # head-major caches: row ((block * Hkv + head) * bs + off) per token, head


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def is_head_major(cache: torch.Tensor) -> bool:
    """A [num_blocks, block_size, Hkv, D] cache whose storage is [num_blocks, Hkv, block_size, D] (the CPU
    layout, see ModelRunner): each head's part of a block is one contiguous run, so a gather of blocks lands
    as per-head contiguous K/V that bmm takes without a copy."""
    _, bs, hkv, d = cache.shape
    return (cache.stride(3) == 1 and cache.stride(1) == d and cache.stride(2) == bs * d
            and cache.stride(0) == hkv * bs * d)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        self._ws: dict[str, torch.Tensor] = {}
        self._cpu_decode = None  # cpu_decode.paged_decode bound to its library (or False), set at the first use

    # ---- per step ----------------------------------------------------------------------------
    def prepare(self, meta: AttentionMetadata) -> None:
        dev = meta.slot_mapping.device
        bs = meta.block_size
        q = meta.query_lens_cpu
        L = meta.seq_lens_cpu
        bt = meta.block_tables_cpu
        if q is None or L is None or bt is None:
            q = meta.query_start_loc.diff().cpu().numpy().astype(np.int64)
            L = meta.seq_lens.cpu().numpy().astype(np.int64)
            bt = meta.block_tables.cpu().numpy().astype(np.int64)
        n = len(L)
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q, out=qsl[1:])
        groups: list[_Group] = []
        is_dec = q == 1
        parts = [np.arange(n)] if (is_dec.all() or (~is_dec).all()) else [np.nonzero(is_dec)[0], np.nonzero(~is_dec)[0]]
        for idx in parts:
            groups.append(self._group(idx, q, L, bt, qsl, bs, dev, whole=len(parts) == 1))
        slots = meta.slot_mapping
        valid = None
        if slots.numel() and bool((slots < 0).any()):
            valid = slots >= 0
            slots = slots.clamp_min(0)
        meta.extras["torch"] = _StepState(groups=groups, slots=slots, blk=slots // bs, off=slots % bs, valid=valid)

    @staticmethod
    def _group(idx, q, L, bt, qsl, bs, dev, whole: bool) -> _Group:
        qg, Lg = q[idx], L[idx]
        S = len(idx)
        max_q = int(qg.max())
        nb = max(1, int(-(-int(Lg.max()) // bs)))
        blocks = np.zeros((S, nb), dtype=np.int64)
        w = min(nb, bt.shape[1])
        blocks[:, :w] = bt[idx, :w]
        Lp = nb * bs
        keys = np.arange(Lp)
        if max_q == 1:
            mask = None if (Lg == Lp).all() else (keys[None, :] < Lg[:, None])[:, None, None, :]
        else:
            # query i of seq s sits at position L_s - q_s + i; padded rows attend key 0 only
            qi = np.arange(max_q)[None, :]
            qpos = np.where(qi < qg[:, None], Lg[:, None] - qg[:, None] + qi, 0)
            mask = (keys[None, None, :] <= qpos[:, :, None])[:, None, :, :]
        pack = None
        if max_q > 1 and not (qg == max_q).all():
            seq_local = np.repeat(np.arange(S), qg)
            within = np.arange(int(qg.sum())) - np.repeat(np.cumsum(qg) - qg, qg)
            pack = torch.from_numpy(seq_local * max_q + within).to(dev)
        tok = None
        if not whole:
            starts = qsl[idx]
            tok_np = np.repeat(starts, qg) + (np.arange(int(qg.sum())) - np.repeat(np.cumsum(qg) - qg, qg))
            tok = torch.from_numpy(tok_np).to(dev)
        ends = np.cumsum(qg)
        return _Group(
            tables=np.ascontiguousarray(blocks, dtype=np.int32) if max_q == 1 else None,
            lens=np.ascontiguousarray(Lg, dtype=np.int32) if max_q == 1 else None,
            ragged=[(int(e - n), int(e), int(length)) for e, n, length in zip(ends, qg, Lg)] if max_q > 1 else None,
            num_seqs=S, num_blocks=nb, max_q=max_q,
            blk_flat=torch.from_numpy(blocks.reshape(-1)).to(dev),
            tok_idx=tok, pack_idx=pack,
            mask=None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)).to(dev),
        )

    def _state(self, meta: AttentionMetadata) -> _StepState:
        st = meta.extras.get("torch")
        if st is None:
            self.prepare(meta)
            st = meta.extras["torch"]
        return st

    def _workspace(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._ws.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._ws[name] = buf
        return buf[:numel]

    # ---- per layer ---------------------------------------------------------------------------
    def write_kv(self, key, value, k_cache, v_cache, meta, k_scale=1.0, v_scale=1.0) -> None:
        st = self._state(meta)
        blk, off = st.blk, st.off
        if st.valid is not None:
            blk, off, key, value = blk[st.valid], off[st.valid], key[st.valid], value[st.valid]
        if _is_fp8(k_cache):
            key = (key.float() / k_scale).to(k_cache.dtype)
            value = (value.float() / v_scale).to(v_cache.dtype)
        for cache, x in ((k_cache, key), (v_cache, value)):
            x = x.to(cache.dtype)
            if cache.is_contiguous():  # one index_copy over flat slots
                rows = st.slots if st.valid is None else st.slots[st.valid]
                flat = cache.view(-1, *cache.shape[2:])
            elif is_head_major(cache):  # one index_copy over (block, head, slot) rows
                hkv, bs = cache.shape[2], cache.shape[1]
                if st.rows_hm is None:
                    st.rows_hm = ((blk * hkv)[:, None] + torch.arange(hkv, device=blk.device)) * bs + off[:, None]
                rows, flat = st.rows_hm.view(-1), cache.transpose(1, 2).reshape(-1, cache.shape[3])
                x = x.reshape(-1, x.shape[-1])
            else:
                cache[blk, off] = x
                continue
            if _is_fp8(cache):  # no fp8 index_copy on CPU: copy the bytes
                flat, x = flat.view(torch.uint8), x.contiguous().view(torch.uint8)
            flat.index_copy_(0, rows, x)

    def forward(self, query, k_cache, v_cache, meta, scale, k_scale=1.0, v_scale=1.0) -> torch.Tensor:
        st = self._state(meta)
        if len(st.groups) == 1:
            return self._attend(st.groups[0], query, k_cache, v_cache, scale, k_scale, v_scale)
        out = torch.empty_like(query)
        for g in st.groups:
            out.index_copy_(0, g.tok_idx, self._attend(g, query.index_select(0, g.tok_idx), k_cache, v_cache,
                                                       scale, k_scale, v_scale))
        return out

    def _gather(self, name: str, cache: torch.Tensor, g: _Group, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """K or V of the group's blocks, padded to num_blocks per sequence: [Hkv, S, Lp, D] (contiguous for a
        head-major cache, a permuted view otherwise)."""
        nblocks, bs, hkv, d = cache.shape
        S, nb = g.num_seqs, g.num_blocks
        buf = self._workspace(name, S * nb * bs * hkv * d, cache.dtype, cache.device)
        if is_head_major(cache):
            if g.rows_hm is None:
                g.rows_hm = (g.blk_flat.view(1, -1) * hkv + torch.arange(hkv, device=cache.device)[:, None]).view(-1)
            flat = cache.transpose(1, 2).reshape(nblocks * hkv, bs * d)  # a view: the storage is head-major
            torch.index_select(flat, 0, g.rows_hm, out=buf.view(-1, bs * d))
            x = buf.view(hkv, S, nb * bs, d)
        else:
            flat = cache.flatten(1)
            torch.index_select(flat, 0, g.blk_flat, out=buf.view(-1, flat.shape[1]))
            x = buf.view(S, nb * bs, hkv, d).permute(2, 0, 1, 3)
        if _is_fp8(cache):
            x = x.to(dtype)
            if scale != 1.0:
                x.mul_(scale)
        return x

    def _attend(self, g: _Group, query, k_cache, v_cache, scale, k_scale, v_scale) -> torch.Tensor:
        T, hq, d = query.shape
        S, max_q = g.num_seqs, g.max_q
        if max_q == 1 and query.dtype == k_cache.dtype == torch.bfloat16 and is_head_major(k_cache):
            o = self._decode_c(g, query, k_cache, v_cache, scale)
            if o is not None:
                return o
        k = self._gather("k", k_cache, g, query.dtype, k_scale)
        v = self._gather("v", v_cache, g, query.dtype, v_scale)
        if query.device.type == "cpu" and query.dtype != torch.float32:  # 16-bit: no SDPA, no query packing
            if max_q > 1:
                return self._attend_ragged(g, query, k, v, scale)
            return self._attend_bmm(g, query, k, v, scale)
        if g.pack_idx is not None:
            qp = query.new_zeros(S * max_q, hq, d)
            qp.index_copy_(0, g.pack_idx, query)
        else:
            qp = query
        q = qp.view(S, max_q, hq, d).transpose(1, 2)  # [S, Hq, max_q, D]
        o = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1), attn_mask=g.mask,
                                           scale=scale, enable_gqa=hq != k.shape[0])
        o = o.transpose(1, 2).reshape(S * max_q, hq, d)
        if g.pack_idx is not None:
            o = o.index_select(0, g.pack_idx)
        return o

    def _decode_c(self, g: _Group, query, k_cache, v_cache, scale) -> torch.Tensor | None:
        """bf16 decode on the CPU through the C kernel (cpu_decode.py): no gather, no padding."""
        if self._cpu_decode is None:
            from gpu_worker.attention import cpu_decode

            lib = cpu_decode.load()
            self._cpu_decode = functools.partial(cpu_decode.paged_decode, lib) if lib is not None else False
        if not self._cpu_decode or query.device.type != "cpu" or query.stride(-1) != 1:
            return None
        return self._cpu_decode(query, k_cache, v_cache, g.tables, g.lens, scale)

    @staticmethod
    def _attend_bmm(g: _Group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """16-bit decode on the CPU without the C kernel, as two bmm over all (KV head, sequence) pairs: the
        CPU's SDPA kernels are several times slower in bf16 than in fp32 at these shapes, while oneDNN's bf16
        bmm is faster than fp32. k, v: [Hkv, S, Lp, D] (contiguous for a head-major cache: no copy); the query
        heads sharing a KV head are the rows of its score matrix; softmax runs in fp32."""
        S = g.num_seqs
        _, hq, d = q.shape
        hkv, keys = k.shape[0], k.shape[2]
        grp = hq // hkv
        if g.additive is None and g.mask is not None:
            g.additive = torch.zeros(g.mask.shape, dtype=torch.float32).masked_fill_(~g.mask, float("-inf")) \
                .view(1, S, 1, keys)
        qh = q.view(S, hkv, grp, d).transpose(0, 1).reshape(hkv * S, grp, d)
        s = torch.bmm(qh, k.reshape(hkv * S, keys, d).transpose(1, 2))
        s = s.view(hkv, S, grp, keys).float().mul_(scale)
        if g.additive is not None:
            s.add_(g.additive)
        p = torch.softmax(s, dim=-1).to(q.dtype).view(hkv * S, grp, keys)
        o = torch.bmm(p, v.reshape(hkv * S, keys, d)).view(hkv, S, grp, d)
        return o.transpose(0, 1).reshape(S, hq, d)

    @staticmethod
    def _attend_ragged(g: _Group, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """16-bit chunk attention on the CPU, one sequence at a time over its own rows and keys: padding every
        chunk to the longest and every context to the longest made the scores of a 2,048-token prefill step
        ~5x larger than needed (47 vs 9 ms per layer for 14 prompts of 32..256 tokens)."""
        _, hq, d = query.shape
        hkv = k.shape[0]
        grp = hq // hkv
        if g.causal is None:
            g.causal = {}
        out = torch.empty_like(query)
        for i, (a, b, length) in enumerate(g.ragged):
            ql = b - a
            mask = g.causal.get((ql, length))
            if mask is None:  # query j sits at position length - ql + j and sees keys up to it
                pos = torch.arange(length - ql, length)[:, None]
                mask = torch.zeros(ql, 1, length).masked_fill_((torch.arange(length)[None, :] > pos)[:, None, :],
                                                               float("-inf"))
                g.causal[(ql, length)] = mask
            qh = query[a:b].view(ql, hkv, grp, d).permute(1, 0, 2, 3).reshape(hkv, ql * grp, d)
            s = torch.bmm(qh, k[:, i, :length].transpose(1, 2)).view(hkv, ql, grp, length).float().mul_(scale)
            p = torch.softmax(s.add_(mask), dim=-1).to(query.dtype).view(hkv, ql * grp, length)
            o = torch.bmm(p, v[:, i, :length])
            out[a:b] = o.view(hkv, ql, grp, d).permute(1, 0, 2, 3).reshape(ql, hq, d)
        return out
