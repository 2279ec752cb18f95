"""The GPU worker service: `python -m gpu_worker.service --device cpu|cuda --model ... --gpu-memory-utilization ...`

Settings: ``WorkerSettings`` (gpu_worker/settings.py): environment ``PAGEDFLEET_*`` and the same names as flags.

Builds a ModelRunner, registers its WorkerInfo in Redis (``pf:workers``), heartbeats from a thread
(``pf:hb:{worker_id}``, a key with a TTL holding this start's incarnation), then reads StepPlans from
its plan stream (consumer group ``worker``), launches them in order and answers StepResults on the
results stream from a publishing thread (gpu_worker/publisher.py: the next plan runs on the GPU while the
result before it goes out). A plan is acknowledged in the same Redis transaction that publishes its result.
Prometheus metrics are served on their own port (``--metrics-port``; 0 picks a free one), advertised as
``--advertise-host`` (``auto``: this machine's / container's address on the network that reaches Redis).
Each step reports its execute time and the time of its KV transfers (swap out, swap in, copy-on-write).
SIGTERM drains (gpu_worker/drain.py): no new requests, the running ones finish (or are handed back), then exit.

Redis outages are ridden out (clients from ``protocol.redis_conn``; each call in ``retry_forever_sync``):
the worker keeps its sequences and its incarnation, recreates its consumer group if Redis came back
without it, and re-reads its own pending plans when idle (a plan whose XREADGROUP reply was lost on a
dead connection is still pending on this consumer). A StepResult published twice (a retried transaction
whose reply was lost) is harmless: the scheduler matches results to its step in flight by step id.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid

import redis

from protocol import StepPlan, StepResult
from protocol import streams as S
from gpu_worker.drain import Drain
from gpu_worker.publisher import ResultPublisher
from gpu_worker.settings import WorkerSettings
from protocol.heap import freeze_heap
from protocol.redis_conn import Outage, retry_forever_sync, sync_client

log = logging.getLogger("pagedfleet.worker")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def resolve_advertise_host(value: str | None, redis_url: str | None = None) -> str:
    """The host to advertise for this worker's /metrics. ``auto`` (or empty): the local address of the route
    to Redis (in a container: its IP on the compose network), else the address of the hostname, else
    127.0.0.1. Anything else is returned as given."""
    if value and value.strip().lower() != "auto":
        return value.strip()
    try:
        u = urllib.parse.urlsplit(redis_url or "")
        if u.hostname and u.scheme in ("redis", "rediss"):
            for family, _t, _p, _c, addr in socket.getaddrinfo(u.hostname, u.port or 6379, type=socket.SOCK_DGRAM):
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.connect(addr)  # UDP: no packet is sent, the kernel only picks the route and source address
                    ip = s.getsockname()[0]
                if ip and ip not in ("0.0.0.0", "::"):
                    return ip
    except OSError:
        pass
    try:
        ip = socket.gethostbyname(socket.gethostname())
        if ip:
            return ip
    except OSError:
        pass
    return "127.0.0.1"


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


PLAN_BLOCK_MS = 500  # a plan read blocks this long; when it returns nothing the worker checks its pending plans


def wait_for_redis(url: str, stop: threading.Event | None = None) -> redis.Redis:
    r = sync_client(url, decode_responses=True, max_block_ms=PLAN_BLOCK_MS)
    retry_forever_sync(r.ping, what="connect", log=log, stop_event=stop)
    return r


class WorkerService:
    def __init__(self, args: WorkerSettings):
        self.args = args
        self.draining = False  # set by Drain: the registration says so and placement skips this worker
        self.worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.stop = threading.Event()
        self.r = wait_for_redis(args.redis_url, self.stop)
        self.hb_r = sync_client(args.redis_url, decode_responses=True)
        self.reregister = threading.Event()
        self.metrics_url: str | None = None
        self.incarnation = uuid.uuid4().hex
        self.runner = None
        self.metrics = None
        self._steps = 0
        self._last_step = -1  # wire step id of the last plan run (the scheduler's ids only grow)
        self.plan_stream = S.plan_stream(self.worker_id)
        self.publisher = ResultPublisher(self._publish, self.worker_id, self.unregister, self._observe_step)

    # ---- setup --------------------------------------------------------------------------------
    def build_runner(self):
        from gpu_worker import WorkerConfig
        from gpu_worker.tp_group import start_runner

        a = self.args
        kw = dict(model=a.model, device=a.device, gpu_memory_utilization=a.gpu_memory_utilization,
                  block_size=a.block_size)
        for name in ("dtype", "num_gpu_blocks", "num_cpu_blocks", "kv_cache_dtype", "quantization",
                     "attention_backend", "max_model_len", "seed", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(a, name)
            if v is not None:
                kw[name] = v
        if a.device == "cpu" and a.threads:
            kw["num_threads"] = a.threads
        kw["tensor_parallel_size"] = a.tensor_parallel_size
        self.runner = start_runner(WorkerConfig(**kw), worker_id=self.worker_id, on_rank_exit=self._rank_exited)
        return self.runner

    def _rank_exited(self, rank: int, exitcode: int | None) -> None:
        """A rank of our tensor-parallel group died: the group cannot compute any more. Unregister (the
        scheduler declares us dead now and resumes our requests elsewhere) and exit (a supervisor restarts us)."""
        log.error("tensor-parallel rank %d exited (code %s): unregistering and exiting", rank, exitcode)
        self.unregister()
        os._exit(1)

    def start_metrics(self) -> str | None:
        port = self.args.worker_metrics_port or _free_port()
        host = resolve_advertise_host(self.args.advertise_host, self.args.redis_url)
        try:
            from gpu_worker.metrics import WorkerMetrics

            self.metrics = WorkerMetrics(self.runner.info)
            self.metrics.start_metrics_server(port, addr=self.args.worker_metrics_host)
            self._instrument_runner()
        except Exception as e:  # pragma: no cover - metrics must never stop a worker
            log.warning("metrics server not started: %s", e)
            return None
        log.info("metrics at http://%s/metrics", host_port(host, port))
        return host_port(host, port)

    def _instrument_runner(self) -> None:
        """KV cache size once; the runner times each step's batched swap / copy-on-write transfers."""
        run, m = self.runner, self.metrics
        kv, cpu, tp = run.kv_cache, run.cpu_cache, run.info.tensor_parallel_size  # every rank holds as much
        m.set_kv_cache(gpu_bytes=kv.numel() * kv.element_size() * tp,
                       cpu_bytes=cpu.numel() * cpu.element_size() * tp,
                       num_gpu_blocks=run.info.num_gpu_blocks, num_cpu_blocks=run.info.num_cpu_blocks,
                       block_bytes=run.info.kv_block_bytes)
        run.measure_transfers = True

    def _device_memory(self) -> None:
        if self.metrics is None or not str(self.runner.info.device).startswith("cuda"):
            return
        import torch

        dev = self.runner.device
        self.metrics.set_device_memory(torch.cuda.memory_allocated(dev), torch.cuda.get_device_properties(dev).total_memory)

    def registration(self, metrics_url: str | None) -> S.WorkerRegistration:
        return S.WorkerRegistration(info=self.runner.info, incarnation=self.incarnation, metrics_url=metrics_url,
                                    host=socket.gethostname(), pid=os.getpid(), draining=self.draining)

    def register(self, metrics_url: str | None) -> None:
        self.metrics_url = metrics_url
        reg = self.registration(metrics_url)
        self._reg_json = reg.model_dump_json()

        def write() -> None:
            p = self.r.pipeline(transaction=True)
            p.delete(self.plan_stream)  # plans of an earlier start are meaningless now
            p.xgroup_create(self.plan_stream, S.WORKER_GROUP, id="0", mkstream=True)
            p.set(S.heartbeat_key(self.worker_id), self.incarnation, px=int(self.args.heartbeat_ttl_s * 1000))
            p.hset(S.WORKERS, self.worker_id, self._reg_json)
            p.execute()

        retry_forever_sync(write, what="register", log=log, stop_event=self.stop)
        log.info("worker %s registered (incarnation %s, %d GPU blocks)", self.worker_id, self.incarnation,
                 self.runner.info.num_gpu_blocks)

    # ---- heartbeat ----------------------------------------------------------------------------
    def heartbeat_loop(self) -> None:
        ttl_ms = int(self.args.heartbeat_ttl_s * 1000)
        key = S.heartbeat_key(self.worker_id)
        outage = Outage("heartbeat", log, base_s=0.0, max_delay_s=0.0)  # logs once per outage
        while not self.stop.wait(self.args.heartbeat_interval_s):
            if self.reregister.is_set():
                continue  # the main loop is starting a new incarnation
            try:
                cur = self.hb_r.hget(S.WORKERS, self.worker_id)
                if cur != self._reg_json:
                    if cur is not None and S.WorkerRegistration.model_validate_json(cur).pid != os.getpid():
                        log.error("worker id %s was taken by another process; stopping", self.worker_id)
                        self.stop.set()
                        return
                    # the scheduler declared us dead (missed heartbeats) and moved our requests away:
                    # drop every sequence and register again as a new incarnation
                    log.error("worker %s was declared dead by the scheduler; registering again", self.worker_id)
                    self.reregister.set()
                    continue
                self.hb_r.set(key, self.incarnation, px=ttl_ms)
                outage.succeeded()
                outage.failures = 0
            except redis.RedisError as e:  # an outage: beat again at the next interval, never stop
                outage.failed(e)

    def restart_incarnation(self) -> None:
        self.publisher.flush()
        self.runner.clear_sequences()
        self._last_step = -1
        self.incarnation = uuid.uuid4().hex
        self.register(self.metrics_url)
        self.reregister.clear()

    # ---- the loop -----------------------------------------------------------------------------
    def serve(self) -> None:
        while not self.stop.is_set():
            if self.reregister.is_set():
                self.restart_incarnation()
            try:
                resp = retry_forever_sync(lambda: self._read_plans(">"), what="read plans", log=log,
                                          stop_event=self.stop)
                if not resp and not self.stop.is_set() and self.publisher.idle():
                    # idle: a plan delivered on a lost reply waits here
                    resp = retry_forever_sync(lambda: self._read_plans("0"), what="read pending plans", log=log,
                                              stop_event=self.stop)
            except redis.ResponseError as e:
                self._plan_stream_gone(e)
                continue
            for _stream, entries in resp or ():
                for entry_id, fields in entries:
                    self.handle(entry_id, fields)

    def _read_plans(self, start: str):
        block = PLAN_BLOCK_MS if start == ">" else None
        return self.r.xreadgroup(S.WORKER_GROUP, self.incarnation, {self.plan_stream: start}, count=1, block=block)

    def _plan_stream_gone(self, err: redis.ResponseError) -> None:
        """NOGROUP: the scheduler declared us dead (it removed our registration and plan stream), or Redis
        came back without them. Still registered as this incarnation: recreate the group and go on; else
        register again as a new incarnation."""
        if "NOGROUP" not in str(err):
            raise err
        cur = retry_forever_sync(lambda: self.r.hget(S.WORKERS, self.worker_id), what="check registration",
                                 log=log, stop_event=self.stop)
        if cur != self._reg_json:
            log.warning("plan stream unreadable (%s); registering again", err)
            self.reregister.set()
            return
        log.warning("plan stream's group is gone (%s); recreating it", err)
        try:
            retry_forever_sync(lambda: self.r.xgroup_create(self.plan_stream, S.WORKER_GROUP, id="0", mkstream=True),
                               what="recreate group", log=log, stop_event=self.stop)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def handle(self, entry_id: str, fields: dict) -> None:
        """Launch one plan; its result is published by the publishing thread, in order."""
        t0 = time.perf_counter()
        step_id = -1
        try:
            plan = S.decode(fields, StepPlan)
            step_id = plan.step_id
            if step_id <= self._last_step:
                # wire step ids only grow: a second copy of a plan (an XADD retried after its reply was lost)
                # must not run twice (the sequences would advance twice); its result went out already
                log.warning("step %s is a duplicate (last run: %s); acknowledged, not run", step_id, self._last_step)
                retry_forever_sync(lambda: self.r.xack(self.plan_stream, S.WORKER_GROUP, entry_id),
                                   what="ack duplicate plan", log=log, stop_event=self.stop)
                return
            self._last_step = step_id
            step = self.runner.launch(plan)
        except Exception as e:  # a lost tensor-parallel group exits here (ResultPublisher.failure)
            step, plan = self.publisher.failure(step_id, e), None
        self.publisher.submit(step, entry_id, plan, t0, self.runner.last_transfer_s)

    def _observe_step(self, plan: StepPlan, dt: float, transfers: dict) -> None:
        """Execute time, computed tokens, and each KV transfer of the plan with its time."""
        if self.metrics is None:
            return
        self.metrics.observe_step(plan, dt, transfers)
        self._steps += 1
        if self._steps % 50 == 1:
            self._device_memory()

    def _publish(self, result: StepResult, entry_id: str) -> None:
        """The StepResult and the plan's ack in one transaction, retried until Redis takes it (at least once:
        a duplicate matches no step in flight and the scheduler acknowledges it as stale)."""
        fields = S.encode(result)

        def write() -> None:
            p = self.r.pipeline(transaction=True)
            p.xadd(S.RESULTS, fields)
            p.xack(self.plan_stream, S.WORKER_GROUP, entry_id)
            p.execute()

        retry_forever_sync(write, what="publish step result", log=log, stop_event=self.stop)

    def unregister(self) -> None:
        try:
            cur = self.r.hget(S.WORKERS, self.worker_id)
            if cur == getattr(self, "_reg_json", None):
                p = self.r.pipeline(transaction=True)
                p.hdel(S.WORKERS, self.worker_id)
                p.delete(S.heartbeat_key(self.worker_id))
                p.execute()
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    settings = WorkerSettings.from_cli(argv)
    settings.setup_logging()
    svc = WorkerService(settings)
    drain = Drain(svc, settings.drain_timeout_s)

    def _stop(signum, frame):
        svc.stop.set()

    signal.signal(signal.SIGTERM, lambda signum, frame: drain.start())  # scale-down: finish, then exit
    signal.signal(signal.SIGINT, _stop)
    try:
        svc.build_runner()
    except ValueError as e:  # a configuration the model cannot run, e.g. heads the tensor-parallel size does not divide
        log.error("%s", e)
        return 2
    metrics_url = svc.start_metrics()
    freeze_heap()  # the model, torch and the CUDA graphs: out of the full collections of the step loop
    svc.register(metrics_url)
    hb = threading.Thread(target=svc.heartbeat_loop, name="heartbeat", daemon=True)
    hb.start()
    try:
        svc.serve()
        svc.publisher.flush()  # the steps launched are published before we go
    finally:
        svc.stop.set()
        svc.unregister()
        getattr(svc.runner, "close", lambda: None)()  # a tensor-parallel group's other ranks
    return 0


if __name__ == "__main__":
    sys.exit(main())
