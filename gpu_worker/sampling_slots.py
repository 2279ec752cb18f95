"""The live sequences' sampling parameters as one persistent table, a column per block-table row.

Written once when a sequence is placed on the worker (new or forked), uploaded to the device once in a
step that placed some (a few KB); a sampling step then gathers its rows' temperature, top-p, min-p and
penalties with one index instead of building a tensor per parameter from the requests every step.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from protocol import SamplingParams

FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_INDEX = {name: i for i, name in enumerate(FIELDS)}


class SamplingSlots:
    def __init__(self, device: torch.device):
        self.device = device
        self.host = np.zeros((len(FIELDS), 0), dtype=np.float32)
        self._dev = torch.zeros((len(FIELDS), 0), dtype=torch.float32, device=device)
        self._dirty = False

    def write(self, row: int, p: SamplingParams) -> None:
        n = self.host.shape[1]
        if row >= n:
            grown = np.zeros((len(FIELDS), max(row + 1, 2 * n, 64)), dtype=np.float32)
            grown[:, :n] = self.host
            self.host = grown
        # float32, as torch.tensor(python floats, dtype=float32) rounds them
        self.host[:, row] = [getattr(p, name) for name in FIELDS]
        self._dirty = True

    def table(self) -> torch.Tensor:
        """[len(FIELDS), rows] float32 on the device, current."""
        if self._dirty:
            self._dev = torch.from_numpy(self.host.copy()).to(self.device)
            self._dirty = False
        return self._dev


class RowParams:
    """Sampling parameters of a batch of requests as device tensors: gathered from the worker's
    SamplingSlots (``rows``: each request's row), or, without them, built from the requests' params."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device, slots: SamplingSlots | None = None,
                 rows: torch.Tensor | None = None):
        self.params, self.device, self.slots, self.rows = params, device, slots, rows

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[n] tensor of parameter ``name`` (one of FIELDS)."""
        if self.rows is not None:
            return self.slots.table()[_INDEX[name]].index_select(0, self.rows).to(dtype)
        return torch.tensor([getattr(p, name) for p in self.params], device=self.device, dtype=dtype)
