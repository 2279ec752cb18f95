"""CPU cost of the scheduler per step: schedule() + update() with N running decode sequences (no model).

Admits N requests (prompt --prompt-len tokens), runs until all of them decode, then times
``schedule()`` and ``update()`` (the dummy worker's time is not counted) over --steps steps and prints
one JSON line with the median / p99 / mean / min wall-clock milliseconds (and the median thread CPU time,
which other processes on a shared host disturb less).

    python -m pagedfleet.bench.scheduler_cost [--num-seqs 256] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from protocol.messages import GenerationRequest, WorkerInfo
from protocol.sampling import SamplingParams
from pagedfleet.bench.workloads import VOCAB_SIZE, DummyWorker
from scheduler import Scheduler, SchedulerConfig


def measure(num_seqs: int = 256, prompt_len: int = 128, steps: int = 300, block_size: int = 16,
            enable_prefix_caching: bool = True) -> dict:
    max_len = 4096
    need = num_seqs * ((prompt_len + steps + 64) // block_size + 2)
    info = WorkerInfo(worker_id="bench", model="none", block_size=block_size, num_gpu_blocks=need,
                      max_model_len=max_len, vocab_size=VOCAB_SIZE)
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=max(2048, num_seqs),
                                      enable_prefix_caching=enable_prefix_caching), info)
    for i in range(num_seqs):
        prompt = [(i * 7919 + j) % VOCAB_SIZE for j in range(prompt_len)]
        sched.add_request(GenerationRequest(request_id=f"r{i}", prompt_token_ids=prompt,
                                            sampling=SamplingParams(max_tokens=max_len - prompt_len - 1,
                                                                    ignore_eos=True)))
    worker = DummyWorker()
    # warm up: admit and prefill everything
    for _ in range(10_000):
        plan = sched.schedule()
        sched.update(worker.execute(plan))
        if len(plan.scheduled) == num_seqs and all(e.num_tokens == 1 for e in plan.scheduled):
            break
    sched_ms, upd_ms, total, cpu = [], [], [], []
    clock, cpu_clock = time.perf_counter, time.thread_time
    for _ in range(steps):
        c0 = cpu_clock()
        t0 = clock()
        plan = sched.schedule()
        t1 = clock()
        c1 = cpu_clock()
        result = worker.execute(plan)
        c2 = cpu_clock()
        t2 = clock()
        deltas = sched.update(result)
        t3 = clock()
        c3 = cpu_clock()
        assert len(plan.scheduled) == num_seqs and len(deltas) == num_seqs
        sched_ms.append((t1 - t0) * 1e3)
        upd_ms.append((t3 - t2) * 1e3)
        total.append(((t1 - t0) + (t3 - t2)) * 1e3)
        cpu.append(((c1 - c0) + (c3 - c2)) * 1e3)

    def p99(xs):
        return sorted(xs)[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]

    return {
        "bench": "scheduler_cost",
        "num_running_seqs": num_seqs,
        "steps": steps,
        "median_ms": round(statistics.median(total), 4),
        "p99_ms": round(p99(total), 4),
        "mean_ms": round(statistics.fmean(total), 4),
        "min_ms": round(min(total), 4),
        "cpu_median_ms": round(statistics.median(cpu), 4),  # CPU time of this thread: robust on a busy host
        "schedule_median_ms": round(statistics.median(sched_ms), 4),
        "update_median_ms": round(statistics.median(upd_ms), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedfleet bench scheduler-cost", description=__doc__.splitlines()[0])
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--json", action="store_true", help="(output is always one JSON line)")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.num_seqs, a.prompt_len, a.steps, a.block_size, not a.no_prefix_caching)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
