"""Small building blocks of the models (our own code; transformers is only the test oracle)."""

from gpu_worker.layers.activation import SiluAndMul
from gpu_worker.layers.linear import Embedding, Linear
from gpu_worker.layers.norm import RMSNorm
from gpu_worker.layers.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq

__all__ = ["Embedding", "Linear", "RMSNorm", "RotaryEmbedding", "SiluAndMul", "apply_rotary", "compute_inv_freq"]
