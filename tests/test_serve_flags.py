"""`pagedfleet serve MODEL` with vLLM's flags, run as a user runs it (one command, JSON logs): the flags reach
the services (the gateway's /v1/models, the scheduler's /stats and /v1/workers), a "ready" line comes once
the gateway answers with a worker, each API request writes one access line (tokens and request id) and
health polls none, the scheduler prints its throughput line while busy, and Celery says nothing about
root. The API key travels in the environment: never in the generated files."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from fleet_harness import REPO, free_port

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

KEY = "sk-serve-flags-test"


class Serve:
    def __init__(self, tmp_path):
        self.port, self.sched_port, self.redis_port = free_port(), free_port(), free_port()
        self.state = tmp_path / "state"
        env = dict(os.environ, PYTHONPATH=str(REPO), PAGEDFLEET_STATS_LOG_INTERVAL_S="2")
        env.pop("REDIS_URL", None)
        cmd = [sys.executable, "-m", "pagedfleet.cli", "serve", "smollm2-135m-instruct",
               "--served-model-name", "tiny-x", "--max-num-seqs", "8", "--no-enable-prefix-caching",
               "--max-num-batched-tokens", "512", "--dtype", "float32", "--seed", "0", "--block-size", "16",
               "--max-model-len", "1024", "--gpu-memory-utilization", "0.9", "--tensor-parallel-size", "1",
               "--api-key", KEY, "--host", "127.0.0.1", "--port", str(self.port),
               "--scheduler-port", str(self.sched_port), "--worker-metrics-port", "0",
               "--redis-port", str(self.redis_port), "--num-gpu-blocks", "256", "--threads-per-worker", "1",
               "--state-dir", str(self.state), "--log-format", "json"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self.new.put(line)

    def wait_line(self, pred, timeout: float):
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if pred(line):
                return line
        while time.monotonic() < deadline:
            try:
                line = self.new.get(timeout=max(0.01, deadline - time.monotonic())).rstrip("\n")
            except queue.Empty:
                break
            if pred(line):
                return line
            if self.proc.poll() is not None and self.new.empty():
                break
        raise AssertionError("no such line; output:\n" + "\n".join(self.lines[-80:]))

    def records(self, program: str) -> list[dict]:
        """The JSON log records a program printed (through serve's `name | line` console)."""
        out = []
        for line in self.lines:
            name, sep, rest = line.partition(" | ")
            if sep and name.strip() == program and rest.startswith("{"):
                out.append(json.loads(rest))
        return out

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("serve-flags"))
    try:
        s.wait_line(lambda l: l.startswith("pagedfleet: ready:"), timeout=240)
        yield s
    finally:
        s.stop()


def test_flags_reach_the_services(serve):
    ready = serve.wait_line(lambda l: l.startswith("pagedfleet: ready:"), 1)
    assert f"http://127.0.0.1:{serve.port}/v1" in ready and "1 worker" in ready
    assert not any("gateway on http://" in l for l in serve.lines)  # the early banner is gone
    headers = {"Authorization": f"Bearer {KEY}"}
    models = httpx.get(f"http://127.0.0.1:{serve.port}/v1/models", headers=headers).json()["data"]
    assert [m["id"] for m in models] == ["tiny-x"] and models[0]["max_model_len"] == 1024
    sched = f"http://127.0.0.1:{serve.sched_port}"
    config = httpx.get(sched + "/stats").json()["config"]
    assert config["max_num_seqs"] == 8 and config["enable_prefix_caching"] is False
    assert config["max_num_batched_tokens"] == 512
    deadline = time.monotonic() + 30  # the scheduler's registry picks the worker up on its next check
    while not (workers := httpx.get(sched + "/v1/workers").json()["workers"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    (w,) = workers
    assert w["info"]["num_gpu_blocks"] == 256 and w["info"]["block_size"] == 16 and w["draining"] is False
    assert w["metrics_address"].startswith("127.0.0.1:")  # internal ports stay on loopback
    for name in ("Procfile", "supervisord.conf"):  # the key reached the gateway through its environment
        assert KEY not in (serve.state / name).read_text()


def test_access_lines_throughput_line_and_quiet_polls(serve):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve.port}/v1", api_key=KEY, max_retries=0, timeout=120)
    got = [client.chat.completions.create(model="tiny-x", messages=[{"role": "user", "content": f"Count to {i}"}],
                                          max_tokens=8, temperature=0) for i in (3, 4)]
    long = client.completions.create(model="tiny-x", prompt="Once upon a time", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 40
    serve.wait_line(lambda l: long.id in l and "pagedfleet.access" in l, timeout=10)
    access = [r for r in serve.records("gateway") if r["logger"] == "pagedfleet.access"]
    by_id = {r["request_id"]: r for r in access}
    for resp in got + [long]:
        r = by_id[resp.id]
        assert r["status"] == 200 and r["method"] == "POST" and r["latency_ms"] > 0
        assert (r["prompt_tokens"], r["output_tokens"]) == (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert by_id[long.id]["path"] == "/v1/completions"
    assert not [r for r in access if r["path"] in ("/health", "/metrics")]  # serve polled /health: not logged
    stats = serve.wait_line(lambda l: l.startswith("scheduler") and "generation_tps" in l, timeout=20)
    rec = json.loads(stats.partition(" | ")[2])
    assert "Avg generation throughput" in rec["msg"] and "GPU KV cache usage" in rec["msg"]
    assert {"prompt_tps", "generation_tps", "running", "waiting", "swapped"} <= set(rec)
    assert not any("superuser privileges" in l for l in serve.lines)  # Celery, when run as root


def _serve_procfile(*flags):
    return subprocess.run([sys.executable, "-m", "pagedfleet.cli", "serve", *flags, "--procfile"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)


def test_tensor_parallel_heads_that_do_not_divide_are_refused_clearly():
    r = _serve_procfile("--tensor-parallel-size", "2")  # SmolLM2: 9 query heads, 3 KV heads
    assert r.returncode == 2, r.stderr
    assert "num_attention_heads (9)" in r.stderr and "num_key_value_heads (3)" in r.stderr


def test_tensor_parallel_workers_get_a_group_of_gpus_each():
    r = _serve_procfile("--tensor-parallel-size", "3", "--workers", "2", "--device", "cuda")
    assert r.returncode == 0, r.stderr
    workers = [line for line in r.stdout.splitlines() if "gpu_worker.service" in line]
    assert len(workers) == 2
    assert "CUDA_VISIBLE_DEVICES=0,1,2 " in workers[0] and "CUDA_VISIBLE_DEVICES=3,4,5 " in workers[1]
    assert all("--tensor-parallel-size 3" in w for w in workers)
