"""One line per throughput run of a suite call's JSON lines: settings, tok/s, fraction of the limit, idle.

    python3 benchmarks/ab_summary.py $OUT/engine.jsonl $OUT/profile.jsonl ...
"""
import json
import sys

for path in sys.argv[1:]:
    for line in open(path, errors="replace"):
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("part") == "throughput":
            gp = d.get("gpu_profile") or {}
            print(path.rsplit("/", 1)[-1], d["run"], d.get("decode_balance") or d.get("ab_settings") or "", "tokens", d.get("max_num_batched_tokens"),
                  "warm-up", d.get("warm_up_kernels"),
                  "graphs", d.get("graph_sizes"), "tok/s", d["output_tok_s"], "frac", d.get("fraction_of_limit"),
                  "limit", d.get("limit_output_tok_s"), "steps", d["steps"],
                  "busy", gp.get("gpu_busy_s"), "idle", gp.get("gpu_idle_s"), "kinds", gp.get("by_kind_s"))
            if gp.get("idle"):
                print("  idle", json.dumps(gp["idle"])[:3000])
        elif d.get("part") in ("mixed_decode_gemm_s", "ceilings", "prefill_row_chunks"):
            print(path.rsplit("/", 1)[-1], json.dumps(d)[:400])
