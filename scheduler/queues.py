"""The request queues of one worker: waiting and swapped heaps, and the running list (no torch).

All three are kept in queue order (``SequenceGroup.key``: arrival, or ``(priority, arrival)``). A group
that finishes while it sits in a heap (an abort) is dropped lazily when it reaches the head; one that
finishes while running during ``update()`` leaves the running list when the step's results are applied.
``num_running_seqs`` counts the sequences the running groups may grow to (what ``max_num_seqs`` bounds);
``num_waiting`` / ``num_swapped`` the unfinished groups in the heaps (kept, so stats never scan them).
"""

from __future__ import annotations

import bisect
import heapq

from scheduler.sequence import SequenceGroup, SequenceStatus

_RUNNING = SequenceStatus.RUNNING
_WAITING = SequenceStatus.WAITING
_SWAPPED = SequenceStatus.SWAPPED
_FINISHED = SequenceStatus.FINISHED


def _queue_key(g: SequenceGroup):
    return g.key


class RequestQueues:
    __slots__ = ("waiting", "swapped", "running", "num_running_seqs", "num_waiting", "num_swapped",
                 "_running_dirty")

    def __init__(self) -> None:
        self.waiting: list[SequenceGroup] = []  # heap by key (new + preempted by recompute)
        self.swapped: list[SequenceGroup] = []  # heap by key
        self.running: list[SequenceGroup] = []  # sorted by key
        self.num_running_seqs = 0  # sum of max_num_seqs of the running groups
        self.num_waiting = 0  # unfinished groups in the waiting heap (finished ones leave it lazily)
        self.num_swapped = 0  # unfinished groups in the swapped heap
        self._running_dirty = False  # a running group finished: drop it at the end of the update

    # ------------------------------------------------------------------ waiting / swapped
    def push_waiting(self, g: SequenceGroup) -> None:
        heapq.heappush(self.waiting, g)
        self.num_waiting += 1

    def push_swapped(self, g: SequenceGroup) -> None:
        heapq.heappush(self.swapped, g)
        self.num_swapped += 1

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
        if swapped:
            self.num_swapped -= 1
            return heapq.heappop(self.swapped)
        self.num_waiting -= 1
        return heapq.heappop(self.waiting)

    def remove(self, g: SequenceGroup) -> None:
        """``g`` ends outside a step's results (abort, a failed step, capacity): off the running list now,
        out of a heap when it reaches the head. Call before its status becomes FINISHED."""
        if g.status is _RUNNING:
            self.stop_running(g)
        elif g.status is _WAITING:
            self.num_waiting -= 1
        elif g.status is _SWAPPED:
            self.num_swapped -= 1

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

    def check_counts(self) -> None:
        """AssertionError when a counter differs from the queues (tests)."""
        assert self.num_waiting == sum(1 for g in self.waiting if g.status is not _FINISHED), "num_waiting"
        assert self.num_swapped == sum(1 for g in self.swapped if g.status is not _FINISHED), "num_swapped"
        assert self.num_running_seqs == sum(g.max_num_seqs for g in self.running), "num_running_seqs"
