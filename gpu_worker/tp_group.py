"""A tensor-parallel worker group: rank 0 in the calling process, ranks 1..N-1 spawned, one process each.

``start_runner(config)`` is what the worker service and the offline engine call: a plain ModelRunner at
tensor_parallel_size 1, else a ``TensorParallelGroup``, which looks like a ModelRunner to its caller (the
group is ONE worker: one WorkerInfo, one plan per step, one StepResult). Rank 0 sends every command to
the other ranks as bytes over the group's gloo channel (gpu_worker/distributed.py): ``P`` + the StepPlan's
msgspec JSON, ``C`` (drop every sequence), ``S`` (stop). The other ranks run ``follow_rank_zero``: decode,
launch the same plan on their shard, discard the result (only rank 0's is sent).

Failure: a watchdog thread on rank 0 waits on the ranks' process sentinels. When one exits unexpectedly it
calls ``on_rank_exit`` (the worker service unregisters and exits, so the scheduler declares the worker
dead and resumes its requests elsewhere); without one, the next ``execute`` raises, and if rank 0 is stuck
in a collective (NCCL does not notice a dead peer) the process exits after a grace period rather than
hang. The spawned ranks die with rank 0 (PR_SET_PDEATHSIG on Linux; a broken gloo connection elsewhere).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import json
import logging
import multiprocessing.connection
import os
import signal
import threading
import time
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from gpu_worker import distributed
from gpu_worker.config import WorkerConfig
from gpu_worker.launched_step import DeferredStep, DoneStep
from gpu_worker.model_runner import ModelRunner
from protocol import StepPlan, StepResult, wire

log = logging.getLogger(__name__)

STUCK_GRACE_S = 5.0  # after a rank died: how long rank 0 may stay inside a collective before it exits
DEATH_NOTICE_S = 2.0  # after a collective failed: how long to wait for the rank that caused it to exit


class GroupLost(RuntimeError):
    """A rank of the group died during a step: no request of that step failed, the whole worker is gone
    (its caller hands every request back, as for a dead worker, instead of reporting the step failed)."""


def start_runner(config: WorkerConfig, worker_id: str = "worker-0",
                 on_rank_exit: Callable[[int, int | None], None] | None = None) -> Any:
    """The runner for ``config``: a ModelRunner, or a TensorParallelGroup of config.tensor_parallel_size."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, worker_id=worker_id)
    return TensorParallelGroup(config, worker_id, on_rank_exit)


def _rank_device(config: WorkerConfig, rank: int) -> tuple[str, str]:
    """(device, backend) of a rank: CUDA ranks on consecutive devices over NCCL where the host has enough,
    else every rank on the given device over gloo (a check of the numbers, not a fast path)."""
    if not config.device.startswith("cuda"):
        return config.device, "gloo"
    base = int(config.device.split(":")[1]) if ":" in config.device else 0
    if torch.cuda.device_count() >= base + config.tensor_parallel_size:
        return f"cuda:{base + rank}", "nccl"
    return f"cuda:{base}", "gloo"  # an indexed device: each rank binds it (torch.cuda.set_device)


def _rank_config(config: WorkerConfig, rank: int) -> WorkerConfig:
    device, backend = _rank_device(config, rank)
    # gloo collectives cannot be captured in a CUDA graph
    graphs = config.enable_cuda_graphs and backend == "nccl"
    return dataclasses.replace(config, device=device, enable_cuda_graphs=graphs)


