"""The `pagedfleet` command: generate offline, serve the fleet, run benchmarks."""

from __future__ import annotations

import argparse
import json
import sys


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: float32 on the CPU, bfloat16 on CUDA; bfloat16 is ~2x faster on a "
                        "CPU with AVX-512 BF16 or AMX, not token-identical to float32)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-gpu-blocks", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--quantization", default=None, choices=["none", "fp8"],
                   help="fp8: decoder weights in float8_e4m3fn, activations quantized per token (Hopper FP8 "
                        "tensor cores; on the CPU only a check of the numbers)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks of the worker's tensor-parallel group (this process + N-1 spawned; gloo on the CPU, "
                        "NCCL on CUDA)")
    p.add_argument("--pipeline", action="store_true",
                   help="plan the next step while one runs (default: one step at a time)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from protocol import SamplingParams
    from pagedfleet.llm import LLM

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, n=args.n, seed=args.seed,
            top_p=args.top_p,
        )
    except ValidationError as e:
        err = e.errors()[0]
        print(f"error: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    try:
        llm = LLM(
            args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
            enable_prefix_caching=not args.no_prefix_caching, tensor_parallel_size=args.tensor_parallel_size,
            pipeline=args.pipeline,
        )
    except ValueError as e:  # e.g. heads that the tensor-parallel size does not divide
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.chat:
            outs = llm.chat([{"role": "user", "content": args.prompt}], params)
        else:
            outs = llm.generate(args.prompt, params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for out in outs:
        for comp in out.outputs:
            if args.json:
                print(json.dumps({"index": comp.index, "text": comp.text, "token_ids": comp.token_ids,
                                  "finish_reason": comp.finish_reason}))
            else:
                print(comp.text)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = {
        "kv-waste": "pagedfleet.bench.kv_waste",
        "scheduler-cost": "pagedfleet.bench.scheduler_cost",
        "cpu-throughput": "pagedfleet.bench.cpu_throughput",
        "serve": "pagedfleet.bench.serve",
    }[args.name]
    return importlib.import_module(module).main(args.rest) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt offline (no Redis, no services)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per completion, one per line")
    _add_engine_arguments(g)
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("serve", help="run the whole fleet: redis, scheduler, workers, gateway")
    try:
        from pagedfleet.serve import add_serve_arguments, serve_main

        add_serve_arguments(s)
        s.set_defaults(func=serve_main)
    except ImportError as e:  # pragma: no cover - only while the fleet is being built
        s.set_defaults(func=lambda a, e=e: (print(f"serve unavailable: {e}", file=sys.stderr), 1)[1])

    b = sub.add_parser("bench", help="benchmarks that print JSON")
    b.add_argument("name", choices=["kv-waste", "scheduler-cost", "cpu-throughput", "serve"],
                   help="serve: a streaming load against a running gateway (pagedfleet/bench/serve.py)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_cmd_bench)

    args = parser.parse_args(argv)
    if args.command == "bench" and "--json" in sys.argv[1:] and "--json" not in args.rest:
        args.rest.append("--json")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
