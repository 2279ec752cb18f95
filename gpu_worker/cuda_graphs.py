"""CUDA graphs of the model forward for decode-only steps (CUDA with the Triton backend).

Captured once per padded batch size after the KV cache is allocated; a decode step stages its inputs into
static device buffers with one host-to-device copy and replays the smallest graph that fits.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from gpu_worker.attention import AttentionMetadata

log = logging.getLogger(__name__)

# The runner passed in (gpu_worker/model_runner.py) is typed Any: this module sits below it.


# the int32 input slab's rows: token ids, positions, slots, seq lens, the decode kernel's order
_ROWS = 5


def default_graph_sizes(max_bs: int, step: int = 16) -> list[int]:
    """1, 2, 4, 8, then every ``step`` up to max_bs (and max_bs itself): at most step - 1 padding rows."""
    return sorted({b for b in (1, 2, 4, 8) if b < max_bs} | set(range(step, max_bs, step)) | {max_bs})


class CudaGraphs:
    """CUDA graphs of the model forward for decode-only steps (CUDA with the Triton backend).

    One graph per padded batch size (``WorkerConfig.cuda_graph_batch_sizes``, default 1, 2, 4, 8, 16, 32,
    ... max_num_seqs), captured right after the KV cache is allocated, largest first, into one memory pool
    (the graphs never run at the same time, so they share it). Inputs are static device buffers: token ids,
    positions, slots (-1 on padding rows: no KV write), seq lens (0 on padding rows: no KV read, a zero
    output) and the decode kernel's order (longest context first) as one int32 slab ``[5, max_bs]``, and
    block tables ``[max_bs, cdiv(max_model_len, block_size)]``. A step of S sequences fills a pinned host
    copy of the slab plus its compact ``[S, blocks needed]`` table, sends it with ONE host-to-device copy,
    scatters the table into the static buffer (one device copy) and replays the smallest graph >= S; rows
    [:S] of its output are the hidden states. The decode kernel's split count is fixed at capture from
    max_model_len (its ``max_seq_len`` hint), so replays need no host information but these buffers. FP8
    scales are baked in at capture.
    """

    def __init__(self, runner: Any, emulate: bool = False):
        """``emulate``: no capture; each "replay" runs the model eagerly on the static buffers (tests the
        input staging on the CPU). No reference to the runner is kept (it owns this object: a cycle
        would keep the model and the graph pool alive until the cyclic GC runs)."""
        cfg = runner.config
        self.block_size, self.max_model_len = runner.block_size, runner.max_model_len
        dev = runner.device
        cuda = dev.type == "cuda"
        self.sizes = sorted({int(b) for b in (cfg.cuda_graph_batch_sizes or default_graph_sizes(cfg.max_num_seqs))})
        self.max_batch_size = M = self.sizes[-1]
        self.width = W = -(-runner.max_model_len // runner.block_size)
        n = _ROWS * M + M * W
        self.host = torch.zeros(n, dtype=torch.int32, pin_memory=cuda)
        self.host_np = self.host.numpy()
        self.dev_buf = torch.zeros(n, dtype=torch.int32, device=dev)
        inp = self.dev_buf[: _ROWS * M].view(_ROWS, M)
        self.ids, self.pos, self.slots, self.lens, self.order = inp
        self.slots.fill_(-1)
        self.order.copy_(torch.arange(M, dtype=torch.int32))  # a valid permutation for every size's capture
        self.bt = torch.zeros((M, W), dtype=torch.int32, device=dev)
        self.qsl = torch.arange(M + 1, dtype=torch.int32, device=dev)
        # the pinned slab's last copy: wait for it before refilling the slab
        self.copied = torch.cuda.Event() if cuda else None
        self.graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self.capture_s = 0.0
        self.memory_bytes = 0
        if emulate:
            for pb in self.sizes:
                self.graphs[pb] = EagerReplay(self, runner, pb)
            return
        self.pool = torch.cuda.graph_pool_handle()
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(dev)[0]
        with torch.cuda.device(dev):
            self._capture_all(runner)
        free1 = torch.cuda.mem_get_info(dev)[0]
        self.capture_s = time.perf_counter() - t0
        self.memory_bytes = free0 - free1
        log.info("captured %d CUDA graphs (decode batch sizes %s) in %.1fs, %.0f MiB", len(self.graphs),
                 self.sizes, self.capture_s, self.memory_bytes / 2**20)

    def _meta(self, pb: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slots[:pb], block_tables=self.bt[:pb], seq_lens=self.lens[:pb],
                                 query_start_loc=self.qsl[: pb + 1], max_query_len=1, max_seq_len=self.max_model_len,
                                 is_decode_only=True, block_size=self.block_size,
                                 decode_order=self.order[:pb])

    @torch.inference_mode()
    def _capture_all(self, r: Any) -> None:
        dev = r.device
        for pb in reversed(self.sizes):
            args = (self.ids[:pb], self.pos[:pb], r.kv_cache, self._meta(pb), r.backend)
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                r.model(*args)  # warm-up outside the capture: Triton compiles this size's variants here
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = r.model(*args)
            self.graphs[pb] = (g, out)
        torch.cuda.synchronize(dev)

    def forward(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
                bt: np.ndarray, on_device: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``on_device``: (rows, tokens) of input ids still on the device, written over ``ids[rows]``."""
        S = len(ids)
        pb = self.sizes[bisect.bisect_left(self.sizes, S)]
        g, out = self.graphs[pb]
        M = self.max_batch_size
        nb = min(-(-int(seq_lens.max()) // self.block_size), bt.shape[1], self.width)  # blocks read
        h = self.host_np
        if self.copied is not None:
            self.copied.synchronize()
        v = h[: _ROWS * M].reshape(_ROWS, M)
        v[0, :S] = ids
        v[1, :S] = positions
        v[2, :S] = slots
        v[3, :S] = seq_lens
        if pb > S:
            v[0:2, S:pb] = 0
            v[2, S:pb] = -1
            v[3, S:pb] = 0
        # the decode attention's order: long contexts first, padding rows last (load balance of the SMs:
        # kernels/paged_decode_attention.py; 'mixed' 1.4% faster than batch order on an H100, 2026-12-07)
        v[4, :pb] = np.argsort(-v[3, :pb], kind="stable")
        off = _ROWS * M
        end = off + S * nb
        h[off:end].reshape(S, nb)[:] = bt[:, :nb]
        self.dev_buf[:end].copy_(self.host[:end], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        self.bt[:S, :nb].copy_(self.dev_buf[off:end].view(S, nb))
        if on_device is not None:
            self.ids.index_copy_(0, on_device[0], on_device[1].to(self.ids.dtype))
        g.replay()
        return out[:S]


class EagerReplay:
    """Stands in for a captured graph (``CudaGraphs(emulate=True)``): runs the forward eagerly on the
    static buffers. The torch backend needs int64 slots and its per-step prepare."""

    def __init__(self, graphs: CudaGraphs, runner: Any, pb: int):
        self.g, self.r, self.pb = graphs, runner, pb
        self.calls = 0
        r = runner
        self.out = torch.empty((pb, r.args.hidden_size), dtype=r.dtype, device=r.device)

    def __iter__(self):  # unpacks like the (graph, output) pairs
        return iter((self, self.out))

    @torch.inference_mode()
    def replay(self) -> None:
        g, pb, r = self.g, self.pb, self.r
        self.calls += 1
        meta = replace(g._meta(pb), extras={})
        if r.backend.name == "torch":
            meta.slot_mapping = meta.slot_mapping.long()
        r.backend.prepare(meta)
        self.out.copy_(r.model(g.ids[:pb], g.pos[:pb], r.kv_cache, meta, r.backend))
