"""The Llama family (Llama 2/3, SmolLM2, ...): RMSNorm, RoPE (incl. llama3 scaling), SwiGLU, GQA, tied
embeddings. It runs a flat batch: every sequence's new tokens concatenated, with their positions; the
attention layers write K/V into and read the context from the paged cache through the backend.

Weights use Hugging Face names except two fusions (the loader concatenates): ``self_attn.qkv_proj``
= [q_proj; k_proj; v_proj] and ``mlp.gate_up_proj`` = [gate_proj; up_proj].

Tensor parallel (``tp_size`` N > 1, Megatron-style; gpu_worker/distributed.py): each rank holds
num_heads / N query heads and num_kv_heads / N KV heads (its qkv_proj rows, its o_proj columns: one
all-reduce after o_proj), intermediate_size / N of the MLP (gate_up rows, down columns: one all-reduce
after down_proj), and ceil(vocab / N) rows of the embedding and the LM head (the embedding masks the ids
outside its rows and all-reduces; the logits are all-gathered, so every rank samples the same tokens
from the same logits and their per-sequence state stays in lockstep with no token broadcast, as in
vLLM V1). At N = 1 none of this runs: the layers are the plain ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gpu_worker import distributed
from gpu_worker.attention.backend import AttentionBackend
from gpu_worker.attention.metadata import AttentionMetadata
from gpu_worker.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, SiluAndMul
from gpu_worker.layers.linear import VocabParallelEmbedding, linear_prepacked, prepack_cpu_weight


@dataclass
class LlamaArgs:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "LlamaArgs":
        if cfg.get("model_type", "llama") not in ("llama", "mistral"):
            raise ValueError(f"model: architecture {cfg.get('model_type')!r} is not supported (llama family)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("model: attention/mlp biases are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"model: activation {cfg.get('hidden_act')!r} is not supported (silu)")
        heads = int(cfg["num_attention_heads"])
        return cls(
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    def check_tensor_parallel(self, n: int) -> None:
        """Refuse a shape that N ranks cannot split evenly (heads, KV heads, MLP width)."""
        if n < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {n}")
        if self.num_heads % n or self.num_kv_heads % n or self.intermediate_size % n:
            raise ValueError(
                f"tensor_parallel_size {n}: the model's num_attention_heads ({self.num_heads}), "
                f"num_key_value_heads ({self.num_kv_heads}) and intermediate_size ({self.intermediate_size}) "
                f"must all be divisible by it")

    def vocab_shard(self, n: int) -> int:
        """Rows of the embedding / LM head per rank (the last rank's tail past vocab_size is padding)."""
        return -(-self.vocab_size // n)


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs, layer_idx: int, tp: int = 1, **kw):
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads // tp, a.num_kv_heads // tp, a.head_dim
        self.q_size = self.num_heads * a.head_dim
        self.kv_size = self.num_kv_heads * a.head_dim
        self.scale = a.head_dim ** -0.5
        self.qkv_proj = Linear(a.hidden_size, self.q_size + 2 * self.kv_size, **kw)
        self.o_proj = Linear(self.q_size, a.hidden_size, **kw)
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, rope, x, kv_cache, meta, backend: AttentionBackend):
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        # q and k rotated together, k and v into the cache: [T, Hq + Hkv, D] view of the fused projection
        qk = qkv[:, : self.q_size + self.kv_size].view(T, nq + nkv, d)
        v = qkv[:, self.q_size + self.kv_size:].view(T, nkv, d)
        k_cache, v_cache = kv_cache[self.layer_idx, 0], kv_cache[self.layer_idx, 1]
        q = backend.rotary_and_write_kv(qk, v, *rope, k_cache, v_cache, meta, self.k_scale, self.v_scale)
        o = backend.forward(q, k_cache, v_cache, meta, self.scale, self.k_scale, self.v_scale)
        out = self.o_proj(o.reshape(T, self.q_size))
        return distributed.all_reduce(out) if self.tp > 1 else out


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs, tp: int = 1, **kw):
        super().__init__()
        self.tp = tp
        inter = a.intermediate_size // tp
        self.gate_up_proj = Linear(a.hidden_size, 2 * inter, **kw)
        self.down_proj = Linear(inter, a.hidden_size, **kw)
        self.act = SiluAndMul()

    def forward(self, x):
        out = self.down_proj(self.act(self.gate_up_proj(x), fp8=self.down_proj.takes_fp8))
        return distributed.all_reduce(out) if self.tp > 1 else out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, layer_idx: int, tp: int = 1, **kw):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(a, layer_idx, tp, **kw)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(a, tp, **kw)

    def forward(self, rope, x, residual, kv_cache, meta, backend):
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual, fp8=self.self_attn.qkv_proj.takes_fp8)
        h = self.self_attn(rope, h, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual, fp8=self.mlp.gate_up_proj.takes_fp8)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, a: LlamaArgs, max_positions: int, tp_rank: int = 0, tp: int = 1, **kw):
        super().__init__()
        if tp == 1:
            self.embed_tokens = Embedding(a.vocab_size, a.hidden_size, **kw)
        else:
            rows = a.vocab_shard(tp)
            self.embed_tokens = VocabParallelEmbedding(rows, a.hidden_size, tp_rank * rows, **kw)
        self.rotary = RotaryEmbedding(a.head_dim, max_positions, a.rope_theta, a.rope_scaling,
                                      device=kw.get("device"), dtype=kw.get("dtype") or torch.float32)
        self.layers = nn.ModuleList(LlamaDecoderLayer(a, i, tp, **kw) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, **kw)

    def forward(self, input_ids, positions, kv_cache, meta, backend):
        x = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions)  # once per step
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual, kv_cache, meta, backend)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs, max_positions: int | None = None, *, device=None, dtype=None,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        args.check_tensor_parallel(tp_size)
        self.args = args
        self.tp_rank, self.tp_size = tp_rank, tp_size
        kw = dict(device=device, dtype=dtype)
        self.model = LlamaModel(args, max_positions or args.max_position_embeddings, tp_rank, tp_size, **kw)
        if args.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(args.hidden_size, args.vocab_shard(tp_size), **kw)
        self._lm_head_packed: torch.Tensor | None = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        return self.model(input_ids, positions, kv_cache, meta, backend)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """hidden [n, hidden] -> logits [n, vocab], float32 (``float32=False``: in the model's dtype, for a
        greedy argmax, which the exact widening to float32 would not change: no 2-4 bytes a logit written and
        read again, ~200 MB a step at batch 256 and Llama-3's vocabulary)."""
        if self._lm_head_packed is not None:
            logits = linear_prepacked(hidden, self._lm_head_packed)
        else:
            logits = torch.nn.functional.linear(hidden, self.lm_head_weight)
        if self.tp_size > 1:  # every rank's vocab shard, then the padding rows cut off
            logits = distributed.all_gather_last(logits)[..., : self.args.vocab_size]
        return logits.float() if float32 else logits

    def prepack_cpu(self) -> bool:
        """CPU, bf16: every linear layer and the LM head in oneDNN's weight layout (layers/linear.py); a
        no-op elsewhere. Call after the weights are loaded."""
        packed = [m.prepack() for m in self.modules() if isinstance(m, Linear)]
        self._lm_head_packed = prepack_cpu_weight(self.lm_head_weight)
        return all(packed) and self._lm_head_packed is not None

    def quantize_fp8(self) -> int:
        """FP8 weights for every linear layer of the decoder (layers/linear.py); the embedding and the LM head
        stay in the model dtype, as in vLLM's FP8. Returns how many layers were quantized."""
        linears = [m for m in self.model.layers.modules() if isinstance(m, Linear)]
        for m in linears:
            m.quantize_fp8()
        return len(linears)

    def set_kv_scales(self, k_scales: list[float], v_scales: list[float]) -> None:
        for layer, ks, vs in zip(self.model.layers, k_scales, v_scales):
            layer.self_attn.k_scale = float(ks)
            layer.self_attn.v_scale = float(vs)
