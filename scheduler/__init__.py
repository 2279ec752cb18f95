"""PagedFleet's scheduler half: the KV block ledger and the continuous-batching policy (no torch).

    from scheduler import Scheduler, SchedulerConfig
    sched = Scheduler(SchedulerConfig(), worker_info)
    sched.add_request(req); plan = sched.schedule(); deltas = sched.update(result)
"""

from scheduler.block_pool import BlockPool, FreeBlockQueue, KVBlock
from scheduler.kv_cache_manager import BlockTable, KVCacheManager
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.sequence import Sequence, SequenceGroup, SequenceStatus, hash_block_tokens

__all__ = [
    "BlockPool",
    "BlockTable",
    "FreeBlockQueue",
    "KVBlock",
    "KVCacheManager",
    "Scheduler",
    "SchedulerConfig",
    "Sequence",
    "SequenceGroup",
    "SequenceStatus",
    "hash_block_tokens",
]
