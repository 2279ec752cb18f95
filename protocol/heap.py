"""A service's long-lived heap out of the garbage collector's way.

The per-step messages (plans, results, deltas) allocate enough that CPython runs a full collection every few
dozen steps; a full collection walks every tracked object, and a service holds ~10^5 of them from its start
(torch, the model, the block pools, the imported libraries): ~100 ms each on a busy CPU, a stall of the step
loop that the GPU waits through. ``freeze_heap`` moves what exists now to the permanent generation, which
collections skip; objects made later are collected as usual.
"""

from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Collect once, then freeze what is left (call it when a service's long-lived state is built)."""
    gc.collect()
    gc.freeze()
