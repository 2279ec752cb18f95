from gpu_worker.attention.backend import AttentionBackend
from gpu_worker.attention.metadata import AttentionMetadata
from gpu_worker.attention.registry import get_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]
