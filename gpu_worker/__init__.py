"""The worker half of PagedFleet: the model runner and everything under it (torch)."""

from gpu_worker.config import WorkerConfig
from gpu_worker.model_runner import ModelRunner

__all__ = ["ModelRunner", "WorkerConfig"]
