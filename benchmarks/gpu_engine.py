"""The engine on a GPU: the Triton backend against the torch backend, then throughput on workload 'mixed'.

1. Correctness: random weights of a named shape (default Llama-3-8B), float32, a short greedy run with
   each attention backend: the tokens must be identical and the top-5 logprobs close.
2. Throughput: workload 'mixed' (256 requests, pagedfleet.bench.workloads) through the offline engine
   with the Triton backend in bfloat16 (CUDA graphs for decode steps unless --no-cuda-graphs); prints
   output tokens/s and the host-side time per step of schedule / execute / update / the rest.

    python benchmarks/gpu_engine.py [--model random:llama-3-8b] [--device cuda] [--skip-throughput]
                                    [--fp8] [--no-cuda-graphs] [--compare-graphs]
Prints one JSON line per part.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # limit.py, grammar_bench.py beside this file
from limit import StepRecorder, ceilings, fraction, limit, model_costs  # noqa: E402
from gpu_worker.cuda_graphs import default_graph_sizes  # noqa: E402
from protocol import SamplingParams  # noqa: E402
from pagedfleet.engine import EngineConfig, LLMEngine  # noqa: E402


def _engine(model, device, dtype, backend, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, device=device, dtype=dtype, attention_backend=backend, **kw))


def _free(engine=None) -> None:
    """Release the GPU memory of engines no longer referenced (cycles included) before the next part. The
    engine froze the GC heap at init (EngineConfig.freeze_gc): unfreeze so dead cycles can be collected."""
    del engine
    gc.unfreeze()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def correctness(model: str, device: str, dtype: str, num_blocks: int) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 500) for _ in range(n)] for n in (1, 17, 100, 333)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)
    runs = {}
    for backend in ("torch", "triton"):
        eng = _engine(model, device, dtype, backend, num_gpu_blocks=num_blocks, max_model_len=2048,
                      max_num_batched_tokens=256, max_num_seqs=64)
        for p in prompts:
            eng.add_request(p, params)
        outs = sorted(eng.run_to_completion(), key=lambda o: int(o.request_id.split("-")[1]))
        runs[backend] = [o.outputs[0] for o in outs]
        eng = None
        _free()
    same = all(a.token_ids == b.token_ids for a, b in zip(runs["torch"], runs["triton"]))
    diffs = []
    for a, b in zip(runs["torch"], runs["triton"]):
        for ta, tb in zip(a.top_logprobs, b.top_logprobs):
            da = {x.token_id: x.logprob for x in ta}
            diffs += [abs(da[x.token_id] - x.logprob) for x in tb if x.token_id in da]
    return {"part": "correctness", "model": model, "dtype": dtype, "tokens_identical": same,
            "max_logprob_diff": max(diffs) if diffs else None,
            "tokens_torch": [c.token_ids for c in runs["torch"]], "tokens_triton": [c.token_ids for c in runs["triton"]]}


def _time_calls(obj, name: str, acc: dict):
    """Accumulate the wall time of obj.name(...) into acc[name] (host-side breakdown of a step); ``obj`` may be
    an instance, a class or a module. Returns the undo (the wrapper makes a reference cycle)."""
    f = getattr(obj, name)
    own = obj.__dict__.get(name)  # None: a class's method, shadowed by an instance attribute
    acc.setdefault(name, 0.0)

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return f(*a, **kw)
        finally:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, name, timed)

    def undo() -> None:
        if own is None:
            delattr(obj, name)
        else:
            setattr(obj, name, own)
    return undo


def _with_schema(eng, reqs, tokenizer_json: str):
    """Every request of the workload constrained by the 30-field JSON schema (benchmarks/grammar_bench.py),
    greedy, stopping at the schema's end (EOS) or max_tokens. The grammar engine gets the tokenizer the
    model's vocabulary was sized for (random weights come with none)."""
    from grammar_bench import schema_30_fields
    from model_io.grammar import GrammarCompiler
    from protocol.sampling import StructuredOutput

    runner = eng.runner
    runner._grammars = GrammarCompiler(Path(tokenizer_json).read_text(), runner.args.vocab_size,
                                       runner.files.eos_token_ids)
    so = StructuredOutput.of_json_schema(schema_30_fields())
    return [(r.prompt_token_ids, SamplingParams(temperature=0, max_tokens=r.sampling.max_tokens, structured_output=so))
            for r in reqs]


