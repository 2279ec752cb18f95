"""Grammar engines compared on the serving workload: a realistic 30-field JSON schema with the SmolLM2
tokenizer. Prints, per engine installed: the schema's compile time (cold: a fresh compiler, so no cache),
and the time per step to fill the token bitmasks of a batch of 256 sequences mid-generation (each
sequence advancing by a random allowed token after each step) plus the batched apply to [256, V] logits.

    PYTHONPATH=$PWD python benchmarks/grammar_bench.py [--batch 256] [--steps 20] [--engines llguidance,...]

Engines: llguidance (what gpu_worker/structured_output.py uses), xgrammar, outlines-core; an engine
that is not installed is skipped (docs/structured_outputs.md records the comparison).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model_io.model_files import resolve_model


def schema_30_fields() -> dict:
    """30 leaf fields in nested objects: strings (one with a pattern), integers with bounds, numbers, enums,
    booleans, arrays of strings and of objects: what a form-filling or extraction request sends."""
    addr = {"type": "object", "properties": {
        "street": {"type": "string"}, "city": {"type": "string"},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["US", "FR", "DE", "JP", "BR"]}},
        "required": ["street", "city", "zip", "country"], "additionalProperties": False}
    item = {"type": "object", "properties": {
        "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1, "maximum": 99},
        "price": {"type": "number"}}, "required": ["sku", "qty", "price"], "additionalProperties": False}
    props = {
        "id": {"type": "integer"}, "name": {"type": "string"}, "email": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150}, "score": {"type": "number"},
        "active": {"type": "boolean"}, "verified": {"type": "boolean"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tier": {"type": "string", "enum": ["free", "pro", "enterprise"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "home": addr, "work": addr,
        "items": {"type": "array", "items": item, "maxItems": 4},
        "phone": {"type": "string", "pattern": "^\\+?[0-9]{7,12}$"},
        "notes": {"type": "string"}, "created": {"type": "string"}, "updated": {"type": "string"},
        "locale": {"type": "string", "enum": ["en", "fr", "de"]}, "balance": {"type": "number"},
        "visits": {"type": "integer"}, "nickname": {"type": "string"}, "newsletter": {"type": "boolean"},
    }
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def count_fields(schema: dict) -> int:
    n = 0
    for p in schema.get("properties", {}).values():
        if p.get("type") == "object":
            n += count_fields(p)
        elif p.get("type") == "array" and p["items"].get("type") == "object":
            n += count_fields(p["items"])
        else:
            n += 1
    return n



def run_steps(fill_apply, advance, B: int, V: int, steps: int) -> list[float]:
    """Per step: the timed mask fill + apply on [B, V] logits, then each sequence advances by a random
    allowed token (drawn from the masked logits, untimed), so the sequences' states spread out."""
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn(B, V, generator=gen)
        t = time.perf_counter()
        fill_apply(logits)
        times.append(time.perf_counter() - t)
        advance(torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0].tolist())
    return times


def bench_llguidance(tok_json: str, vocab: int, eos: int, schema: dict, B: int, steps: int):
    import llguidance
    import llguidance.torch as lt

    tok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
    bitmask = lt.allocate_token_bitmask(B, vocab)
    t = time.perf_counter()  # compile: the grammar, a matcher and its first mask (the lexer is built lazily)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    m0 = llguidance.LLMatcher(tok, grammar)
    lt.fill_next_token_bitmask(m0, bitmask, 0)
    compile_s = time.perf_counter() - t
    assert not m0.is_error(), m0.get_error()
    ms = [m0.deep_copy() for _ in range(B)]  # as the worker does: copies of the compiled template
    ex = llguidance.LLExecutor()
    pairs = [(m, i) for i, m in enumerate(ms)]

    def fill_apply(logits):
        lt.fill_next_token_bitmask_par(ex, pairs, bitmask)
        lt.apply_token_bitmask_inplace(logits, bitmask)

    def advance(toks):
        for m, t in zip(ms, toks):
            m.consume_token(t)
    return compile_s, run_steps(fill_apply, advance, B, vocab, steps)


def bench_xgrammar(hf_tok, vocab: int, schema: dict, B: int, steps: int):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t = time.perf_counter()
    cg = compiler.compile_json_schema(json.dumps(schema))
    compile_s = time.perf_counter() - t
    ms = [xgr.GrammarMatcher(cg) for _ in range(B)]
    bitmask = xgr.allocate_token_bitmask(B, vocab)
    batch = xgr.BatchGrammarMatcher()

    def fill_apply(logits):
        batch.batch_fill_next_token_bitmask(ms, bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask)

    def advance(toks):
        for m, t in zip(ms, toks):
            m.accept_token(t)
    return compile_s, run_steps(fill_apply, advance, B, vocab, steps)


def bench_outlines(hf_tok, eos: int, schema: dict, B: int, steps: int):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocab: dict[str, list[int]] = {}
    for tid in range(len(hf_tok)):
        if tid != eos:
            vocab.setdefault(hf_tok.convert_ids_to_tokens(tid), []).append(tid)
    t = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema)), Vocabulary(eos, vocab))
    compile_s = time.perf_counter() - t
    gs = [Guide(index) for _ in range(B)]
    V = len(hf_tok)

    def fill_apply(logits):
        mask = torch.zeros(B, V, dtype=torch.bool)
        for i, g in enumerate(gs):  # no batched CPU fill in outlines-core's Python API: a list per sequence
            mask[i, g.get_tokens()] = True
        logits.masked_fill_(~mask, float("-inf"))

    def advance(toks):
        for g, t in zip(gs, toks):
            g.advance(t)
    return compile_s, run_steps(fill_apply, advance, B, V, steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--engines", default="llguidance,xgrammar,outlines-core")
    a = ap.parse_args()
    files = resolve_model("smollm2-135m-instruct")
    tok_json = (files.path / "tokenizer.json").read_text()
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(tok_json)
    vocab = fast.get_vocab_size(with_added_tokens=True)
    eos = files.eos_token_ids[0]
    schema = schema_30_fields()
    print(f"schema: {count_fields(schema)} leaf fields; vocab {vocab}; batch {a.batch}; "
          f"torch threads {torch.get_num_threads()}")
    hf_tok = None
    for name in a.engines.split(","):
        try:
            if name in ("xgrammar", "outlines-core") and hf_tok is None:
                from transformers import PreTrainedTokenizerFast

                hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(files.path / "tokenizer.json"))
            if name == "llguidance":
                c, ts = bench_llguidance(tok_json, vocab, eos, schema, a.batch, a.steps)
            elif name == "xgrammar":
                c, ts = bench_xgrammar(hf_tok, vocab, schema, a.batch, a.steps)
            else:
                c, ts = bench_outlines(hf_tok, eos, schema, a.batch, a.steps)
        except ImportError as e:
            print(f"{name:14s} not installed ({e})")
            continue
        ts = sorted(ts)
        print(f"{name:14s} compile {c * 1e3:9.1f} ms   mask fill+apply per step at batch {a.batch}: "
              f"median {ts[len(ts) // 2] * 1e3:7.2f} ms  (min {ts[0] * 1e3:.2f}, max {ts[-1] * 1e3:.2f})")


if __name__ == "__main__":
    main()
