"""Weights into our model: from a Hugging Face directory (safetensors, HF names) or random (std 0.02)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gpu_worker.models.llama import LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_QKV = {"self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 1, "self_attn.v_proj.weight": 2}
_GATE_UP = {"mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 1}


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
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    qkv_off = [0, q, q + kv]
    qkv_len = [q, kv, kv]
    gu_off = [0, a.intermediate_size]
    for file in _safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                t = f.get_tensor(name)
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
                    params[dst_name][gu_off[i]: gu_off[i] + a.intermediate_size].copy_(t)
                    loaded.add(f"{dst_name}#{i}")
                    continue
                if name == "lm_head.weight" and model.lm_head is None:
                    continue  # tied: the embedding is the head
                if name not in params:
                    raise ValueError(f"model: unexpected weight {name!r} in {file}")
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
    """Deterministic random weights: normal(0, std) for matrices, ones for norms."""
    for name, p in model.named_parameters():
        g = torch.Generator(device=p.device)
        g.manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))
        if p.dim() == 1:
            p.fill_(1.0)
        elif p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            p.normal_(0.0, std, generator=g)
        else:
            p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, std, generator=g))


def _stable_hash(s: str) -> int:
    import zlib

    return zlib.crc32(s.encode())
