"""Our Llama implementation against HF transformers (the oracle loads the GGUF itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpu_worker.attention import AttentionMetadata

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def _encode(files, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(files.path / "tokenizer.json"))
    return [tok.encode(t).ids for t in texts]


def _forward(runner, chunks, first_block=0):
    """One flat forward. chunks: list of (seq_key, token_ids, start, table) -> float32 logits per chunk."""
    seq_lens = [start + len(toks) for _, toks, start, _ in chunks]
    qlens = [len(toks) for _, toks, _, _ in chunks]
    meta = AttentionMetadata.build(seq_lens, qlens, [t for *_, t in chunks], runner.block_size, runner.device)
    ids = torch.tensor([t for _, toks, _, _ in chunks for t in toks])
    pos = torch.tensor([p for _, toks, start, _ in chunks for p in range(start, start + len(toks))])
    runner.backend.prepare(meta)
    with torch.inference_mode():
        h = runner.model(ids, pos, runner.kv_cache, meta, runner.backend)
        logits = runner.model.compute_logits(h)
    return list(logits.split(qlens))


def _hf_logits(hf, ids):
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def prompts(smollm2_files):
    texts = [
        CHAT.format("What is the capital of France?"),
        "The quick brown fox",
        CHAT.format("Write a long story about a dragon who learns to paint. " * 12),
    ]
    return _encode(smollm2_files, texts)


def test_converted_weights_equal_hf(smollm2_files, hf_smollm2):
    from safetensors.torch import load_file

    ours = load_file(str(smollm2_files.path / "model.safetensors"))
    theirs = hf_smollm2.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(ours[name], theirs[name]), name
    assert set(ours) == {k for k in theirs if k != "lm_head.weight"}  # tied
    cfg = smollm2_files.config
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (576, 30, 3)


def test_flat_batch_logits_match_hf(smollm2_runner, hf_smollm2, prompts):
    """Three prompts of different lengths in ONE flat forward: each matches HF run alone."""
    chunks, nxt = [], 0
    for i, ids in enumerate(prompts):
        nb = -(-len(ids) // 16)
        chunks.append((i, ids, 0, list(range(nxt + nb - 1, nxt - 1, -1))))  # reversed: exercise the table
        nxt += nb
    ours = _forward(smollm2_runner, chunks)
    worst = 0.0
    for ids, lo in zip(prompts, ours):
        ref = _hf_logits(hf_smollm2, ids)
        worst = max(worst, _rel_err(lo, ref))
        assert torch.equal(lo.argmax(-1), ref.argmax(-1))
    print(f"max relative logit error vs HF: {worst:.2e}")
    assert worst < 1e-4


def test_chunked_prefill_matches_hf(smollm2_runner, hf_smollm2, prompts):
    ids = prompts[2]
    table = list(range(100, 100 + -(-len(ids) // 16)))
    ref = _hf_logits(hf_smollm2, ids)
    cuts = [0, 13, 40, 41, len(ids) - 5, len(ids)]
    got = []
    for a, b in zip(cuts, cuts[1:]):
        # a second, unrelated sequence rides along in each step (mixed batch)
        other = prompts[0][: 5 + a % 7]
        out = _forward(smollm2_runner, [("x", ids[a:b], a, table), ("y", other, 0, [200])])
        got.append(out[0])
    assert _rel_err(torch.cat(got), ref) < 1e-4


def test_llama3_rope_untied_hf_dir_vs_hf(tmp_path):
    """A random HF Llama with llama3 rope scaling and an untied head, saved by transformers: our loader
    reads the directory as is and our model matches HF's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_worker import ModelRunner, WorkerConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=32),
                      rope_theta=5000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    runner = ModelRunner(WorkerConfig(model=str(tmp_path), num_gpu_blocks=32, num_cpu_blocks=0))
    assert runner.args.rope_scaling["rope_type"] == "llama3", saved
    ids = np.random.default_rng(0).integers(0, 300, 200).tolist()
    ours = _forward(runner, [(0, ids, 0, list(range(13)))])[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    assert _rel_err(ours, ref) < 1e-4
