"""Tensor parallelism on whatever GPUs there are: a TP = N group against TP = 1, same prompts, greedy.

On one GPU the N ranks share it over gloo (gpu_worker/tp_group.py); with N GPUs each rank gets its own
over NCCL. Runs, each a short greedy run of 4 prompts (1, 17, 100, 333 tokens, 12 tokens each):
float32 (tokens must be identical), and bf16 with FP8 weights and FP8 KV (sharded FP8: reports how many
tokens match; bf16 reductions in another order may flip a near-tie).

    python benchmarks/tp_check.py [--model random:llama-3-8b] [--tp 2]
Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine import _free  # noqa: E402  (release an engine's GPU memory before the next)
from pagedfleet.engine import EngineConfig, LLMEngine  # noqa: E402
from protocol import SamplingParams  # noqa: E402

DEVICE = "cuda"


def run(model: str, tp: int, dtype: str, quantization: str | None, kv: str) -> tuple[list[list[int]], float]:
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 500) for _ in range(n)] for n in (1, 17, 100, 333)]
    t = time.perf_counter()
    eng = LLMEngine(EngineConfig(model=model, device=DEVICE, dtype=dtype, tensor_parallel_size=tp,
                                 quantization=quantization, kv_cache_dtype=kv, num_gpu_blocks=512,
                                 max_model_len=2048, max_num_batched_tokens=256, max_num_seqs=64))
    for p in prompts:
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    outs = sorted(eng.run_to_completion(), key=lambda o: int(o.request_id.split("-")[1]))
    tokens = [o.outputs[0].token_ids for o in outs]
    close = getattr(eng.runner, "close", None)
    if close is not None:  # a group: stop its other ranks
        close()
    del eng
    _free()
    return tokens, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3-8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cpu: a check of this script (gloo, float32 only)")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    configs = [("float32", None, "auto")] + ([("bfloat16", "fp8", "fp8")] if a.device == "cuda" else [])
    for dtype, quant, kv in configs:
        one, t1 = run(a.model, 1, dtype, quant, kv)
        many, tn = run(a.model, a.tp, dtype, quant, kv)
        same = sum(x == y for p, q in zip(one, many) for x, y in zip(p, q))
        total = sum(len(p) for p in one)
        print(json.dumps({"part": "tensor_parallel", "model": a.model, "tp": a.tp, "gpus": gpus,
                          "backend": "nccl" if gpus >= a.tp else "gloo (ranks share one GPU)",
                          "dtype": dtype, "quantization": quant, "kv_cache_dtype": kv,
                          "tokens_identical": one == many, "tokens_matching": f"{same}/{total}",
                          "seconds_tp1": round(t1, 1), f"seconds_tp{a.tp}": round(tn, 1),
                          "tokens_tp1": one, f"tokens_tp{a.tp}": many}), flush=True)


if __name__ == "__main__":
    main()
