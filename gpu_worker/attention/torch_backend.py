"""Paged attention in plain torch: the CPU backend and the oracle for the Triton one.

Per step (``prepare``) the sequences are split into a decode group (one new token each) and a prefill
group (chunks), and for each group the block ids to gather, the query packing and the attention mask
are built once. Per layer each group is then one ``index_select`` of whole blocks for K and one for V
(into reused workspace buffers: fresh large CPU allocations page-fault on every layer) and one batched
SDPA with GQA; there is no Python loop over sequences.
"""

from __future__ import annotations

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


@dataclass
class _StepState:
    groups: list[_Group]
    slots: torch.Tensor  # [num_tokens] flat slot of each new token (padding clamped to 0, see valid)
    blk: torch.Tensor  # [num_tokens] block of each new token
    off: torch.Tensor  # [num_tokens] offset in the block
    valid: torch.Tensor | None  # [num_tokens] bool when some slots are -1 (padding), else None


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        self._ws: dict[str, torch.Tensor] = {}

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
        return _Group(
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
                slots = st.slots if st.valid is None else st.slots[st.valid]
                flat = cache.view(-1, *cache.shape[2:])
                if _is_fp8(cache):  # no fp8 index_copy on CPU: copy the bytes
                    flat, x = flat.view(torch.uint8), x.contiguous().view(torch.uint8)
                flat.index_copy_(0, slots, x)
            else:
                cache[blk, off] = x

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
        nblocks, bs, hkv, d = cache.shape
        flat = cache.flatten(1)
        buf = self._workspace(name, g.num_seqs * g.num_blocks * flat.shape[1], cache.dtype, cache.device)
        torch.index_select(flat, 0, g.blk_flat, out=buf.view(-1, flat.shape[1]))
        x = buf.view(g.num_seqs, g.num_blocks * bs, hkv, d)
        if _is_fp8(cache):
            x = x.to(dtype)
            if scale != 1.0:
                x.mul_(scale)
        return x.transpose(1, 2)  # [S, Hkv, Lp, D]

    def _attend(self, g: _Group, query, k_cache, v_cache, scale, k_scale, v_scale) -> torch.Tensor:
        T, hq, d = query.shape
        S, max_q = g.num_seqs, g.max_q
        k = self._gather("k", k_cache, g, query.dtype, k_scale)
        v = self._gather("v", v_cache, g, query.dtype, v_scale)
        if g.pack_idx is not None:
            qp = query.new_zeros(S * max_q, hq, d)
            qp.index_copy_(0, g.pack_idx, query)
        else:
            qp = query
        q = qp.view(S, max_q, hq, d).transpose(1, 2)  # [S, Hq, max_q, D]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=scale, enable_gqa=hq != k.shape[1])
        o = o.transpose(1, 2).reshape(S * max_q, hq, d)
        if g.pack_idx is not None:
            o = o.index_select(0, g.pack_idx)
        return o
