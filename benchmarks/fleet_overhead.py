"""Fleet overhead: the same requests (workload cpu32 or mixed) through the fleet vs the offline engine.

    .venv/bin/python benchmarks/fleet_overhead.py [--threads 1] [--workers 1] [--repeat 2] [--save]
    python benchmarks/fleet_overhead.py --device cuda --model random:llama-3-8b --workload mixed \
        --max-num-batched-tokens 4096 --repeat 1          # on a GPU: 256 requests, KV cache sized by the worker

Offline: `LLMEngine` (scheduler + model runner in one process) runs the 32 requests with continuous
batching. Fleet: real processes (redis-server, scheduler service, `--workers` CPU workers, gateway), the
32 requests sent at once to the gateway's /v1/completions (token-id prompts, greedy, ignore_eos), timed
from the first send to the last response. Both use the same torch thread count per model runner, and
the same KV cache size (on CUDA with no --num-gpu-blocks, each sizes its own at gpu_memory_utilization 0.9).
On CUDA the two cannot share the GPU: the fleet runs first (all repeats), is shut down, then the offline
engine (in this process) runs. Throughput = generated tokens / wall seconds. Prints one JSON object; --save
also writes it under benchmarks/results/ with the date, the machine and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the process launcher the fleet tests use
sys.path.insert(0, str(REPO / "benchmarks"))  # limit.py

NUM_GPU_BLOCKS = 1024  # CPU default
MAX_MODEL_LEN = 2048
DEFAULT_SERVED_NAME = "smollm2-135m-instruct"


class Offline:
    def __init__(self, threads: int, a=None):
        import torch

        from pagedfleet.engine import EngineConfig, LLMEngine
        from protocol import SamplingParams

        torch.set_num_threads(threads)
        self.SamplingParams = SamplingParams
        kw = {}
        if a is not None:
            kw = dict(model=a.model, device=a.device, num_gpu_blocks=a.num_gpu_blocks, max_num_seqs=a.max_num_seqs,
                      max_num_batched_tokens=a.max_num_batched_tokens, quantization=a.quantization,
                      kv_cache_dtype=a.kv_cache_dtype, pipeline=a.pipeline, lookahead=getattr(a, "lookahead", 1))
        else:
            kw = dict(num_gpu_blocks=NUM_GPU_BLOCKS)
        self.engine = LLMEngine(EngineConfig(max_model_len=MAX_MODEL_LEN, **kw))
        self.num_gpu_blocks = self.engine.worker_info.num_gpu_blocks
        self.execute_s = 0.0
        runner = self.engine.runner
        inner = runner.launch  # execute() goes through launch() too

        def timed(plan):  # the model's own time, to tell load from other processes apart from overhead
            t = time.perf_counter()
            try:
                step = inner(plan)
            finally:
                self.execute_s += time.perf_counter() - t
            result = step.result

            def timed_result():  # a launched step's wait for its tokens
                t = time.perf_counter()
                try:
                    return result()
                finally:
                    self.execute_s += time.perf_counter() - t

            step.result = timed_result
            return step

        runner.launch = timed

    def run(self, reqs) -> dict:
        sp = self.SamplingParams
        engine = self.engine
        engine.add_request(reqs[0][0], sp(temperature=0, max_tokens=2, ignore_eos=True))
        engine.run_to_completion()  # warm-up
        _sync()
        steps0 = engine.scheduler.stats()["num_steps"]
        self.execute_s = 0.0
        t0 = time.perf_counter()
        for ids, out_len in reqs:
            engine.add_request(ids, sp(temperature=0, max_tokens=out_len, ignore_eos=True))
        outs = engine.run_to_completion()
        _sync()
        wall = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"tokens": tokens, "s": round(wall, 3), "tok_s": round(tokens / wall, 1),
                "steps": engine.scheduler.stats()["num_steps"] - steps0, "execute_s": round(self.execute_s, 3),
                "overhead_share": round(1 - self.execute_s / wall, 4)}


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


async def _send_all(url: str, reqs, name: str = DEFAULT_SERVED_NAME) -> tuple[int, float, list]:
    import httpx

    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=len(reqs) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        # warm-up (not timed)
        r = await c.post("/v1/completions", json={"model": name, "prompt": reqs[0][0],
                                                  "max_tokens": 2, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()

        async def one(ids, n):
            r = await c.post("/v1/completions", json={"model": name, "prompt": ids,
                                                      "max_tokens": n, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return r.json()

        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(ids, n) for ids, n in reqs))
        wall = time.perf_counter() - t0
    return sum(x["usage"]["completion_tokens"] for x in res), wall, res


def start_fleet(threads: int, workers: int, workdir: Path, a=None):
    """``a``: the parsed options (model, device, num_gpu_blocks, max_num_seqs, max_num_batched_tokens); None: the
    CPU defaults (the embedded model, 1024 blocks)."""
    from fleet_harness import Fleet

    model = getattr(a, "model", None)
    device = getattr(a, "device", "cpu")
    blocks = getattr(a, "num_gpu_blocks", NUM_GPU_BLOCKS)
    name = served_name(model)
    sched_args = [] if a is None else ["--max-num-seqs", str(a.max_num_seqs),
                                       "--max-num-batched-tokens", str(a.max_num_batched_tokens)]

    class BenchFleet(Fleet):
        @staticmethod
        def _model_dir():
            return Fleet._model_dir() if model is None else ""

        def start_worker(self, i: int):
            cmd = [sys.executable, "-m", "gpu_worker.service", "--worker-id", f"worker{i}", "--device", device,
                   "--threads", str(threads), "--max-model-len", str(MAX_MODEL_LEN),
                   "--metrics-port", "0", "--log-level", "WARNING"]
            if blocks is not None:
                cmd += ["--num-gpu-blocks", str(blocks)]
            if model is not None:
                cmd += ["--model", model]
            if a is not None and a.quantization:
                cmd += ["--quantization", a.quantization]
            if a is not None and a.kv_cache_dtype != "auto":
                cmd += ["--kv-cache-dtype", a.kv_cache_dtype]
            return self.start(f"worker{i}", cmd)

        def start_gateway(self, name_: str = "gateway", port: int | None = None):
            if model is None:
                return super().start_gateway(name_, port)
            port = port or self.gateway_port
            tok_dir = getattr(a, "tokenizer_dir", None)  # a tokenizer for random weights (text to stream)
            return self.start(name_, [sys.executable, "-m", "gateway.app", "--host", "127.0.0.1", "--port", str(port),
                                      "--served-model-name", name, "--model", model]
                              + (["--model-dir", str(Path(tok_dir).resolve())] if tok_dir else []) + self.gateway_args)

    return BenchFleet(workdir, num_workers=workers, num_gpu_blocks=blocks or 0, max_model_len=MAX_MODEL_LEN,
                      gateway_args=["--processes", str(getattr(a, "gateway_processes", 1))],
                      scheduler_args=sched_args + (["--pipeline", f"--pipeline-lookahead={getattr(a, 'lookahead', 1)}"]
                                                   if getattr(a, "pipeline", False) else ["--no-pipeline"]),
                      env={"PAGEDFLEET_HEARTBEAT_INTERVAL_S": "0.5", "PAGEDFLEET_HEARTBEAT_TTL_S": "10",
                           # keep this process's extra import path (e.g. carried wheels) for the fleet's processes
                           "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)})


def fresh_prompts(reqs, k: int, vocab: int):
    """Repeat k's requests: each prompt's first token moved by k, so that no repeat finds an earlier one's
    blocks in the prefix cache (a repeat of the same prompts skipped most of their prefill)."""
    return reqs if k == 0 else [([(ids[0] + k) % vocab] + list(ids[1:]), n) for ids, n in reqs]


def served_name(model: str | None) -> str:
    return DEFAULT_SERVED_NAME if model is None else model


def _phase_sums(f) -> dict[str, float]:
    """Sums of the scheduler's pagedfleet_step_phase_seconds (schedule / transport / execute / update)."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f.scheduler_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("pagedfleet_step_phase_seconds_sum{"):
            phase = line.split('phase="', 1)[1].split('"', 1)[0]
            out[phase] = out.get(phase, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_fleet(f, reqs, name: str = DEFAULT_SERVED_NAME) -> dict:
    import httpx

    # warm-up outside the timed part (first request of a fresh gateway / worker)
    httpx.post(f.url + "/v1/completions", timeout=300,
               json={"model": name, "prompt": reqs[0][0], "max_tokens": 2, "temperature": 0}).raise_for_status()
    before = f.stats()["workers"]
    p0 = _phase_sums(f)
    tokens, wall, _ = asyncio.run(_send_all(f.url, reqs, name))
    p1 = _phase_sums(f)
    after = f.stats()["workers"]
    steps = sum(after[w]["num_steps"] - before.get(w, {}).get("num_steps", 0) for w in after)
    phases = {k: round(p1.get(k, 0.0) - p0.get(k, 0.0), 3) for k in p1}
    # execute time summed over workers; with one worker it is the model's share of the wall time
    return {"tokens": tokens, "s": round(wall, 3), "tok_s": round(tokens / wall, 1), "steps": steps,
            "phases_s": phases, "overhead_share": round(1 - phases.get("execute", 0.0) / wall, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/fleet_overhead.py")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model runner")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved offline / fleet runs; the best of each counts")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--gateway-processes", type=int, default=1, help="the gateway's --processes")
    ap.add_argument("--save", action="store_true", help="write the JSON under benchmarks/results/")
    ap.add_argument("--workdir", default="/tmp/pagedfleet-fleet-bench")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="resolve_model spec (default: the embedded SmolLM2-135M), "
                                                  "e.g. random:llama-3-8b")
    ap.add_argument("--workload", default="cpu32", choices=["cpu32", "mixed"])
    ap.add_argument("--num-requests", type=int, default=None, help="only the first N requests of the workload")
    ap.add_argument("--num-gpu-blocks", type=int, default=None,
                    help="KV cache blocks of each model runner (default: 1024 on CPU, sized by the worker on CUDA)")
    ap.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 decoder weights (both sides)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="both sides")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--pipeline", action="store_true",
                    help="both sides plan the next step while one runs (pipelined scheduling)")
    ap.add_argument("--lookahead", type=int, default=1, help="plans made ahead when pipelined (both sides)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--sequential", action="store_true",
                    help="all fleet runs, then all offline runs (always so on CUDA)")
    args = ap.parse_args(argv)
    if args.num_gpu_blocks is None and args.device == "cpu":
        args.num_gpu_blocks = NUM_GPU_BLOCKS

    from pagedfleet.bench.workloads import get_workload
    from model_io.model_files import resolve_model

    wl = get_workload(args.workload)
    vocab = int(resolve_model(args.model).config["vocab_size"])
    wl_reqs = wl.requests[: args.num_requests] if args.num_requests else wl.requests
    # token ids beyond a small (random:tiny) model's vocabulary wrap around; a no-op for vocabularies >= 49152
    reqs = [([t % vocab for t in r.prompt_token_ids], r.sampling.max_tokens) for r in wl_reqs]
    name = served_name(args.model)
    runs = []
    limits: dict = {}  # on CUDA: the ceilings and the roofline of the run (benchmarks/limit.py)
    device_name = "cpu"
    if args.device == "cuda" or args.sequential:
        # one GPU: the fleet's worker and the offline engine can't both hold a KV cache sized at 0.9 of it.
        # The fleet first (this process touches no CUDA meanwhile), then the offline engine.
        f = start_fleet(args.threads, args.workers, Path(args.workdir), args)
        fleet_runs = []
        try:
            blocks_fleet = {w["worker_id"]: w["info"]["num_gpu_blocks"] for w in f.workers()}
            for k in range(args.repeat):
                fleet_runs.append(run_fleet(f, fresh_prompts(reqs, k, vocab), name))
                print(json.dumps({"fleet": fleet_runs[-1]}), file=sys.stderr, flush=True)
        except BaseException:
            f.dump_logs()
            raise
        finally:
            f.close()
        ceil = rec = None
        if args.device == "cuda":
            import torch

            from limit import StepRecorder, ceilings

            device_name = torch.cuda.get_device_name()
            ceil = ceilings()  # before the engine takes 0.9 of the memory
        off = Offline(args.threads, args)
        if ceil is not None:
            rec = StepRecorder(off.engine.runner)
        for k, fl in enumerate(fleet_runs):
            if rec is not None:
                rec.reset()
            o = off.run(fresh_prompts(reqs, k, vocab))
            runs.append({"offline": o, "fleet": fl})
            print(json.dumps({"offline": o}), file=sys.stderr, flush=True)
        if rec is not None:  # the roofline of the offline run's schedule (the fleet's is the same workload)
            from limit import limit, model_costs

            lim = limit(rec.steps, model_costs(off.engine.runner), ceil, runs[-1]["offline"]["tokens"])
            limits = {**ceil, **lim}
        blocks = {"fleet": blocks_fleet, "offline": off.num_gpu_blocks}
    else:
        off = Offline(args.threads, args)
        f = start_fleet(args.threads, args.workers, Path(args.workdir), args)
        try:
            for k in range(args.repeat):  # interleaved, so load from other processes hits both alike
                o = off.run(fresh_prompts(reqs, k, vocab))
                fl = run_fleet(f, fresh_prompts(reqs, k, vocab), name)
                runs.append({"offline": o, "fleet": fl})
                print(json.dumps(runs[-1]), file=sys.stderr)
        finally:
            f.close()
        blocks = args.num_gpu_blocks
    best_off = max((r["offline"] for r in runs), key=lambda x: x["tok_s"])
    best_fl = max((r["fleet"] for r in runs), key=lambda x: x["tok_s"])
    result = {
        "benchmark": "fleet_overhead",
        "workload": args.workload,
        "model": args.model or DEFAULT_SERVED_NAME,
        "device": device_name,
        "num_gpu_blocks": blocks,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "requests": len(reqs),
        "generated_tokens": best_off["tokens"],
        "threads_per_runner": args.threads,
        "fleet_workers": args.workers,
        "gateway_processes": args.gateway_processes,
        "runs": runs,
        "offline_best": best_off,
        "fleet_best": best_fl,
        "fleet_vs_offline": round(best_fl["tok_s"] / best_off["tok_s"], 3),
        "limit": limits,
        "fleet_fraction_of_limit": round(best_fl["tok_s"] / limits["limit_output_tok_s"], 3) if limits else None,
        "offline_fraction_of_limit": round(best_off["tok_s"] / limits["limit_output_tok_s"], 3) if limits else None,
        "fleet_vs_offline_per_run": [round(r["fleet"]["tok_s"] / r["offline"]["tok_s"], 3) for r in runs],
        # the same ratio with each side's model time (runner.execute) factored out: what the fleet's own
        # overhead costs when both models run equally fast (robust to other jobs on a shared machine)
        "fleet_vs_offline_compute_normalized": [
            round((1 - r["fleet"]["overhead_share"]) / (1 - r["offline"]["overhead_share"]), 3) for r in runs]
        if args.workers == 1 else None,
        "target": 0.85 if args.device == "cpu" else "7000 output tok/s through the fleet",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus"
                   + (", shared with other jobs" if args.device == "cpu" else ""),
        "python": platform.python_version(),
        "command": " ".join([".venv/bin/python", "benchmarks/fleet_overhead.py"]
                            + (argv if argv is not None else sys.argv[1:])),
    }
    for r in runs:
        assert r["fleet"]["tokens"] == r["offline"]["tokens"] == sum(n for _, n in reqs), r
    print(json.dumps(result, indent=1))
    if args.save:
        out = REPO / "benchmarks" / "results" / f"fleet_overhead_{dt.date.today().isoformat()}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"saved {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
