"""PagedFleet's scheduler half: the KV block ledger and the continuous-batching policy (no torch).

The ledger: block_pool.py (physical blocks) under kv_cache_manager.py (block tables, the queries the
policy needs). The policy: scheduler.py (the facade) over queues.py, admission.py, preemption.py,
forking.py, output.py, stats.py and plan_builder.py (per-step state).

    from scheduler import Scheduler, SchedulerConfig
    sched = Scheduler(SchedulerConfig(), worker_info)
    sched.add_request(req); plan = sched.schedule(); deltas = sched.update(result)
"""

from scheduler.block_pool import BlockPool, FreeBlockQueue, KVBlock
from scheduler.kv_cache_manager import BlockTable, KVCacheManager
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus, hash_block_tokens
from scheduler.stats import SchedulerStats

__all__ = [
    "BlockPool",
    "BlockTable",
    "FreeBlockQueue",
    "KVBlock",
    "KVCacheManager",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "Sequence",
    "SequenceGroup",
    "SequenceStatus",
    "hash_block_tokens",
]
