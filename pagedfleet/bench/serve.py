"""`pagedfleet bench serve`: a serving benchmark against a running gateway, in the manner of `vllm bench serve`.

Sends ``--num-prompts`` streaming ``/v1/completions`` requests, at ``--request-rate`` requests per second
with Poisson arrivals (exponential gaps, ``--seed``), or all at once (``inf``), at most ``--max-concurrency``
at a time. Prompts are random token ids (``--input-len``, varied by ``--range-ratio``) or, with
``--prompt-text``, that text; outputs are ``--output-len`` tokens with ``ignore_eos`` (so every request
generates exactly that many, varied by ``--range-ratio``). Prints, and writes to ``--result-file``, one
JSON object: request and output-token throughput, TTFT (time to the first token), TPOT (time per output
token after the first) and ITL (the gaps between streamed chunks), each as mean / median / p99 in ms.

    pagedfleet bench serve --base-url http://127.0.0.1:8000 --num-prompts 64 --request-rate 8 \\
        --input-len 512 --output-len 256 --result-file serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def make_requests(args: argparse.Namespace, vocab_size: int) -> list[tuple[str | list[int], int]]:
    """(prompt, max_tokens) per request: random token ids (or the fixed text) and lengths."""
    rng = random.Random(args.seed)

    def length(n: int) -> int:
        lo, hi = max(1, int(n * (1 - args.range_ratio))), max(1, int(n * (1 + args.range_ratio)))
        return rng.randint(lo, hi)

    out = []
    for _ in range(args.num_prompts):
        prompt = args.prompt_text if args.prompt_text else [rng.randrange(10, vocab_size) for _ in
                                                            range(length(args.input_len))]
        out.append((prompt, length(args.output_len)))
    return out


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, prompt, max_tokens: int) -> RequestResult:
    body = {"model": args.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(prompt_len=len(prompt) if isinstance(prompt, list) else 0)
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.prompt_len = chunk["usage"]["prompt_tokens"]
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - t0
    res.ok = res.ttft > 0.0
    if not res.ok:
        res.error = "no tokens streamed"
    return res


async def run(args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_prompts)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout, limits=limits,
                                 headers=headers) as client:
        if args.model is None:
            models = (await client.get("/v1/models")).json()["data"]
            args.model = models[0]["id"]
        reqs = make_requests(args, args.vocab_size)
        gate = asyncio.Semaphore(args.max_concurrency or len(reqs))
        rng = np.random.default_rng(args.seed)

        async def limited(prompt, max_tokens):
            async with gate:
                return await one_request(client, args, prompt, max_tokens)

        tasks = []
        t0 = time.perf_counter()
        for prompt, max_tokens in reqs:
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return summarize(args, reqs, results, duration)


def _stats(name: str, values_s: list[float]) -> dict:
    ms = np.array(values_s, dtype=float) * 1e3
    if ms.size == 0:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"p99_{name}_ms": 0.0}
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"p99_{name}_ms": float(np.percentile(ms, 99))}


def summarize(args: argparse.Namespace, reqs, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "base_url": args.base_url, "model": args.model, "num_prompts": len(reqs),
        "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
        "max_concurrency": args.max_concurrency, "input_len": args.input_len, "output_len": args.output_len,
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": sum(r.prompt_len for r in ok), "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "output_tokens_per_request": [r.output_tokens for r in results],
        "requested_output_tokens": [m for _, m in reqs],
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    summary |= _stats("ttft", [r.ttft for r in ok]) | _stats("tpot", tpot)
    summary |= _stats("itl", [x for r in ok for x in r.itl]) | _stats("e2el", [r.latency for r in ok])
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pagedfleet bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the gateway")
    p.add_argument("--model", default=None, help="default: the gateway's first model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--input-len", type=int, default=512, help="random prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request (ignore_eos)")
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len * [1 - r, 1 + r]")
    p.add_argument("--prompt-text", default=None, help="a fixed text prompt instead of random token ids")
    p.add_argument("--vocab-size", type=int, default=32000, help="random token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--result-file", default=None, help="also write the JSON here")
    p.add_argument("--json", action="store_true", help="(accepted: the output is JSON)")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1 or not 0 <= args.range_ratio < 1:
        p.error("--num-prompts, --input-len and --output-len must be >= 1 and --range-ratio in [0, 1)")
    if args.request_rate <= 0:
        p.error("--request-rate must be > 0 (inf: all at once)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.result_file:
        with open(args.result_file, "w") as f:
            f.write(text + "\n")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
