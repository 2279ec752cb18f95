"""Where the GPU waits for the host in a pipelined 'mixed' run, step by step (a diagnostic, not a figure).

Every launch records a CUDA event before its first GPU work and one after its last; the gap between step
N's end and step N+1's start is time the GPU sat idle because the host had not queued step N+1 yet. For
the steps with the longest gaps it prints the host's own timeline around them (when the launch began and
ended, how long its phases took, when the engine waited for and applied earlier results), plus the CUDA
runtime calls of the run that took longest (cudaMalloc, cudaHostAlloc, synchronizations) from a second run
under torch.profiler with CPU activity, and the device and pinned-host allocators' counters over the run.

    python benchmarks/launch_stalls.py [--model random:llama-3-8b] [--max-num-batched-tokens 4096]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine import _engine, _free, _time_calls  # noqa: E402
from gpu_worker import launched_step, model_runner  # noqa: E402
from pagedfleet.bench.workloads import mixed  # noqa: E402
from protocol import SamplingParams  # noqa: E402

_now = time.perf_counter


class _HostEvent:
    """torch.cuda.Event's two methods on the host clock (a CPU run of this script checks its plumbing)."""

    def record(self) -> None:
        self.t = _now()

    def elapsed_time(self, other: "_HostEvent") -> float:
        return 1e3 * (other.t - self.t)


def _event():
    return torch.cuda.Event(enable_timing=True) if torch.cuda.is_available() else _HostEvent()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timeline:
    """Host timestamps of the engine's step loop and the launches' GPU events."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str, int]] = []  # (host s, what, step index)
        self.launches: list[dict] = []
        self.phase: dict[str, float] = {}  # the current launch's host seconds by wrapped call, cleared per launch
        self._undo: list = []

    def timed(self, obj, name: str) -> None:
        """Add the time of every ``obj.name(...)`` to the current launch's phases (until restore())."""
        self._undo.append(_time_calls(obj, name, self.phase))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def _instrument(eng, tl: Timeline) -> None:
    runner, sched = eng.runner, eng.scheduler
    launch = runner.launch

    def timed_launch(plan):
        tl.phase.clear()
        begin, end = _event(), _event()
        k = len(tl.launches)
        t0 = _now()
        tl.log.append((t0, "launch", k))
        begin.record()
        out = launch(plan)
        end.record()
        t1 = _now()
        tl.log.append((t1, "launched", k))
        tokens = sum(s.num_tokens for s in plan.scheduled)
        tl.launches.append({"k": k, "begin": begin, "end": end, "host_ms": round(1e3 * (t1 - t0), 2),
                            "tokens": tokens, "seqs": len(plan.scheduled), "new": len(plan.new_sequences),
                            "phases_ms": {p: round(1e3 * v, 2) for p, v in tl.phase.items()}})
        res = out.result

        def timed_result():
            tl.log.append((_now(), "wait", k))
            r = res()
            tl.log.append((_now(), "got", k))
            return r
        out.result = timed_result
        return out

    runner.launch = timed_launch
    tl.timed(runner.batch, "prepare")
    tl.timed(runner, "_forward")
    tl.timed(runner.model, "compute_logits")
    tl.timed(runner.sampler, "greedy_tokens")
    if runner.cuda_graphs is not None:
        tl.timed(runner.cuda_graphs, "forward")
    tl.timed(model_runner, "_h2d")
    tl.timed(launched_step.DeferredStep, "_start_copy")
    update = sched.update

    def timed_update(result):
        r = update(result)
        tl.log.append((_now(), "updated", -1))
        return r
    sched.update = timed_update


def _watch_gc(tl: Timeline):
    """Log every garbage collection with its generation and length (a host pause the GPU may wait through)."""
    started = {}

    def cb(phase, info):
        if phase == "start":
            started["t"] = _now()
        else:
            t = _now()
            tl.log.append((t, f"gc{info['generation']} {1e3 * (t - started.get('t', t)):.2f}ms", -1))
    gc.callbacks.append(cb)
    return cb


