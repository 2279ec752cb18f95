"""Host-side cost of one eager paged-decode call (batch 1 x 4096, the launch-bound shape), split up.

    python benchmarks/launch_overhead.py

Prints microseconds per call for: the whole call (direct launch, kernels/_common.py); the same through
Triton's JIT dispatch; the launcher with the Triton launch replaced by a no-op
(prologue only); Triton's `kernel[grid](...)` alone with prepared arguments; and the top of a cProfile of
the whole call. Used to decide what to cut from the launcher (results in benchmarks/results/kernels-h100.md).
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels  # noqa: E402
from kernel_bench import cpu_us_per_call as per_call_us  # noqa: E402

pda = sys.modules["kernels.paged_decode_attention"]  # the package re-exports a function of the same name




def main() -> None:
    dev = torch.device("cuda")
    nb, bs, hkv, hq, d = 256, 16, 8, 32, 128
    k = torch.randn(nb, bs, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bt = torch.randperm(nb, device=dev, dtype=torch.int32)[None]
    sl = torch.tensor([4096], device=dev, dtype=torch.int32)
    q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    full = lambda: kernels.paged_decode_attention(q, k, v, bt, sl, d**-0.5, out=out, max_seq_len=4096)  # noqa: E731
    res = {"full": per_call_us(full)}
    from kernels import _common

    for launcher in _common._direct_launchers.values():  # Triton's own JIT dispatch on every call
        launcher.direct = False
    res["full_jit_dispatch"] = per_call_us(full)
    for launcher in _common._direct_launchers.values():
        launcher.direct = True
    sdpa_q = q.view(1, hq, 1, d)
    kc = k.permute(2, 0, 1, 3).reshape(1, hkv, nb * bs, d)[:, :, :4096]
    res["sdpa"] = per_call_us(lambda: torch.nn.functional.scaled_dot_product_attention(sdpa_q, kc, kc, enable_gqa=True))
    # prologue only: the Triton launch replaced by a no-op
    real = pda.launch_kernel
    pda.launch_kernel = lambda *a, **kw: None
    res["prologue_only"] = per_call_us(full)
    pda.launch_kernel = real
    # cProfile of the whole call
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        full()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    # the direct launches compute what the reference does (fresh q and a second batch shape)
    for batch in (1, 3):
        q2 = torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16)
        bt2, sl2 = bt.expand(batch, -1).contiguous(), torch.tensor([4096, 17, 1000][:batch], device=dev, dtype=torch.int32)
        for _ in range(3):
            got = kernels.paged_decode_attention(q2, k, v, bt2, sl2, d**-0.5, max_seq_len=4096)
        ref = kernels.paged_decode_attention_ref(q2, k, v, bt2, sl2, d**-0.5, out_dtype=torch.float64)
        err = ((got.double() - ref).norm() / ref.norm()).item()
        print(f"batch {batch}: rel err of a direct launch vs the float64 reference {err:.1e}")
        assert err < 1e-2
    for key, val in res.items():
        print(f"{key}: {val:.1f} us/call")
    print(s.getvalue())


if __name__ == "__main__":
    main()
