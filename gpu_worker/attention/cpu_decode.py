"""The CPU's bf16 paged decode attention (csrc/paged_decode_cpu.c), compiled once with the C compiler.

The torch path gathers every sequence's blocks into a workspace padded to the batch's longest sequence and
runs two bmm over it: three passes over K/V plus the padding. The C kernel reads each sequence's own tokens
once, straight from the head-major blocks (0.39 vs ~0.7 ms per layer at 32 sequences of ~200 tokens).

`load()` compiles csrc/paged_decode_cpu.c with `$CC` (default gcc) into `$PAGEDFLEET_CACHE/cpu_kernels/`
(default ~/.cache/pagedfleet), keyed by the source, the flags and the CPU's feature flags (-march=native),
and loads it with ctypes. It returns None, and the backend keeps the torch path, when there is no compiler
or PAGEDFLEET_CPU_KERNELS=0. The kernel shares (sequence, KV head) pairs out with OpenMP; loaded after
torch, it binds to torch's libgomp.so.1 and so runs on torch's threads (torch.set_num_threads applies).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc") / "paged_decode_cpu.c"
# -ffast-math's reassociation (vectorised reductions) without -ffast-math itself: linking with it adds
# crtfastmath.o, which turns on flush-to-zero for the whole process that loads the library
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-freciprocal-math", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def load() -> ctypes.CDLL | None:
    """The compiled library, or None when it cannot be built here (logged once)."""
    with _lock:
        if "lib" not in _loaded:
            lib = None
            if os.environ.get("PAGEDFLEET_CPU_KERNELS", "1") != "0":
                try:
                    lib = _build_and_load()
                except Exception as e:  # no compiler, a read-only cache, ...: the torch path stays
                    log.warning("CPU decode kernel unavailable (%s): using the torch path", e)
            _loaded["lib"] = lib
        return _loaded["lib"]


def _cpu_flags() -> str:
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build_and_load() -> ctypes.CDLL:
    cc = os.environ.get("CC", "gcc")
    tag = " ".join([cc, *_FLAGS, platform.machine(), _cpu_flags()]).encode()
    key = hashlib.sha256(_SRC.read_bytes() + tag).hexdigest()[:16]
    cache = Path(os.environ.get("PAGEDFLEET_CACHE", Path.home() / ".cache" / "pagedfleet")) / "cpu_kernels"
    so = cache / f"paged_decode_cpu-{key}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SRC), "-lm"], check=True, capture_output=True, timeout=300)
            os.replace(tmp, so)  # atomic: concurrent builders never load half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(so))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.paged_decode_bf16.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i32, i32, i32, i32,
                                      i32, ctypes.c_float]
    lib.paged_decode_bf16.restype = ctypes.c_int
    return lib


def paged_decode(lib: ctypes.CDLL, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: np.ndarray, seq_lens: np.ndarray, scale: float) -> torch.Tensor | None:
    """q [S, Hq, D] bf16 (head_dim contiguous); caches bf16 head-major ([num_blocks, block_size, Hkv, D]
    views of [num_blocks, Hkv, block_size, D] storage); block_tables int32 [S, W] and seq_lens int32 [S],
    C-contiguous. Returns [S, Hq, D] bf16, or None when the kernel declines the shape."""
    S, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    out = torch.empty((S, hq, d), dtype=q.dtype)
    rc = lib.paged_decode_bf16(q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
                               block_tables.ctypes.data, block_tables.shape[1], seq_lens.ctypes.data,
                               out.data_ptr(), out.stride(0), out.stride(1), S, hq, hkv, d, bs, float(scale))
    return None if rc else out
