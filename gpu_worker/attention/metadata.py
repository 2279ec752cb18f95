"""Per-step attention metadata, built once per step by the model runner (all tensors on the device)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch


def host_to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device without a host sync: on CUDA through pinned memory (a copy from pageable
    memory makes the host wait until the stream has drained, so the next step could not be launched while
    the previous one runs)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: block * block_size + offset; -1 = padding (skipped)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative new-token counts
    max_query_len: int
    max_seq_len: int
    is_decode_only: bool
    block_size: int = 16
    # host copies, for backends that build their own index tensors once per step
    seq_lens_cpu: np.ndarray | None = None
    query_lens_cpu: np.ndarray | None = None
    block_tables_cpu: np.ndarray | None = None
    # decode-only steps: the order the decode kernel takes the sequences in (longest first), None = as batched
    decode_order: torch.Tensor | None = None
    # backend-specific per-step state (filled by AttentionBackend.prepare)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @classmethod
    def build(
        cls,
        seq_lens: Sequence[int] | np.ndarray,
        query_lens: Sequence[int] | np.ndarray,
        block_tables: Sequence[Sequence[int]] | np.ndarray,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """From host lists: context lengths after the step, new tokens per sequence, block tables."""
        seq_lens_np = np.asarray(seq_lens, dtype=np.int64)
        q_np = np.asarray(query_lens, dtype=np.int64)
        n = len(seq_lens_np)
        if isinstance(block_tables, np.ndarray):
            bt = block_tables.astype(np.int64, copy=False)
        else:
            width = max((len(t) for t in block_tables), default=0)
            bt = np.zeros((n, max(width, 1)), dtype=np.int64)
            for i, t in enumerate(block_tables):
                if t:
                    bt[i, : len(t)] = t
        qsl = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q_np, out=qsl[1:])
        T = int(qsl[-1])
        # positions of the new tokens and their slots
        seq_of_tok = np.repeat(np.arange(n), q_np)
        pos = np.arange(T) - np.repeat(qsl[:-1], q_np) + np.repeat(seq_lens_np - q_np, q_np)
        slots = bt[seq_of_tok, pos // block_size] * block_size + pos % block_size
        return cls.from_numpy(slots, bt, seq_lens_np, q_np, qsl, block_size, device)

    @classmethod
    def from_numpy(cls, slots: np.ndarray, bt: np.ndarray, seq_lens: np.ndarray, q_lens: np.ndarray,
                   qsl: np.ndarray, block_size: int, device) -> "AttentionMetadata":
        dev = torch.device(device)
        return cls(
            slot_mapping=host_to_device(np.asarray(slots, dtype=np.int64), dev),
            block_tables=host_to_device(bt.astype(np.int32), dev),
            seq_lens=host_to_device(seq_lens.astype(np.int32), dev),
            query_start_loc=host_to_device(qsl.astype(np.int32), dev),
            max_query_len=int(q_lens.max()) if len(q_lens) else 0,
            max_seq_len=int(seq_lens.max()) if len(seq_lens) else 0,
            is_decode_only=bool(len(q_lens) and (q_lens == 1).all()),
            block_size=block_size,
            seq_lens_cpu=seq_lens,
            query_lens_cpu=q_lens,
            block_tables_cpu=bt,
        )
