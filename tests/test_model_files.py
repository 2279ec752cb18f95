"""resolve_model: the converted SmolLM2 cache, HF directories, random shapes, atomic cache writes."""

from __future__ import annotations

import json
import threading

import pytest

from model_io import model_files
from model_io.model_files import ModelFiles, resolve_model


def test_default_model_is_converted_to_hf_layout(smollm2_files):
    f = smollm2_files
    assert isinstance(f, ModelFiles) and f.name == "smollm2-135m-instruct" and not f.is_random
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (f.path / name).is_file(), name
    cfg = json.loads((f.path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["num_attention_heads"] == 9 and cfg["head_dim"] == 64 and cfg["rope_theta"] == 100000.0
    assert f.eos_token_ids == [2] and cfg["bos_token_id"] == 1
    tcfg = json.loads((f.path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"] and tcfg["eos_token"] == "<|im_end|>"
    # None means the default; a second call reuses the cache
    mtime = (f.path / "model.safetensors").stat().st_mtime_ns
    again = resolve_model(None)
    assert again.path == f.path and (f.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_tokenizer_files_load(smollm2_files):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_files.path / "tokenizer.json"))
    assert tok.encode("Hello world").ids == [19556, 905]
    assert tok.token_to_id("<|im_end|>") == 2


def test_hf_directory_is_used_as_is(smollm2_files):
    f = resolve_model(str(smollm2_files.path))
    assert f.path == smollm2_files.path and f.config["hidden_size"] == 576


def test_random_shapes():
    tiny = resolve_model("random:tiny")
    assert tiny.is_random and tiny.path is None
    c = tiny.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["vocab_size"]) == (2, 64, 4, 2, 512)
    l3 = resolve_model("random:llama-3-8b").config
    assert (l3["num_key_value_heads"], l3["vocab_size"], l3["intermediate_size"]) == (8, 128256, 14336)
    assert resolve_model("random:llama-2-7b").config["num_key_value_heads"] == 32
    assert resolve_model("random:smollm2-135m").config["head_dim"] == 64
    assert resolve_model("random:llama-3.1-8b").config["rope_scaling"]["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="unknown random shape"):
        resolve_model("random:gpt-5")
    with pytest.raises(ValueError):
        resolve_model("/nonexistent/model/dir")


def test_normalize_config_variants():
    c = model_files.normalize_config({"hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
                                      "num_attention_heads": 4, "vocab_size": 10, "eos_token_id": [3, 4],
                                      "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    assert c["num_key_value_heads"] == 4 and c["head_dim"] == 16 and c["eos_token_ids"] == [3, 4]
    assert c["rope_theta"] == 5e5 and c["rope_scaling"]["factor"] == 8.0


def test_cache_is_written_atomically_under_concurrency(tmp_path, monkeypatch):
    """Concurrent conversions: every caller gets the complete directory and no temp dir is left."""
    monkeypatch.setenv("PAGEDFLEET_CACHE", str(tmp_path))
    calls = []

    def fake_convert(src, out):
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"x" * 1000)
        (out / "config.json").write_text(json.dumps({"hidden_size": 8, "intermediate_size": 8,
                                                     "num_hidden_layers": 1, "num_attention_heads": 1,
                                                     "vocab_size": 4}))

    monkeypatch.setattr(model_files, "convert_gguf", fake_convert)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"gguf")
    results, errors = [], []

    def worker():
        try:
            results.append(model_files._convert_cached("fake", src))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert {r.path for r in results} == {tmp_path / "fake"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake", "m.gguf"]
    assert (tmp_path / "fake" / "pagedfleet.json").exists()
    n = len(calls)
    model_files._convert_cached("fake", src)  # cached now
    assert len(calls) == n