def throughput(model: str, device: str, dtype: str, kv_cache_dtype: str, max_num_seqs: int,
               cuda_graphs: bool = True, quantization: str | None = None, pipeline: bool = False,
               schema_tokenizer: str | None = None, num_requests: int | None = None, ceil: dict | None = None,
               max_model_len: int = 2048, profile: bool = False, lookahead: int = 1,
               max_num_batched_tokens: int = 4096, graph_sizes: tuple[int, ...] | None = None,
               warm_up_kernels: bool | None = None) -> dict:
    from pagedfleet.bench.workloads import mixed

    t_init = time.perf_counter()
    backend = "triton" if device.startswith("cuda") else "torch"
    eng = _engine(model, device, dtype, backend, kv_cache_dtype=kv_cache_dtype, quantization=quantization,
                  max_model_len=max_model_len, pipeline=pipeline, lookahead=lookahead,
                  max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                  gpu_memory_utilization=0.9,
                  extra_worker={"enable_cuda_graphs": cuda_graphs, "cuda_graph_batch_sizes": graph_sizes,
                                "warm_up_kernels": warm_up_kernels})
    init_s = time.perf_counter() - t_init
    graphs = eng.runner.cuda_graphs
    reqs = mixed().requests[:num_requests]
    vocab = eng.runner.args.vocab_size
    work = [([t % vocab for t in r.prompt_token_ids], r.sampling) for r in reqs]
    if schema_tokenizer:
        work = _with_schema(eng, reqs, schema_tokenizer)
    eng.add_request(work[0][0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    if schema_tokenizer:  # and the grammar engine's first masks
        eng.add_request(work[1][0], SamplingParams(temperature=0, max_tokens=4, structured_output=work[1][1].structured_output))
    eng.run_to_completion()  # warm-up: Triton compiles
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    acc: dict = {}
    undo = [_time_calls(obj, name, acc) for obj, name in
            ((eng.scheduler, "schedule"), (eng.scheduler, "update"), (eng.runner, "execute"))]
    replays0 = sum(getattr(g, "calls", 0) for g in graphs.graphs.values()) if graphs else 0
    decode_steps = 0
    _run = eng.runner._run

    def count_run(plan):
        nonlocal decode_steps
        if all(s.num_tokens == 1 for s in plan.scheduled):
            decode_steps += 1
        return _run(plan)

    eng.runner._run = count_run
    rec = StepRecorder(eng.runner)
    prof = _profiler() if profile else None
    t0 = time.perf_counter()
    for ids, sp in work:
        eng.add_request(list(ids), sp)
    steps = 0
    done = []
    first = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.request_id not in first and o.outputs[0].token_ids:
                first[o.request_id] = time.perf_counter()
            if o.finished:
                done.append(o)
        steps += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
    out_tokens = sum(len(c.token_ids) for o in done for c in o.outputs)
    stats = eng.scheduler.stats()
    rec.close()
    res = {"part": "throughput", "workload": "mixed", "model": model, "dtype": dtype, "pipeline": pipeline,
           "max_num_batched_tokens": max_num_batched_tokens, "warm_up_kernels": warm_up_kernels,
           "graph_sizes": graph_sizes and f"{len(graph_sizes)}: {graph_sizes[:6]}...",
           "lookahead": lookahead if pipeline else 0,
           "schema": bool(schema_tokenizer), "finish_reasons": _finish_counts(done),
           "kv_cache_dtype": kv_cache_dtype, "quantization": quantization, "requests": len(done),
           "output_tokens": out_tokens,
           "seconds": round(dt, 2), "output_tok_s": round(out_tokens / dt, 1),
           "total_tok_s": round((out_tokens + sum(len(r.prompt_token_ids) for r in reqs)) / dt, 1),
           "steps": steps, "ms_per_step": round(1000 * dt / steps, 2),
           "num_gpu_blocks": eng.worker_info.num_gpu_blocks,
           "preemptions": {k: v for k, v in stats.items() if "preempt" in k},
           "cuda_graphs": graphs is not None, "decode_only_steps": decode_steps,
           "graph_capture_s": round(graphs.capture_s, 2) if graphs else None,
           "graph_memory_mib": round(graphs.memory_bytes / 2**20) if graphs else None,
           "engine_init_s": round(init_s, 1),
           # host wall time per step (execute includes waiting for the GPU: the sampled tokens are a sync)
           "ms_per_step_schedule": round(1000 * acc["schedule"] / steps, 3),
           "ms_per_step_execute": round(1000 * acc["execute"] / steps, 3),
           "ms_per_step_update": round(1000 * acc["update"] / steps, 3),
           "ms_per_step_rest": round(1000 * (dt - acc["schedule"] - acc["execute"] - acc["update"]) / steps, 3)}
    if prof is not None:
        res["gpu_profile"] = _kernel_summary(prof, dt)
    if ceil:
        lim = limit(rec.steps, model_costs(eng.runner), ceil, out_tokens)
        res.update(lim, fraction_of_limit=fraction(res["output_tok_s"], lim))
    for u in undo:
        u()  # drop the wrappers (they make reference cycles)
    del eng.runner._run
    return res  # the caller frees the engine (_free)


def _profiler():
    """torch.profiler over the timed loop, GPU kernels only (CUPTI sees the kernels inside graph replays)."""
    act = torch.profiler.ProfilerActivity
    prof = torch.profiler.profile(activities=[act.CUDA] if torch.cuda.is_available() else [act.CPU])
    prof.__enter__()
    return prof


_KERNEL_KINDS = (("attention_decode", ("paged_decode", "decode_attn", "_decode")),
                 ("attention_prefill", ("prefill", "unified_attention")),
                 ("gemm", ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet", "matmul", "fp8")),
                 ("kv_write", ("reshape_and_cache", "rotary_and_cache")), ("sampling", ("argmax", "softmax", "topk", "sort")))


def _kernel_summary(prof, wall_s: float) -> dict:
    """GPU kernel time of the run by kind and the top kernels; idle = wall - busy (one stream)."""
    rows = [(e.key, e.device_time_total / 1e6, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    busy = sum(t for _, t, _ in rows)
    kinds: dict[str, float] = {}
    for name, t, _ in rows:
        low = name.lower()
        kind = next((k for k, pats in _KERNEL_KINDS if any(p in low for p in pats)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + t
    top = sorted(rows, key=lambda r: -r[1])[:15]
    return {"wall_s": round(wall_s, 3), "gpu_busy_s": round(busy, 3), "gpu_idle_s": round(wall_s - busy, 3),
            "by_kind_s": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels": [[n[:90], round(t, 4), c] for n, t, c in top], "idle": _idle_gaps(prof)}


def _idle_gaps(prof, top: int = 8) -> dict:
    """Where the GPU waits: the gaps between consecutive kernels on the timeline, by size and by the kernels
    either side (the kernel after a gap is what the host launched late)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    sizes = {"<10us": [0, 0.0], "10-100us": [0, 0.0], "0.1-1ms": [0, 0.0], ">1ms": [0, 0.0]}
    after: dict[str, list] = {}
    before: dict[str, list] = {}
    longest: list[tuple] = []  # (gap s, offset from the first kernel s, kernel before, kernel after)
    end, prev = None, ""
    for s, e, name in spans:
        if end is not None and s > end:
            gap = (s - end) / 1e6
            size = "<10us" if gap < 1e-5 else "10-100us" if gap < 1e-4 else "0.1-1ms" if gap < 1e-3 else ">1ms"
            for d, key in ((sizes, size), (after, name[:60]), (before, prev[:60])):
                slot = d.setdefault(key, [0, 0.0])
                slot[0] += 1
                slot[1] += gap
            if gap >= 1e-4:
                longest.append((round(gap * 1e3, 2), round((s - spans[0][0]) / 1e6, 3), prev[:40], name[:40]))
        if end is None or e > end:
            end, prev = e, name

    def rank(d):
        return [[k, n, round(t, 4)] for k, (n, t) in sorted(d.items(), key=lambda kv: -kv[1][1])[:top]]
    return {"by_size": {k: [n, round(t, 4)] for k, (n, t) in sizes.items()},
            "by_kernel_after": rank(after), "by_kernel_before": rank(before),
            "longest_ms_at_s": sorted(longest, reverse=True)[:24]}


def _finish_counts(done) -> dict:
    out: dict = {}
    for o in done:
        for c in o.outputs:
            k = str(getattr(c.finish_reason, "value", c.finish_reason))
            out[k] = out.get(k, 0) + 1
    return out


RUNS = {  # --runs names: (kv cache dtype, weight quantization, pipelined, model, JSON schema on every request)
    "bf16": ("auto", None, False, "model", False), "fp8kv": ("fp8", None, False, "model", False),
    "fp8": ("fp8", "fp8", False, "model", False), "bf16-pipeline": ("auto", None, True, "model", False),
    "fp8-pipeline": ("fp8", "fp8", True, "model", False),
    # the schema's cost: the same model (--schema-model) with and without a schema on every request
    "schema": ("auto", None, False, "schema_model", True), "no-schema": ("auto", None, False, "schema_model", False),
    "schema-pipeline": ("auto", None, True, "schema_model", True),
    "no-schema-pipeline": ("auto", None, True, "schema_model", False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check-dtype", default="float32")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-blocks", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--fp8", action="store_true", help="also run the throughput part with an FP8 KV cache")
    ap.add_argument("--quantization", default=None, choices=["fp8"],
                    help="the throughput runs with FP8 decoder weights (gpu_worker/layers/linear.py)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="decode steps run eagerly")
    ap.add_argument("--compare-graphs", action="store_true",
                    help="also run the bf16 throughput part with CUDA graphs off")
    ap.add_argument("--runs", default=None,
                    help=f"comma-separated throughput runs instead of the flags above, of {sorted(RUNS)} "
                         "(schema: --schema-model with a JSON schema on every request, --schema-tokenizer)")
    ap.add_argument("--schema-model", default="random:llama-3-8b-49k")
    ap.add_argument("--schema-tokenizer", default=".dev/smoltok/tokenizer.json",
                    help="tokenizer.json the grammar engine uses (SmolLM2's: its vocabulary is the model's)")
    ap.add_argument("--num-requests", type=int, default=None, help="only the first N requests of 'mixed'")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--no-limit", action="store_true", help="skip measuring the ceilings (CPU runs)")
    ap.add_argument("--lookahead", type=int, default=1, help="plans made ahead in the pipelined runs")
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--graph-step", type=int, default=None,
                    help="CUDA graphs at 1, 2, 4, 8 then every N up to max_num_seqs (default: the worker's)")
    ap.add_argument("--no-kernel-warm-up", action="store_true",
                    help="skip the worker's start-up kernel warm-up (gpu_worker/warmup.py): its A/B")
    ap.add_argument("--profile", action="store_true",
                    help="the --runs under torch.profiler: GPU kernel time by kind, GPU idle time, top kernels")
    a = ap.parse_args()
    info = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(info), flush=True)
    if not a.skip_correctness:
        print(json.dumps(correctness(a.model, a.device, a.check_dtype, a.num_blocks)), flush=True)
        _free()
    ceil = None
    if not a.no_limit and a.device.startswith("cuda"):
        ceil = ceilings(a.device)
        print(json.dumps({"part": "ceilings", **ceil}), flush=True)
    graph_sizes = tuple(default_graph_sizes(a.max_num_seqs, a.graph_step)) if a.graph_step else None
    if a.runs:
        for name in a.runs.split(","):
            kv, quant, pipe, model_opt, schema = RUNS[name]
            model = getattr(a, model_opt)
            r = throughput(model, a.device, a.dtype, kv, a.max_num_seqs, not a.no_cuda_graphs, quant, pipe,
                           a.schema_tokenizer if schema else None, a.num_requests, ceil, a.max_model_len,
                           a.profile, a.lookahead, a.max_num_batched_tokens, graph_sizes,
                           False if a.no_kernel_warm_up else None)
            print(json.dumps({"run": name, **r}), flush=True)
            _free()
        return
    if not a.skip_throughput:
        graphs = not a.no_cuda_graphs
        runs = [("auto", graphs)] + ([("fp8", graphs)] if a.fp8 else [])
        if a.compare_graphs and graphs:
            runs += [("auto", False)] + ([("fp8", False)] if a.fp8 else [])
        for kv, g in runs:
            print(json.dumps(throughput(a.model, a.device, a.dtype, kv, a.max_num_seqs, g, a.quantization,
                                        ceil=ceil, num_requests=a.num_requests)), flush=True)
            _free()


if __name__ == "__main__":
    main()
