"""Soak: N concurrent streaming clients for T minutes against a fleet; prints sent / completed / failed / lost
and each service's RSS (idle, after a minute of load, the quarters of the run, peak, end). Not a test: the lead runs the long form.

    python benchmarks/soak.py                         # starts a CPU fleet (2 workers), 500 streams, 10 min
    python benchmarks/soak.py --streams 100 --minutes 1
    python benchmarks/soak.py --url http://127.0.0.1:8000   # a running fleet; RSS of the local processes
                                                            # whose command line names a fleet service

Every client loops: a streaming completion (greedy, ``--max-tokens``) of one of a few prompts, checked
against the first output seen for that prompt. completed = finished with that text; failed = an error the
client saw (an HTTP error or an SSE error event); lost = a wrong text, or a stream still open ``--grace-s``
after the end (it hung). RSS is sampled every ``--sample-s`` seconds (psutil; a process and its children).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import psutil

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "The three primary colors are", "A haiku about the sea:", "Once upon a time,"]
SERVICES = {"redis": "redis-server", "scheduler": "scheduler.service", "gateway": "gateway.app",
            "worker": "gpu_worker.service", "housekeeping": "celery"}


class Counts:
    def __init__(self) -> None:
        self.sent = self.completed = self.failed = self.lost = 0
        self.open = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.want: dict[str, str] = {}


async def client_loop(client: openai.AsyncOpenAI, model: str, i: int, c: Counts, deadline: float,
                      max_tokens: int) -> None:
    n = i
    while time.monotonic() < deadline:
        prompt = PROMPTS[n % len(PROMPTS)]
        n += 1
        c.sent += 1
        c.open += 1
        try:
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0, stream=True)
            text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
        except openai.APIError as e:
            c.failed += 1
            c.errors[f"{type(e).__name__}: {str(e)[:80]}"] += 1
            await asyncio.sleep(0.5)
            continue
        finally:
            c.open -= 1
        want = c.want.setdefault(prompt, text)
        if text == want:
            c.completed += 1
        else:
            c.lost += 1
            c.errors[f"wrong text for {prompt!r}"] += 1


def service_processes(pids: dict[str, int] | None) -> dict[str, list[psutil.Process]]:
    """The fleet's processes by service: the given root pids, else every local process whose command line
    names a service."""
    found: dict[str, list[psutil.Process]] = collections.defaultdict(list)
    if pids:
        for name, pid in pids.items():
            try:
                found[name].append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        return found
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for name, needle in SERVICES.items():
            if needle in cmd and "soak.py" not in cmd:
                found[name].append(p)
                break
    return found


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss + sum(ch.memory_info().rss for ch in p.children(recursive=True))
        except psutil.Error:
            pass
    return total / 2**20


async def sample_rss(procs: dict[str, list[psutil.Process]], every_s: float, stop: asyncio.Event,
                     series: dict[str, list[tuple[float, float]]], t0: float) -> None:
    """(seconds since the load started, RSS MB) per service, every ``every_s``."""
    while not stop.is_set():
        for name, ps in procs.items():
            series[name].append((time.monotonic() - t0, rss_mb(ps)))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass
    for name, ps in procs.items():
        series[name].append((time.monotonic() - t0, rss_mb(ps)))


async def soak(url: str, model: str, streams: int, minutes: float, max_tokens: int, grace_s: float,
               sample_s: float, pids: dict[str, int] | None, warm_s: float = 60.0) -> Counts:
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams),
                             timeout=httpx.Timeout(120.0, connect=10.0))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http)
    c = Counts()
    procs = service_processes(pids)
    series: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    stop = asyncio.Event()
    # warm-up: one request per prompt fixes the reference outputs; RSS "start" is taken after it
    for p in PROMPTS:
        r = await client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0)
        c.want[p] = r.choices[0].text
    t0 = time.monotonic()
    sampler = asyncio.create_task(sample_rss(procs, sample_s, stop, series, t0))
    deadline = t0 + minutes * 60
    tasks = [asyncio.create_task(client_loop(client, model, i, c, deadline, max_tokens)) for i in range(streams)]
    reporter = asyncio.create_task(report_progress(c, t0))
    done, pending = await asyncio.wait(tasks, timeout=minutes * 60 + grace_s)
    for t in pending:
        t.cancel()
    c.lost += c.open  # still open after the grace period: hung
    reporter.cancel()
    stop.set()
    await sampler
    await http.aclose()
    print_report(c, series, time.monotonic() - t0, streams, min(warm_s, minutes * 60 / 4))
    return c


async def report_progress(c: Counts, t0: float) -> None:
    while True:
        await asyncio.sleep(15)
        print(f"  {time.monotonic() - t0:6.0f} s: sent {c.sent} completed {c.completed} failed {c.failed} "
              f"lost {c.lost} open {c.open}", flush=True)


def print_report(c: Counts, series: dict[str, list[tuple[float, float]]], elapsed: float, streams: int,
                 warm_s: float) -> None:
    """RSS 'start' is the first sample after ``warm_s`` of full load (the batch, the allocators' pools and
    the output streams have grown to their working size); then the quarters of the run, peak and end."""
    print(f"soak: {streams} streams, {elapsed:.0f} s: sent {c.sent}, completed {c.completed}, failed {c.failed}, "
          f"lost {c.lost} ({c.completed / elapsed:.1f} completions/s)")
    for err, n in c.errors.most_common(5):
        print(f"  {n} x {err}")
    print(f"RSS MB: 'idle' after the one-request warm-up, 'start' after {warm_s:.0f} s of load")
    print(f"{'service':<14}{'idle':>8}{'start':>8}{'25%':>8}{'50%':>8}{'75%':>8}{'peak':>8}{'end':>8}")
    for name, vals in sorted(series.items()):
        if not vals:
            continue
        end_t = vals[-1][0]

        def at(t: float) -> float:
            return next((v for ts, v in vals if ts >= t), vals[-1][1])

        row = [vals[0][1], at(warm_s)] + [at(warm_s + q * (end_t - warm_s)) for q in (0.25, 0.5, 0.75)]
        row += [max(v for _, v in vals), vals[-1][1]]
        print(f"{name:<14}" + "".join(f"{v:>8.0f}" for v in row))


def start_fleet(workers: int, num_gpu_blocks: int, output_ttl_s: int | None = None):
    sys.path.insert(0, str(REPO / "tests"))
    from fleet_harness import Fleet  # the harness the fleet tests use: real processes, logs in a temp dir

    fleet = Fleet(Path(tempfile.mkdtemp(prefix="pagedfleet-soak-")), num_workers=workers,
                  num_gpu_blocks=num_gpu_blocks, max_model_len=512,
                  scheduler_args=["--output-ttl-s", str(output_ttl_s)] if output_ttl_s else [])
    pids = {name: p.pid for name, p in fleet.procs.items()}
    pids["redis"] = fleet.redis.proc.pid
    return fleet, pids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running fleet's gateway (default: start a CPU fleet)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--grace-s", type=float, default=120.0, help="how long open streams may run past the end")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2, help="workers of the fleet it starts")
    p.add_argument("--num-gpu-blocks", type=int, default=2048, help="KV blocks per worker of the fleet it starts")
    p.add_argument("--output-ttl-s", type=int, default=None,
                   help="the fleet's output stream TTL (default 600 s: Redis grows for that long, then levels)")
    a = p.parse_args(argv)
    fleet = pids = None
    url = a.url
    if url is None:
        fleet, pids = start_fleet(a.workers, a.num_gpu_blocks, a.output_ttl_s)
        url = fleet.url
    try:
        c = asyncio.run(soak(url, a.model, a.streams, a.minutes, a.max_tokens, a.grace_s, a.sample_s, pids))
    finally:
        if fleet is not None:
            fleet.close()
    return 1 if c.lost else 0


if __name__ == "__main__":
    sys.exit(main())
