"""The request queues of one worker: waiting and swapped heaps, and the running list (no torch).

All three are kept in queue order (``SequenceGroup.key``: arrival, or ``(priority, arrival)``). A group
that finishes while it sits in a heap (an abort) is dropped lazily when it reaches the head; one that
finishes while running during ``update()`` leaves the running list when the step's results are applied.
``num_running_seqs`` counts the sequences the running groups may grow to (what ``max_num_seqs`` bounds).
"""

from __future__ import annotations

import bisect
import heapq

from scheduler.sequence import SequenceGroup, SequenceStatus

_RUNNING = SequenceStatus.RUNNING
_FINISHED = SequenceStatus.FINISHED


def _queue_key(g: SequenceGroup):
    return g.key


class RequestQueues:
    __slots__ = ("waiting", "swapped", "running", "num_running_seqs", "_running_dirty")

    def __init__(self) -> None:
        self.waiting: list[SequenceGroup] = []  # heap by key (new + preempted by recompute)
        self.swapped: list[SequenceGroup] = []  # heap by key
        self.running: list[SequenceGroup] = []  # sorted by key
        self.num_running_seqs = 0  # sum of max_num_seqs of the running groups
        self._running_dirty = False  # a running group finished: drop it at the end of the update

    # ------------------------------------------------------------------ waiting / swapped
    def push_waiting(self, g: SequenceGroup) -> None:
        heapq.heappush(self.waiting, g)

    def push_swapped(self, g: SequenceGroup) -> None:
        heapq.heappush(self.swapped, g)

    @staticmethod
    def _peek(heap: list[SequenceGroup]) -> SequenceGroup | None:
        while heap and heap[0].status is _FINISHED:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def peek_next(self) -> tuple[SequenceGroup | None, bool]:
        """The head of the queues in queue order, and whether it is the swapped one (None when empty)."""
        gw = self._peek(self.waiting)
        gs = self._peek(self.swapped)
        if gs is not None and (gw is None or gs.key < gw.key):
            return gs, True
        return gw, False

    def pop_head(self, swapped: bool) -> SequenceGroup:
        return heapq.heappop(self.swapped if swapped else self.waiting)

    # ------------------------------------------------------------------ running
    def start_running(self, g: SequenceGroup, step: int) -> None:
        g.status = _RUNNING
        g.scheduled_step = step
        bisect.insort(self.running, g, key=_queue_key)
        self.num_running_seqs += g.max_num_seqs

    def stop_running(self, g: SequenceGroup) -> None:
        """Take ``g`` off the running list now (preemption, abort, a failed step, capacity)."""
        self.running.remove(g)
        self.num_running_seqs -= g.max_num_seqs

    def finish_running(self, g: SequenceGroup) -> None:
        """``g`` finished while its step's results are applied: it leaves the list in ``compact()``."""
        self.num_running_seqs -= g.max_num_seqs
        self._running_dirty = True

    def compact(self) -> None:
        if self._running_dirty:
            self.running[:] = [g for g in self.running if g.status is _RUNNING]
            self._running_dirty = False

    def victim(self, step: int) -> SequenceGroup | None:
        """The running group last in queue order that is not scheduled in this step."""
        running = self.running
        for i in range(len(running) - 1, -1, -1):
            if running[i].scheduled_step != step:
                return running[i]
        return None

    # ------------------------------------------------------------------ counts
    def num_waiting(self) -> int:
        return sum(1 for g in self.waiting if g.status is not _FINISHED)

    def num_swapped(self) -> int:
        return sum(1 for g in self.swapped if g.status is not _FINISHED)