def _counters() -> dict:
    if not torch.cuda.is_available():
        return {}
    dev = torch.cuda.memory_stats()
    out = {k: dev.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")}
    host = getattr(torch.cuda, "host_memory_stats", None)
    if host is not None:
        h = host()
        out.update({f"host_{k}": v for k, v in h.items() if k in ("num_host_alloc", "num_host_free",
                    "host_alloc_time.total", "host_free_time.total")})
    return out


def _run(eng, work) -> float:
    for ids, sp in work:
        eng.add_request(list(ids), sp)
    t0 = _now()
    while eng.has_unfinished_requests():
        eng.step()
    _sync()
    return _now() - t0


def _engine_and_work(args):
    """The pipelined bf16 engine of gpu_engine.py's runs, warmed up by one short request, and 'mixed'."""
    eng = _engine(args.model, args.device, args.dtype, args.backend, pipeline=True, max_num_seqs=256,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=2048, gpu_memory_utilization=0.9)
    vocab = eng.runner.args.vocab_size
    work = [([t % vocab for t in r.prompt_token_ids], r.sampling) for r in mixed().requests[: args.num_requests]]
    eng.add_request(work[0][0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    eng.run_to_completion()
    _sync()
    return eng, work


def stalls(args) -> None:
    eng, work = _engine_and_work(args)
    tl = Timeline()
    _instrument(eng, tl)
    before = _counters()
    cb = _watch_gc(tl)
    wall = _run(eng, work)
    gc.callbacks.remove(cb)
    tl.restore()
    after = _counters()
    collections = [w for _, w, _ in tl.log if w.startswith("gc")]
    print(json.dumps({"part": "counters", "wall_s": round(wall, 3), "steps": len(tl.launches),
                      "gc": {g: sum(1 for w in collections if w.startswith(g)) for g in ("gc0", "gc1", "gc2")},
                      "gc_longest": sorted(collections, key=lambda w: -float(w.split()[1][:-2]))[:5],
                      "delta": {k: after[k] - before.get(k, 0) for k in after}, "after": after}), flush=True)
    L = tl.launches
    gaps = []
    for a, b in zip(L, L[1:]):
        gaps.append((a["end"].elapsed_time(b["begin"]), b["k"]))
    total = sum(g for g, _ in gaps)
    by_kind: dict[str, list] = {}
    for g, k in gaps:
        kind = "decode" if L[k]["tokens"] == L[k]["seqs"] else "prefill"
        prev = "decode" if L[k - 1]["tokens"] == L[k - 1]["seqs"] else "prefill"
        slot = by_kind.setdefault(f"{prev}->{kind}", [0, 0.0, 0.0])
        slot[0] += 1
        slot[1] += g
        slot[2] = max(slot[2], g)
    print(json.dumps({"part": "gaps", "steps": len(L), "gap_ms_total": round(total, 2),
                      "by_transition": {k: [n, round(t, 2), round(m, 2)] for k, (n, t, m) in by_kind.items()}}),
          flush=True)
    t_start = tl.log[0][0]
    for g, k in sorted(gaps, reverse=True)[: args.top]:
        lo, hi = L[k - 1]["host_ms"], L[k]
        around = [(round(1e3 * (t - t_start), 2), what, i) for t, what, i in tl.log if i in (k - 2, k - 1, k, -1)]
        mine = [e for e in around if e[2] in (k - 2, k - 1, k)]
        first = min(e[0] for e in mine)
        last = max(e[0] for e in mine)
        ctx = [e for e in around if first <= e[0] <= last]
        print(json.dumps({"part": "stall", "gap_ms": round(g, 2), "step": k, "prev_host_ms": lo,
                          "launch": {x: v for x, v in hi.items() if x not in ("begin", "end")},
                          "prev_launch": {x: v for x, v in L[k - 1].items() if x not in ("begin", "end")},
                          "host_log_ms": ctx}), flush=True)


def runtime_calls(args) -> None:
    """The same run under torch.profiler with CPU activity: the CUDA runtime calls that took longest."""
    eng, work = _engine_and_work(args)
    act = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[act.CPU, act.CUDA]) as prof:
        wall = _run(eng, work)
    rows = []
    for e in prof.key_averages():
        if e.key.startswith("cu") or "pin_memory" in e.key or "empty" in e.key:
            rows.append((e.key, e.count, round(e.cpu_time_total / 1e3, 2), round(e.cpu_time_total / max(e.count, 1), 1)))
    rows.sort(key=lambda r: -r[2])
    # the waits for each step's tokens (cudaEventSynchronize) are expected: the longest of the other calls
    longest = sorted(((round(e.cpu_time_range.elapsed_us() / 1e3, 2), e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cu")
                      and "Synchronize" not in e.name), reverse=True)[: args.top]
    print(json.dumps({"part": "runtime_calls", "wall_s": round(wall, 3),
                      "by_total_ms": rows[:20], "longest_ms": longest}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3-8b")
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--skip-profile", action="store_true")
    args = ap.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d %H:%M")}), flush=True)
    stalls(args)
    _free()  # once stalls() has returned: its frame held the engine, so a _free(eng) inside freed nothing
    if not args.skip_profile:
        runtime_calls(args)
        _free()


if __name__ == "__main__":
    main()
