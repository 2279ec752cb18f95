"""One ModelRunner step on a GPU, taken apart: decode-only steps with and without CUDA graphs, the GPU time
of the forward alone, the kernels of an eager decode step and of a prefill step, for each KV cache dtype.

    python benchmarks/step_profile.py [--model random:llama-3-8b] [--batch 256] [--ctx 640] [--kv auto fp8]

No scheduler: B sequences are registered with ctx - 1 tokens already "cached" (the KV cache is filled
with random values first: never time on zeros) and decoded for --steps steps. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from gpu_worker import ModelRunner, WorkerConfig
from protocol import NewSequence, SamplingParams, ScheduledSequence, StepPlan


def _fill_random(kv: torch.Tensor) -> None:
    g = torch.Generator(device=kv.device)
    g.manual_seed(0)
    for layer in range(kv.shape[0]):
        x = torch.randn(kv[layer].shape, dtype=torch.bfloat16, device=kv.device, generator=g)
        kv[layer].copy_(x.mul_(0.5))
        del x


def _cpu_table(prof, top: int = 10) -> list[dict]:
    rows = [{"op": e.key[:60], "calls": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1)}
            for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["self_cpu_us"])
    return rows[:top]


def fused_check() -> dict:
    """The fused elementwise kernels against float64 references on the GPU (fresh random inputs)."""
    import kernels

    res = {"part": "fused_check"}
    g = torch.Generator(device="cuda").manual_seed(1)
    for dtype in (torch.bfloat16, torch.float32):
        T, nq, nkv, D, H, I = 300, 32, 8, 128, 4096, 14336
        qkv = torch.randn((T, (nq + 2 * nkv) * D), device="cuda", generator=g).to(dtype)
        qk = qkv[:, : (nq + nkv) * D].view(T, nq + nkv, D)
        cs = torch.randn((T, D), device="cuda", generator=g).to(dtype)
        cos, sin = cs[:, None, : D // 2], cs[:, None, D // 2:]
        x = torch.randn((T, 2 * I), device="cuda", generator=g).to(dtype)
        h, r = torch.randn((2, T, H), device="cuda", generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).to(dtype)

        def err(a, b):
            return float((a.double() - b.double()).norm() / b.double().norm())

        out, s_ = kernels.add_rms_norm(h, r, w, 1e-5)
        ref_out, _ = kernels.add_rms_norm_ref(h.double(), r.double(), w.double(), 1e-5)
        name = str(dtype).split(".")[-1]
        res[name] = {
            "rotary": err(kernels.rotary(qk, cos, sin), kernels.rotary_ref(qk.double(), cos.double(), sin.double())),
            "silu_and_mul": err(kernels.silu_and_mul(x), kernels.silu_and_mul_ref(x.double())),
            "add_rms_norm": err(out, ref_out), "residual_bitwise": bool(torch.equal(s_, h + r)),
            "torch_rotary_err": err(kernels.rotary_ref(qk, cos, sin),
                                    kernels.rotary_ref(qk.double(), cos.double(), sin.double())),
        }
    return res


def _kernel_table(prof, top: int = 14) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if t and e.key and not e.key.startswith(("ProfilerStep", "aten::", "cuda")):
            rows.append({"kernel": e.key[:90], "calls": e.count, "us": round(t, 1)})
    rows.sort(key=lambda r: -r["us"])
    return rows[:top]


def profile(model: str, kv_dtype: str, batch: int, ctx: int, steps: int, prefill_tokens: int,
            min_blocks: int = 0) -> list[dict]:
    bs = 16
    nb_seq = -(-(ctx + 2 * steps + 16) // bs)
    n_pre = 8
    pre_len = prefill_tokens // n_pre
    nb_pre = -(-pre_len // bs)
    num_blocks = max(batch * nb_seq + n_pre * nb_pre + 8, min_blocks)
    t0 = time.perf_counter()
    r = ModelRunner(WorkerConfig(model=model, device="cuda", dtype="bfloat16", kv_cache_dtype=kv_dtype,
                                 num_gpu_blocks=num_blocks, num_cpu_blocks=0, max_model_len=2048,
                                 max_num_seqs=batch, cuda_graph_batch_sizes=(batch,)))
    init_s = time.perf_counter() - t0
    _fill_random(r.kv_cache)
    rng = random.Random(0)
    greedy = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    news, sched = [], []
    for i in range(batch):
        toks = [rng.randrange(1, 30000) for _ in range(ctx)]
        news.append(NewSequence(seq_id=i, request_id=f"r{i}", prompt_len=ctx, token_ids=toks,
                                num_computed_tokens=ctx - 1, block_table=list(range(i * nb_seq, (i + 1) * nb_seq)),
                                sampling=greedy, seed=i))
        sched.append(ScheduledSequence(seq_id=i, num_tokens=1))
    step_id = 0

    def step(plan_news=()):
        nonlocal step_id
        step_id += 1
        return r.execute(StepPlan(step_id=step_id, new_sequences=list(plan_news), scheduled=sched))

    out = []
    graphs = r.cuda_graphs
    # GPU time of the forward alone: events around each replay
    ev = []
    if graphs is not None:
        g, _ = graphs.graphs[batch]
        orig = g.replay

        def timed_replay():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            orig()
            b.record()
            ev.append((a, b))

        g.replay = timed_replay
    step(news)  # first step registers the sequences
    for mode in (["graph", "eager"] if graphs is not None else ["eager"]):
        r.cuda_graphs = graphs if mode == "graph" else None
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        ev.clear()
        ts = []
        for _ in range(steps):
            t = time.perf_counter()
            step()  # execute ends with the sampled tokens on the host (a sync)
            ts.append(time.perf_counter() - t)
        ts.sort()
        rec = {"part": "decode_step", "kv_cache_dtype": kv_dtype, "mode": mode, "batch": batch, "ctx": ctx,
               "num_gpu_blocks": num_blocks,
               "median_ms": round(1e3 * ts[len(ts) // 2], 3), "min_ms": round(1e3 * ts[0], 3)}
        if ev:
            torch.cuda.synchronize()
            fw = sorted(a.elapsed_time(b) for a, b in ev)
            rec["forward_gpu_ms"] = round(fw[len(fw) // 2], 3)
        out.append(rec)
        print(json.dumps(rec), flush=True)
    r.cuda_graphs = None
    from torch.profiler import ProfilerActivity, profile as tprof

    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    rec = {"part": "decode_kernels_2_steps", "kv_cache_dtype": kv_dtype, "num_gpu_blocks": num_blocks,
           "kernels": _kernel_table(prof), "cpu_ops": _cpu_table(prof)}
    out.append(rec)
    print(json.dumps(rec), flush=True)
    # a prefill step: n_pre new prompts of pre_len tokens in one flat batch (no decodes)
    base = batch * nb_seq
    pre = []
    for j in range(n_pre):
        toks = [rng.randrange(1, 30000) for _ in range(pre_len)]
        pre.append(NewSequence(seq_id=10_000 + j, request_id=f"p{j}", prompt_len=pre_len, token_ids=toks,
                               block_table=list(range(base + j * nb_pre, base + (j + 1) * nb_pre)),
                               sampling=greedy, seed=j))
    psched = [ScheduledSequence(seq_id=10_000 + j, num_tokens=pre_len) for j in range(n_pre)]

    def prefill_step(k):
        nonlocal step_id
        step_id += 1
        free = [10_000 + j for j in range(n_pre)] if k else []
        return r.execute(StepPlan(step_id=step_id, freed_seq_ids=free, new_sequences=pre, scheduled=psched))

    from gpu_worker.layers import _fused

    prefill_step(0)
    torch.cuda.synchronize()
    k = 1
    unfused = []
    saved = _fused._ops
    _fused._ops = False  # the torch compositions, for comparison
    for _ in range(3):
        t = time.perf_counter()
        prefill_step(k)
        k += 1
        unfused.append(time.perf_counter() - t)
    _fused._ops = saved
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        prefill_step(k)
        k += 1
        ts.append(time.perf_counter() - t)
    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill_step(k)
        torch.cuda.synchronize()
    rec = {"part": "prefill_step", "kv_cache_dtype": kv_dtype, "tokens": n_pre * pre_len,
           "median_ms": round(1e3 * sorted(ts)[1], 2), "median_ms_unfused": round(1e3 * sorted(unfused)[1], 2),
           "fused_kernels": bool(saved), "kernels": _kernel_table(prof, 10),
           "init_s": round(init_s, 1),
           "graph_capture_s": None if graphs is None else round(graphs.capture_s, 2),
           "graph_memory_mib": None if graphs is None else round(graphs.memory_bytes / 2**20)}
    out.append(rec)
    print(json.dumps(rec), flush=True)
    del r
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=640)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--kv", nargs="+", default=["auto", "fp8"])
    ap.add_argument("--min-blocks", type=int, nargs="+", default=[0],
                    help="KV cache sizes (blocks) to run each dtype with (0: just what the run needs)")
    a = ap.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d")}), flush=True)
    print(json.dumps(fused_check()), flush=True)
    for kv in a.kv:
        for nb in a.min_blocks:
            profile(a.model, kv, a.batch, a.ctx, a.steps, a.prefill_tokens, nb)


if __name__ == "__main__":
    main()
