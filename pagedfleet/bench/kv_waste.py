"""KV-cache waste of paged allocation vs static max-length preallocation (no model).

Runs a workload through the real ledger + Scheduler (dummy output tokens) and through a simulation of
static preallocation (each admitted request reserves max_model_len slots; admitted only while that many
are free), with the same step token budget, and prints one JSON line:

* ``paged_waste`` / ``static_waste``: allocated token slots not holding a (computed) token / allocated
  slots, measured after every step and averaged over the steps;
* ``paged_peak_concurrency`` / ``static_peak_concurrency``: most requests holding KV memory at once.

    python -m pagedfleet.bench.kv_waste [--workload mixed] [--num-gpu-blocks 2048] [--block-size 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pagedfleet.bench.workloads import get_workload, ledger_run


def run_paged(workload, num_gpu_blocks: int, block_size: int, max_num_batched_tokens: int,
              max_num_seqs: int) -> dict:
    ratios = []
    peak = 0
    steps = 0
    t0 = time.perf_counter()
    for sched, _ in ledger_run(workload, num_gpu_blocks, block_size, max_num_batched_tokens, max_num_seqs):
        steps += 1
        allocated, filled = sched.kv.slot_usage()
        if allocated:
            ratios.append((allocated - filled) / allocated)
        peak = max(peak, len(sched.running))
    st = sched.stats()
    return {"waste": sum(ratios) / len(ratios), "peak_concurrency": peak, "steps": steps,
            "preemptions": st["preemptions"], "seconds": time.perf_counter() - t0}


def run_static(workload, num_gpu_blocks: int, block_size: int, max_num_batched_tokens: int,
               max_num_seqs: int) -> dict:
    """Static preallocation: a request reserves max_model_len slots when admitted (FCFS, same budget)."""
    slots_total = num_gpu_blocks * block_size
    per_req = workload.max_model_len
    waiting = [[len(r.prompt_token_ids), r.sampling.max_tokens, 0, 0] for r in workload.requests]  # prompt, out, computed, generated
    waiting.reverse()
    running: list[list[int]] = []
    ratios = []
    peak = 0
    steps = 0
    while waiting or running:
        budget = max_num_batched_tokens
        # decodes, then prefill chunks of running requests
        for phase in ("decode", "prefill"):
            for r in running:
                prompt, out, computed, gen = r
                ntok = prompt + gen  # tokens known (prompt + generated)
                todo = ntok - computed
                if phase == "decode" and not (computed >= prompt and todo == 1):
                    continue
                if phase == "prefill" and (computed >= prompt and todo == 1):
                    continue
                if budget <= 0 or todo <= 0:
                    continue
                k = min(todo, budget)
                budget -= k
                r[2] += k
                if r[2] == ntok:
                    r[3] += 1  # sampled a token
        # admission
        while waiting and budget > 0 and len(running) < max_num_seqs and (len(running) + 1) * per_req <= slots_total:
            r = waiting.pop()
            k = min(r[0], budget)
            budget -= k
            r[2] += k
            if r[2] == r[0]:
                r[3] += 1
            running.append(r)
        steps += 1
        allocated = len(running) * per_req
        filled = sum(r[2] for r in running)
        if allocated:
            ratios.append((allocated - filled) / allocated)
        peak = max(peak, len(running))
        running = [r for r in running if r[3] < r[1]]
    return {"waste": sum(ratios) / len(ratios), "peak_concurrency": peak, "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedfleet bench kv-waste", description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="mixed")
    p.add_argument("--num-gpu-blocks", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--json", action="store_true", help="(output is always one JSON line)")
    a = p.parse_args(argv)
    wl = get_workload(a.workload)
    paged = run_paged(wl, a.num_gpu_blocks, a.block_size, a.max_num_batched_tokens, a.max_num_seqs)
    static = run_static(wl, a.num_gpu_blocks, a.block_size, a.max_num_batched_tokens, a.max_num_seqs)
    out = {
        "bench": "kv_waste",
        "workload": wl.name,
        "num_requests": len(wl.requests),
        "num_gpu_blocks": a.num_gpu_blocks,
        "block_size": a.block_size,
        "max_model_len": wl.max_model_len,
        "paged_waste": round(paged["waste"], 5),
        "static_waste": round(static["waste"], 5),
        "paged_peak_concurrency": paged["peak_concurrency"],
        "static_peak_concurrency": static["peak_concurrency"],
        "concurrency_ratio": round(paged["peak_concurrency"] / max(1, static["peak_concurrency"]), 3),
        "paged_steps": paged["steps"],
        "static_steps": static["steps"],
        "paged_preemptions": paged["preemptions"],
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
