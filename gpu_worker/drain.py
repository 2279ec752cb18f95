"""Draining a worker (SIGTERM, e.g. Kubernetes scaling down): it re-registers with ``draining: true``, so the
scheduler places nothing new on it (scheduler/server/placement.py); it keeps executing plans until no
accepted request is placed on it any more (``pf:active`` names each unfinished request's worker), then
stops; at once if no scheduler holds the lease (the fleet is stopping: nobody would finish them). Past
``drain_timeout_s`` it stops anyway: it unregisters, the scheduler declares it gone and resumes
what it still had on other workers (recompute), so nothing is lost either way. A second SIGTERM (or SIGINT)
stops at once, the same way."""

from __future__ import annotations

import logging
import threading
import time

from protocol import streams as S
from protocol.redis_conn import sync_client

log = logging.getLogger("pagedfleet.worker")

POLL_S = 0.25
SETTLE_S = 1.0  # the scheduler sees the flag within its monitor interval; placements made before it show by then

class Drain:
    def __init__(self, svc, timeout_s: float):
        self.svc = svc
        self.timeout_s = timeout_s
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin draining in a thread (called from the signal handler); a second call stops at once."""
        if self._thread is not None or self.svc.runner is None:
            self.svc.stop.set()
            return
        self._thread = threading.Thread(target=self.run, name="drain", daemon=True)
        self._thread.start()

    def run(self) -> None:
        svc = self.svc
        try:
            self.mark_draining()
            deadline = time.monotonic() + self.timeout_s
            time.sleep(SETTLE_S)
            idle_checks = 0
            while idle_checks < 2 and not svc.stop.is_set():  # two empty looks, POLL_S apart
                left = self.placed_requests()
                if left is None:  # the fleet is stopping (or failing over): whoever takes over resumes the rest
                    log.info("worker %s: no scheduler holds the lease; stopping", svc.worker_id)
                    break
                idle_checks = idle_checks + 1 if left == 0 else 0
                if time.monotonic() > deadline:
                    log.warning("drain timeout: handing %d request(s) back to the scheduler", left)
                    break
                time.sleep(POLL_S)
            else:
                log.info("worker %s drained: no request left", svc.worker_id)
        except Exception as e:  # Redis gone: stopping hands everything back all the same
            log.warning("drain: %s; stopping", e)
        svc.stop.set()

    def mark_draining(self) -> None:
        svc = self.svc
        svc.draining = True
        reg = svc.registration(svc.metrics_url)
        reg.registered_at = S.WorkerRegistration.model_validate_json(svc._reg_json).registered_at
        svc._reg_json = reg.model_dump_json()  # before the write: the heartbeat compares against it
        svc.r.hset(S.WORKERS, svc.worker_id, svc._reg_json)
        log.info("worker %s draining: no new requests; finishing %s running (timeout %.0f s)", svc.worker_id,
                 self.placed_requests(), self.timeout_s)

    def placed_requests(self) -> int | None:
        """How many accepted, unfinished requests the scheduler has placed on this worker (None: there is no
        scheduler to finish them)."""
        r = sync_client(self.svc.args.redis_url, decode_responses=True)
        try:
            if not r.exists(S.SCHEDULER_INFO):
                return None
            n = 0
            for raw in r.hvals(S.ACTIVE):
                try:
                    n += S.ActiveRequest.model_validate_json(raw).worker_id == self.svc.worker_id
                except ValueError:
                    continue
            return n
        finally:
            r.close()
