"""The one way the fleet builds a Celery app (housekeeping, the Batch API's workers): broker on the fleet's
Redis, JSON only (never pickle: a message is data, not code), UTC, Celery's logs like every other service's.

Celery's 20-line warning about a worker running as root is about pickle (a root worker accepting pickle runs
whatever a message says); these apps accept JSON only and Celery still refuses pickle as root, so in a
container running as root the warning says nothing: it is silenced the documented `warnings` way."""

from __future__ import annotations

import warnings
from typing import Any

from celery import Celery
from celery.exceptions import SecurityWarning
from celery.signals import setup_logging as celery_setup_logging

from protocol import logs

warnings.filterwarnings("ignore", category=SecurityWarning)

JSON_ONLY = dict(task_serializer="json", result_serializer="json", accept_content=["json"],
                 result_accept_content=["json"], event_serializer="json")


def json_celery_app(name: str, redis_url: str, *, log_level: str, log_format: str, backend: bool = False,
                    **conf: Any) -> Celery:
    """A Celery app on ``redis_url`` that speaks JSON only; ``conf`` adds to (never overrides) JSON_ONLY."""
    app = Celery(name, broker=redis_url, backend=redis_url if backend else None)
    app.conf.update(timezone="UTC", enable_utc=True, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True, **conf, **JSON_ONLY)

    @celery_setup_logging.connect(weak=False)
    def _setup_logging(loglevel=None, **_kw) -> None:
        logs.setup_logging(log_level if loglevel is None else loglevel, log_format)

    return app
