"""Decode probe: the engine on workload 'mixed' (Llama-3-8B shape, Triton, CUDA) prefilled until all 256
requests decode, then the median wall time of 15 decode steps and a cProfile of 15 more.

    python benchmarks/decode_probe.py fp8|auto [num_gpu_blocks]

Used on the previous engine (commit e83de68 unpacked with `git archive` and put first on PYTHONPATH) for
benchmarks/results/probe-old-engine-h100.log; it only uses the engine's public API."""
import cProfile, io, pstats, sys, time
import torch
from protocol import SamplingParams
from pagedfleet.engine import EngineConfig, LLMEngine
from pagedfleet.bench.workloads import mixed
kv = sys.argv[1]
nb = int(sys.argv[2]) if len(sys.argv) > 2 else None
eng = LLMEngine(EngineConfig(model="random:llama-3-8b", device="cuda", dtype="bfloat16", attention_backend="triton",
                             kv_cache_dtype=kv, max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=4096,
                             gpu_memory_utilization=0.9, num_gpu_blocks=nb))
print("blocks", eng.worker_info.num_gpu_blocks, flush=True)
for r in mixed().requests:
    eng.add_request(list(r.prompt_token_ids), r.sampling)
s = eng.scheduler
while not (len(s.running) == 256 and all(g.live[0].num_computed_tokens == len(g.live[0].token_ids) - 1 for g in s.running)):
    eng.step()
torch.cuda.synchronize()
ts = []
for _ in range(15):
    t = time.perf_counter(); eng.step(); ts.append(time.perf_counter() - t)
print(kv, "decode ms/step (batch 256): median", round(1e3 * sorted(ts)[7], 2), flush=True)
pr = cProfile.Profile(); pr.enable()
for _ in range(15):
    eng.step()
pr.disable()
o = io.StringIO(); pstats.Stats(pr, stream=o).sort_stats("tottime").print_stats(18); print(o.getvalue()[:5000])
