"""A real redis-server with the fleet's own durable options (``pagedfleet.serve.redis_server_args``) on a
free port, that tests can SIGKILL and restart on the same data directory, or SIGSTOP / SIGCONT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DurableRedis:
    def __init__(self, data_dir: Path, appendfsync: str = "everysec"):
        self.data_dir, self.appendfsync = data_dir, appendfsync
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        data_dir.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self, timeout: float = 20.0) -> None:
        from pagedfleet.serve import redis_server_args

        log = open(self.data_dir / "redis.log", "ab")
        self.proc = subprocess.Popen(redis_server_args(self.port, self.data_dir, self.appendfsync),
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        r = redis.Redis.from_url(self.url, socket_timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    r.ping()  # answers only once the append-only file is loaded (LOADING before)
                    return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError("redis-server did not start")
                    time.sleep(0.02)
        finally:
            r.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def client(self, **kw) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, **kw)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
