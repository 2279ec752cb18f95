"""The tensor-parallel process group of one worker: N ranks on one host, one process each.

``torch.distributed`` with NCCL on CUDA (its collectives are capturable in CUDA graphs) and gloo on the
CPU; the rendezvous is a TCPStore that rank 0 opens on 127.0.0.1 (port 0: the kernel picks a free one).
Control messages (the serialized StepPlan) travel on a gloo group too, as CPU byte tensors, so a plan
never makes a round trip through the device. Every helper is a no-op at world size 1, and the model only
calls them when it is sharded (gpu_worker/models/llama.py), so a single-GPU worker pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class _Group:
    rank: int = 0
    size: int = 1
    cpu_group: Any = None  # gloo group for control bytes (the default group on the CPU)


_GROUP = _Group()


def tp_rank() -> int:
    return _GROUP.rank


def tp_size() -> int:
    return _GROUP.size


def open_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store on 127.0.0.1 (a free port, read back from ``store.port``)."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def init_tensor_parallel(rank: int, size: int, port: int, device: torch.device, timeout_s: float = 600.0,
                         store: dist.TCPStore | None = None, backend: str | None = None) -> None:
    """Join the group (rank 0 passes the store it opened; the others connect to its ``port``). ``backend``
    None: NCCL on CUDA, gloo on the CPU."""
    if size == 1:
        return
    if dist.is_initialized():
        raise RuntimeError("tensor parallel: a process group is already initialised in this process")
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timeout)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL binds this rank's communicator to it
    kw = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout, **kw)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    _GROUP.rank, _GROUP.size, _GROUP.cpu_group = rank, size, cpu_group


def destroy_tensor_parallel() -> None:
    if _GROUP.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP.rank, _GROUP.size, _GROUP.cpu_group = 0, 1, None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (the row-parallel layers' partial products)."""
    if _GROUP.size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """[..., d] on every rank -> [..., N * d] on every rank, rank r's piece at [r * d, (r + 1) * d)."""
    n = _GROUP.size
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x)  # rank pieces stacked along dim 0
    return out.view(n, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], n * x.shape[-1])


def min_int(v: int) -> int:
    """The smallest of every rank's ``v`` (e.g. KV blocks that fit on every device)."""
    if _GROUP.size == 1:
        return v
    t = torch.tensor([v], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_GROUP.cpu_group)
    return int(t.item())


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0 sends ``data``; every rank returns it (two broadcasts: the length, then the bytes)."""
    g = _GROUP.cpu_group
    n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(n, 0, group=g)
    size = int(n.item())
    if _GROUP.rank == 0:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    else:
        buf = torch.empty(size, dtype=torch.uint8)
    if size:
        dist.broadcast(buf, 0, group=g)
    return data if _GROUP.rank == 0 else buf.numpy().tobytes()
