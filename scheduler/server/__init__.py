"""The scheduler service's process around the pure core (``scheduler.Scheduler``), one concern a file:

    config.py        SchedulerSettings: environment (PAGEDFLEET_*) and command line from one declaration
    state.py         what the service tracks: a request (ReqState), a worker (WorkerHandle, its plans in flight)
    registry.py      the scheduler lease, worker registrations and heartbeats (births and deaths)
    placement.py     which live worker a request goes to
    intake.py        the requests stream: add / abort commands, dead letters
    step_loop.py     the per-worker loop: schedule -> StepPlan -> StepResult -> update; results matched by step id
    publishing.py    each step's deltas written to Redis in the background, in order per worker
    recovery.py      dead workers' requests resumed elsewhere; a restarted scheduler resumes pf:active
    stream_trim.py   bounded streams without dropping an unacknowledged entry (also used by housekeeping)
    metrics.py       SchedulerMetrics (Prometheus); metrics_http.py: /metrics, /sd, /block-map
    http.py          the service's HTTP routes
    housekeeping.py  the Celery janitor (its own process: ``celery -A scheduler.server.housekeeping``)

``scheduler/service.py`` wires them (``python -m scheduler.service``).
"""
