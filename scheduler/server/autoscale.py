"""How many workers the load asks for: the ``pagedfleet_desired_workers`` gauge KEDA scales the workers on.

    desired = max(1, ceil(used_blocks / (target_kv_utilization * blocks_per_worker))
                     + ceil(waiting / target_queue_per_worker))

``used_blocks``: GPU KV blocks in use on the live, non-draining workers; ``blocks_per_worker``: their mean
GPU block count (so a fleet running at the target utilisation asks for the workers it has); ``waiting``:
requests queued in their Schedulers plus those waiting for any worker (orphans). So a fleet whose KV cache
runs above the target, or whose queue is longer than the target per worker, asks for more; an idle one for
one. Draining workers count neither way (they are leaving). KEDA's min / max replica counts bound it."""

from __future__ import annotations

import math
from collections.abc import Iterable


def desired_workers(used_blocks: Iterable[int], worker_blocks: Iterable[int], waiting: int,
                    target_kv_utilization: float = 0.8, target_queue_per_worker: float = 4.0) -> int:
    used, blocks = list(used_blocks), [b for b in worker_blocks if b > 0]
    kv = math.ceil(sum(used) / (target_kv_utilization * (sum(blocks) / len(blocks)))) if blocks else 0
    queue = math.ceil(max(0, waiting) / target_queue_per_worker)
    return max(1, kv + queue)
