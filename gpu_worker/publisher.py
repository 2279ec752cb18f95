"""The worker's publishing thread: waits for each launched step's result, in launch order, and publishes it.

The main loop only reads plans and launches them (``ModelRunner.launch``), so the next plan is on the GPU
while the result of the one before is still coming back: the GPU never waits on Redis. Each result goes out
with its plan's ack in one transaction; metrics are observed here too.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable

from protocol import StepPlan, StepResult
from gpu_worker.tp_group import GroupLost

log = logging.getLogger("pagedfleet.worker")


class ResultPublisher:
    def __init__(self, publish: Callable[[StepResult, str], None], worker_id: str, on_group_lost: Callable[[], None],
                 observe: Callable[[StepPlan, float, dict], None] | None = None):
        self._publish, self._observe, self._on_group_lost = publish, observe, on_group_lost
        self.worker_id = worker_id
        self._q: queue.Queue = queue.Queue(maxsize=4)  # the scheduler keeps at most 1 + lookahead plans in flight
        self._thread = threading.Thread(target=self._loop, name="publish-results", daemon=True)
        self._thread.start()

    def submit(self, step: Any, entry_id: str, plan: StepPlan | None, t0: float, transfers: dict) -> None:
        """``step``: a launched step (its ``result()``), or a StepResult that is already known."""
        self._q.put((step, entry_id, plan, t0, transfers))

    def idle(self) -> bool:
        """Nothing launched waits to be published (the worker may re-read its pending plans)."""
        return self._q.unfinished_tasks == 0

    def flush(self) -> None:
        self._q.join()

    def _loop(self) -> None:
        while True:
            step, entry_id, plan, t0, transfers = self._q.get()
            try:
                self._one(step, entry_id, plan, t0, transfers)
            finally:
                self._q.task_done()

    def failure(self, step_id: int, e: BaseException) -> StepResult:
        """A step that raised (launching or waiting for it): the step's error result. A lost tensor-parallel
        group is not the step's fault: unregister (the scheduler resumes its requests on another worker) and exit."""
        if isinstance(e, GroupLost):
            log.error("step %s: %s: unregistering and exiting", step_id, e)
            self._on_group_lost()
            os._exit(1)
        log.error("step %s failed", step_id, exc_info=e)
        return StepResult(worker_id=self.worker_id, step_id=step_id, error=f"{type(e).__name__}: {e}")

    def _one(self, step: Any, entry_id: str, plan: StepPlan | None, t0: float, transfers: dict) -> None:
        if isinstance(step, StepResult):
            result = step
        else:
            try:
                result = step.result()
                result.worker_id = self.worker_id
            except Exception as e:
                result, plan = self.failure(plan.step_id if plan else -1, e), None
        dt = time.perf_counter() - t0
        if not result.execute_ms:
            result.execute_ms = dt * 1000.0
        self._publish(result, entry_id)
        if self._observe is not None and plan is not None:
            try:
                self._observe(plan, dt, transfers)
            except Exception:  # pragma: no cover - metrics must never stop a worker
                pass
