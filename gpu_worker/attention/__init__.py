from gpu_worker.attention.backend import AttentionBackend, get_backend
from gpu_worker.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]