class TensorParallelGroup:
    """Rank 0 of a group, holding its own ModelRunner shard (``self.runner``); attributes it does not
    define (info, seqs, kv_cache, measure_transfers, ...) are the runner's."""

    _OWN = ("config", "runner", "procs", "on_rank_exit", "dead", "stopping", "busy_since", "_watchdog", "_reap")

    def __init__(self, config: WorkerConfig, worker_id: str,
                 on_rank_exit: Callable[[int, int | None], None] | None = None, timeout_s: float = 600.0):
        from gpu_worker.models.llama import LlamaArgs
        from model_io.model_files import resolve_model

        n = config.tensor_parallel_size
        LlamaArgs.from_config(resolve_model(config.model).config).check_tensor_parallel(n)  # before spawning
        self._set(config=config, on_rank_exit=on_rank_exit, dead=None, stopping=False, busy_since=None,
                  runner=None, _reap=threading.Lock())
        store = distributed.open_store(n, timeout_s)
        ctx = mp.get_context("spawn")
        cfg = json.dumps(dataclasses.asdict(config))  # the config goes over as JSON, nothing pickled of ours
        self._set(procs=[ctx.Process(target=follow_rank_zero, name=f"tp-rank-{r}", daemon=True,
                                     args=(r, store.port, cfg, worker_id, os.getpid()))
                         for r in range(1, n)])
        for p in self.procs:
            p.start()
        self._set(_watchdog=threading.Thread(target=self._watch, name="tp-watchdog", daemon=True))
        self._watchdog.start()
        atexit.register(self.close)
        rc = _rank_config(config, 0)
        self.busy_since = time.monotonic()  # joining and loading are collectives too
        try:
            distributed.init_tensor_parallel(0, n, store.port, torch.device(rc.device), timeout_s, store=store,
                                             backend=_rank_device(config, 0)[1])
            self.runner = ModelRunner(rc, worker_id=worker_id)
        except BaseException:  # the other ranks would wait for us in a collective: stop them
            self.stopping = True
            for p in self.procs:
                p.kill()
                p.join(5.0)
            distributed.destroy_tensor_parallel()
            raise
        self.busy_since = None
        log.info("tensor-parallel group of %d ranks up (pids %s)", n, [os.getpid()] + [p.pid for p in self.procs])

    def _set(self, **kw) -> None:
        for k, v in kw.items():
            object.__setattr__(self, k, v)

    def __getattr__(self, name: str) -> Any:
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.runner, name, value)

    # ---- commands ----------------------------------------------------------------------------
    def _command(self, data: bytes) -> None:
        self._check_ranks()
        if self.dead:
            raise GroupLost(f"tensor-parallel group is down: {self.dead}")
        distributed.broadcast_bytes(data)

    def _check_ranks(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            if not self.dead and not self._alive(p):
                self._mark_dead(rank, p)

    def _alive(self, p) -> bool:
        with self._reap:  # one thread polls a child at a time: a second waitpid would lose its exit code
            return p.is_alive()

    def _mark_dead(self, rank: int, p) -> None:
        with self._reap:
            p.join(1.0)
            deadline = time.monotonic() + 2.0  # its pipe closes a moment before the kernel can reap it
            while p.exitcode is None and time.monotonic() < deadline:
                time.sleep(0.01)
            self.dead = self.dead or f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}"

    def _await_rank_exit(self, timeout: float) -> None:
        live = [p.sentinel for p in self.procs if self._alive(p)]
        if live and not self.dead:
            multiprocessing.connection.wait(live, timeout)
        self._check_ranks()

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan).result()

    def launch(self, plan: StepPlan) -> DeferredStep | DoneStep:
        """Every rank launches the plan (ModelRunner.launch): a greedy step's tokens stay on each rank's
        device, identical on all of them (the logits are gathered before the argmax)."""
        self.busy_since = time.monotonic()
        try:
            self._command(b"P" + wire.encode(plan))
            return self.runner.launch(plan)
        except RuntimeError as e:
            # a peer's death shows up here first as a broken connection; its exit may lag a little behind
            self._await_rank_exit(DEATH_NOTICE_S)
            if self.dead:
                raise GroupLost(f"tensor-parallel group is down: {self.dead}") from e
            raise
        finally:
            self.busy_since = None

    def clear_sequences(self) -> None:
        self._command(b"C")
        self.runner.clear_sequences()

    def close(self) -> None:
        """Stop the other ranks and leave the group (idempotent)."""
        if self.stopping:
            return
        self.stopping = True
        atexit.unregister(self.close)
        if not self.dead:
            try:
                distributed.broadcast_bytes(b"S")
            except RuntimeError:
                pass
        for p in self.procs:
            p.join(10.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        distributed.destroy_tensor_parallel()

    # ---- failure -----------------------------------------------------------------------------
    def _watch(self) -> None:
        sentinels = {p.sentinel: (r, p) for r, p in enumerate(self.procs, start=1)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self.stopping:
            return
        rank, p = sentinels[ready[0]]
        self._mark_dead(rank, p)
        log.error("tensor-parallel %s: the group goes down", self.dead)
        if self.on_rank_exit is not None:
            self.on_rank_exit(rank, p.exitcode)
        t = time.monotonic()
        while time.monotonic() - t < STUCK_GRACE_S:
            if self.busy_since is None or self.stopping:
                return
            time.sleep(0.1)
        log.error("rank 0 is stuck in a collective with a dead rank: exiting")
        os._exit(1)


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # rank 0 died before the prctl
        os._exit(1)


def follow_rank_zero(rank: int, port: int, config_json: str, worker_id: str, parent_pid: int) -> None:
    """A spawned rank: join the group, load this rank's shard, then run what rank 0 sends until ``S``."""
    _die_with_parent(parent_pid)
    # Ctrl-C and supervisord's SIGTERM are for rank 0, which stops the group; this rank exits on ``S``
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{rank} %(name)s %(levelname)s %(message)s")
    raw = json.loads(config_json)
    if raw.get("cuda_graph_batch_sizes") is not None:
        raw["cuda_graph_batch_sizes"] = tuple(raw["cuda_graph_batch_sizes"])
    config = WorkerConfig(**raw)
    rc = _rank_config(config, rank)
    distributed.init_tensor_parallel(rank, config.tensor_parallel_size, port, torch.device(rc.device),
                                     backend=_rank_device(config, rank)[1])
    runner = ModelRunner(rc, worker_id=worker_id)
    while True:
        data = distributed.broadcast_bytes(None)
        tag = data[:1]
        if tag == b"S":
            break
        if tag == b"C":
            runner.clear_sequences()
            continue
        try:  # launched, never waited for: the next launch resolves it (PendingTokens keeps the newest only)
            runner.launch(wire.decode(data[1:], StepPlan))
        except Exception:  # rank 0 failed the same way and reports it; a broken group fails the next broadcast
            log.exception("step failed")
    distributed.destroy_tensor_parallel()
