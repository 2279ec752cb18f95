"""Low load: the fleet's inter-token latency against the offline engine's decode step, same batch.

Random weights (Llama-3-8B's layers, SmolLM2's vocabulary) with SmolLM2's tokenizer in the gateway, so that
every token streams as text.

1. A fleet (redis-server, scheduler, one worker, gateway: fleet_overhead.start_fleet) serves
   `pagedfleet bench serve` with 16 concurrent streams of 512-token prompts and 256 output tokens.
2. It is shut down; the offline engine runs the same 16 requests and times each decode-only step
   (all 16 decoding), median.
Prints one JSON object: the fleet's ITL / TPOT / TTFT, the offline median step, and the ratio
median ITL / offline median step (target <= 1.15).

    python benchmarks/low_load.py [--model random:llama-3-8b-49k] [--pipeline] [--streams 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from fleet_overhead import MAX_MODEL_LEN, start_fleet  # noqa: E402
from pagedfleet.bench import serve as bench_serve  # noqa: E402


def fleet_side(a) -> dict:
    f = start_fleet(1, 1, Path(a.workdir), a)
    try:
        argv = ["--base-url", f.url, "--model", a.model, "--num-prompts", str(a.streams), "--max-concurrency",
                str(a.streams), "--input-len", str(a.input_len), "--output-len", str(a.output_len),
                "--vocab-size", str(a.vocab_size)]
        warm = bench_serve.parse_args(argv[:4] + ["--num-prompts", "2", "--output-len", "4", "--vocab-size", str(a.vocab_size)])
        asyncio.run(bench_serve.run(warm))
        return asyncio.run(bench_serve.run(bench_serve.parse_args(argv)))
    except BaseException:
        f.dump_logs()
        raise
    finally:
        f.close()


def offline_side(a, prompts) -> dict:
    from pagedfleet.engine import EngineConfig, LLMEngine
    from protocol import SamplingParams

    eng = LLMEngine(EngineConfig(model=a.model, device=a.device, max_model_len=MAX_MODEL_LEN,
                                 max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                                 pipeline=a.pipeline))
    sp = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=True)
    eng.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    eng.run_to_completion()
    for p in prompts:
        eng.add_request(p, sp)
    steps = []
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        outs = eng.step()
        dt = time.perf_counter() - t
        if len(outs) == len(prompts):  # every stream got a token this step
            steps.append(dt)
    decode = steps[len(steps) // 10:]  # past the prefill
    return {"offline_decode_steps": len(decode), "offline_median_step_ms": round(1000 * statistics.median(decode), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3-8b-49k",
                    help="random weights need a tokenizer for the gateway to stream text: --tokenizer-dir")
    ap.add_argument("--tokenizer-dir", default=".dev/smoltok", help="a folder with the model's tokenizer.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids are drawn below this")
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--workdir", default="/tmp/pagedfleet-low-load")
    a = ap.parse_args()
    # what start_fleet reads
    a.num_gpu_blocks = None if a.device == "cuda" else 1024
    a.max_num_seqs, a.max_num_batched_tokens = 256, 4096
    a.quantization, a.kv_cache_dtype = None, "auto"
    fleet = fleet_side(a)
    prompts = [list(p) for p, _ in bench_serve.make_requests(bench_serve.parse_args(
        ["--num-prompts", str(a.streams), "--input-len", str(a.input_len), "--vocab-size", str(a.vocab_size)]),
        a.vocab_size)]
    off = offline_side(a, prompts)
    keep = {k: v for k, v in fleet.items() if k not in ("output_tokens_per_request", "requested_output_tokens")}
    res = {"benchmark": "low_load", "model": a.model, "pipeline": a.pipeline, "streams": a.streams,
           "input_len": a.input_len, "output_len": a.output_len, **keep, **off,
           "itl_over_offline_step": round(fleet["median_itl_ms"] / off["offline_median_step_ms"], 3),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
