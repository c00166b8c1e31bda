"""The decoder's KV cache for a pool of batch slots, preallocated once and never reallocated.

The decoder graph appends this step's keys/values to the past and returns the result as
``present.*`` (contract.py), so the graph itself copies the cache once per step. Everything else
is kept copy-free: two flat buffers per cache tensor, sized to the capacity, take turns as past
and present (the backend writes each step's present straight into the other buffer), and a
``(B, nh, S, hs)`` view over the first ``B*nh*S*hs`` elements of a flat buffer is contiguous,
so the graph reads and writes these views in place whatever the current length S.

Rows are slots that different videos pass through: a slot's video occupies the columns
``[start, S)``; the columns before ``start`` are masked out (``attention_mask`` 0). Because every
row gains one column per step, S grows until ``compact`` drops the columns no live row needs.
"""
from __future__ import annotations

import numpy as np


class SlotCache:
    def __init__(self, n_tensors: int, batch: int, n_head: int, head_dim: int, capacity: int,
                 length: int = 0):
        """``length``: columns to start with (zeros, to be masked), so that the first videos'
        prefixes can be written into the last columns like every later one."""
        self.batch, self.n_head, self.head_dim, self.capacity = batch, n_head, head_dim, capacity
        size = batch * n_head * capacity * head_dim
        # Zeros, not empty: masked columns get attention weight exactly 0, and 0 * NaN from
        # uninitialised memory would still poison a row.
        self._buffers = [[np.zeros(size, np.float32) for _ in range(n_tensors)] for _ in range(2)]
        self._current = 0
        self.length = length  # S: columns in use, the same for every row

    def _views(self, side: int, length: int) -> list[np.ndarray]:
        shape = (self.batch, self.n_head, length, self.head_dim)
        n = self.batch * self.n_head * length * self.head_dim
        return [flat[:n].reshape(shape) for flat in self._buffers[side]]

    def past(self) -> list[np.ndarray]:
        """The cache as the next step's past: (B, nh, S, hs) per tensor, in contract order."""
        return self._views(self._current, self.length)

    def next_present(self, new_columns: int = 1) -> list[np.ndarray]:
        """Where the next step writes its present (S + new_columns columns); call `advance` after."""
        if self.length + new_columns > self.capacity:
            raise ValueError(f"cache full: {self.length} + {new_columns} columns > capacity {self.capacity}")
        return self._views(1 - self._current, self.length + new_columns)

    def advance(self, new_columns: int = 1) -> None:
        self._current = 1 - self._current
        self.length += new_columns

    def write_rows(self, rows: np.ndarray, source_rows: np.ndarray, kv: list[np.ndarray]) -> None:
        """Put ``kv[i][source_rows]`` (n, nh, L, hs) into the last L columns of ``rows``."""
        L = kv[0].shape[2]
        for dst, src in zip(self.past(), kv):
            dst[rows, :, self.length - L:, :] = src[source_rows]

    def copy_rows(self, rows: np.ndarray, source_rows: np.ndarray, first_column: int = 0) -> None:
        """Rows ``rows`` take the columns ``[first_column, S)`` of ``source_rows`` (beam search's
        reorder), in place; a row may be both read and written (the sources are read first)."""
        for t in self.past():
            t[rows, :, first_column:] = t[source_rows, :, first_column:]

    def compact(self, first: int) -> None:
        """Drop columns ``[0, first)``: one copy into the other buffer, then swap."""
        if first <= 0:
            return
        kept = self.length - first
        for dst, src in zip(self._views(1 - self._current, kept), self.past()):
            dst[...] = src[:, :, first:, :]
        self._current = 1 - self._current
        self.length = kept
