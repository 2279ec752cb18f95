"""Weights into our model: from a Hugging Face directory (safetensors, HF names) or random (std 0.02).

A tensor-parallel rank (``model.tp_size`` > 1) reads only its slice of each tensor (safetensors slices):
rows of q/k/v/gate/up (column-parallel), columns of o_proj/down (row-parallel), its vocab rows of the
embedding and the LM head (zero padding past vocab_size); norms whole. Random weights are drawn whole,
as at one rank, then sliced the same way, so every tensor-parallel size computes the same model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gpu_worker.models.llama import LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_QKV = {"self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 1, "self_attn.v_proj.weight": 2}
_GATE_UP = {"mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 1}
_ROW_SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # column-parallel: output rows split
_COL_SPLIT = ("o_proj", "down_proj")  # row-parallel: input columns split
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def _shard(name: str, t, shape, rank: int, n: int, vocab_rows: int):
    """Rank ``rank`` of ``n``'s slice of tensor ``name`` (HF name) of full ``shape``; ``t`` is a tensor or a
    safetensors slice (only the slice is read)."""
    if name in _VOCAB:
        start = rank * vocab_rows
        return t[start: min(start + vocab_rows, shape[0])]
    kind = name.rsplit(".", 2)[-2]
    if kind in _ROW_SPLIT:
        k = shape[0] // n
        return t[rank * k: (rank + 1) * k]
    if kind in _COL_SPLIT:
        k = shape[1] // n
        return t[:, rank * k: (rank + 1) * k]
    return t[:]


def _copy_vocab_rows(dst: torch.Tensor, t: torch.Tensor) -> None:
    dst[: t.shape[0]].copy_(t)
    dst[t.shape[0]:].zero_()  # padding rows of the last rank: their logits are cut off after the gather


def _read_shard(f, name: str, a, rank: int, n: int, vocab_rows: int) -> torch.Tensor:
    """Only this rank's slice of tensor ``name`` from the open safetensors file ``f``."""
    sl = f.get_slice(name)
    full = tuple(sl.get_shape())
    if name in _VOCAB and full != (a.vocab_size, a.hidden_size):
        raise ValueError(f"model: weight {name!r} has shape {full}, expected {(a.vocab_size, a.hidden_size)}")
    return _shard(name, sl, full, rank, n, vocab_rows)


def _safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: no *.safetensors in {path}")
    return files


@torch.inference_mode()
def load_weights(model: LlamaForCausalLM, path: str | Path) -> None:
    """Copy HF-named tensors into the model (fusing q/k/v and gate/up), casting to the model's dtype."""
    from safetensors import safe_open

    a = model.args
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    rank, n = model.tp_rank, model.tp_size  # this rank's share of the fused layers' rows
    q, kv, inter = a.num_heads * a.head_dim // n, a.num_kv_heads * a.head_dim // n, a.intermediate_size // n
    qkv_off = [0, q, q + kv]
    qkv_len = [q, kv, kv]
    gu_off = [0, inter]
    vocab_rows = a.vocab_shard(n)
    for file in _safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                t = f.get_tensor(name) if n == 1 else _read_shard(f, name, a, rank, n, vocab_rows)
                m = _LAYER.match(name)
                if m and m.group(2) in _QKV:
                    i = _QKV[m.group(2)]
                    dst_name = f"model.layers.{m.group(1)}.self_attn.qkv_proj.weight"
                    params[dst_name][qkv_off[i]: qkv_off[i] + qkv_len[i]].copy_(t)
                    loaded.add(f"{dst_name}#{i}")
                    continue
                if m and m.group(2) in _GATE_UP:
                    i = _GATE_UP[m.group(2)]
                    dst_name = f"model.layers.{m.group(1)}.mlp.gate_up_proj.weight"
                    params[dst_name][gu_off[i]: gu_off[i] + inter].copy_(t)
                    loaded.add(f"{dst_name}#{i}")
                    continue
                if name == "lm_head.weight" and model.lm_head is None:
                    continue  # tied: the embedding is the head
                if name not in params:
                    raise ValueError(f"model: unexpected weight {name!r} in {file}")
                if n > 1 and name in _VOCAB:
                    _copy_vocab_rows(params[name], t)
                    loaded.add(name)
                    continue
                if tuple(params[name].shape) != tuple(t.shape):
                    raise ValueError(f"model: weight {name!r} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                params[name].copy_(t)
                loaded.add(name)
    missing = []
    for name in params:
        if name.endswith("qkv_proj.weight"):
            missing += [f"{name}#{i}" for i in range(3) if f"{name}#{i}" not in loaded]
        elif name.endswith("gate_up_proj.weight"):
            missing += [f"{name}#{i}" for i in range(2) if f"{name}#{i}" not in loaded]
        elif name not in loaded:
            missing.append(name)
    if missing:
        raise ValueError(f"model: weights missing from {path}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


@torch.inference_mode()
def init_random_weights(model: LlamaForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic random weights: normal(0, std) for matrices, ones for norms. A tensor-parallel rank
    draws each matrix whole (the same numbers as one rank) and keeps its slice."""
    n = model.tp_size
    for name, p in model.named_parameters():
        g = torch.Generator(device=p.device)
        g.manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))
        if p.dim() == 1:
            p.fill_(1.0)
        elif n > 1:
            shape, parts = _full_shape(model, name, p)
            full = torch.empty(shape, device=p.device, dtype=p.dtype).normal_(0.0, std, generator=g)
            _copy_random_shard(model, name, p, full, parts)
        elif p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            p.normal_(0.0, std, generator=g)
        else:
            p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, std, generator=g))


def _full_shape(model: LlamaForCausalLM, name: str, p: torch.Tensor) -> tuple[tuple[int, ...], list[tuple[str, int]]]:
    """A sharded parameter's shape at one rank, and its fused parts (HF kind, full rows) if it has any."""
    a, n = model.args, model.tp_size
    if name in _VOCAB:
        return (a.vocab_size, a.hidden_size), []
    if name.endswith("qkv_proj.weight"):
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        return (q + 2 * kv, p.shape[1]), [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
    if name.endswith("gate_up_proj.weight"):
        i = a.intermediate_size
        return (2 * i, p.shape[1]), [("gate_proj", i), ("up_proj", i)]
    if name.rsplit(".", 2)[-2] in _COL_SPLIT:
        return (p.shape[0], p.shape[1] * n), []
    return tuple(p.shape), []


def _copy_random_shard(model: LlamaForCausalLM, name: str, p: torch.Tensor, full: torch.Tensor, parts) -> None:
    rank, n, rows = model.tp_rank, model.tp_size, model.args.vocab_shard(model.tp_size)
    if name in _VOCAB:
        _copy_vocab_rows(p, _shard(name, full, full.shape, rank, n, rows))
    elif parts:
        pieces = full.split([r for _, r in parts])
        p.copy_(torch.cat([_shard(f"x.{kind}.weight", t, t.shape, rank, n, rows)
                           for (kind, _), t in zip(parts, pieces)]))
    else:
        p.copy_(_shard(name, full, full.shape, rank, n, rows))


def _stable_hash(s: str) -> int:
    import zlib

    return zlib.crc32(s.encode())
