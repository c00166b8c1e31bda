"""The per-slot state of a batch of decoder slots, and each step's decoder inputs built from it.

Every slot holds one caption. Its video's frames and tokens occupy the columns ``[start, S)`` of
the shared KV cache (kv_cache.py); the columns before ``start`` belong to earlier videos and are
hidden from the row by ``attention_mask``, and positions count from ``start``, so a row's
logits do not depend on what the other slots hold.
"""
from __future__ import annotations

import numpy as np

from .contract import DecoderInputs


class SlotState:
    def __init__(self, slots: int, max_new_tokens: int, pad_id: int):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.pad = pad_id
        self.max_new = max_new_tokens
        self.start = np.zeros(slots, np.int64)  # first cache column of each slot's video
        self.live = np.zeros(slots, bool)
        self.n_tokens = np.zeros(slots, np.int64)
        self.tokens = np.full((slots, max_new_tokens), pad_id, np.int64)

    @property
    def free(self) -> np.ndarray:
        """Indices of the slots without a caption in progress."""
        return np.flatnonzero(~self.live)

    def begin(self, rows: np.ndarray, start: int) -> None:
        """New captions in `rows`, their videos' frames at columns ``[start, S)``."""
        self.start[rows] = start
        self.n_tokens[rows] = 0
        self.tokens[rows] = self.pad
        self.live[rows] = True

    def record(self, rows: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        """Append each row's chosen token; end the captions that chose [PAD] or reached the
        length limit and return those rows."""
        self.tokens[rows, self.n_tokens[rows]] = chosen
        self.n_tokens[rows] += 1
        ended = rows[(chosen == self.pad) | (self.n_tokens[rows] == self.max_new)]
        self.live[ended] = False
        return ended

    def copy_rows(self, rows: np.ndarray, source_rows: np.ndarray) -> None:
        """Rows ``rows`` continue the captions of ``source_rows`` (of the same video)."""
        self.tokens[rows] = self.tokens[source_rows]
        self.n_tokens[rows] = self.n_tokens[source_rows]

    def first_live_column(self) -> int:
        """The oldest cache column a live caption still reads."""
        return int(self.start[self.live].min())

    def drop_columns(self, first: int) -> None:
        """The cache dropped its columns ``[0, first)``: every start moves left with it."""
        self.start -= first

    def step_inputs(self, length: int, n_embd: int) -> DecoderInputs:
        """The next token step over a cache of `length` columns: each live row feeds its last
        token at its own position; a free row computes a throwaway [PAD] that sees only its own
        new column."""
        self.start[~self.live] = length
        rows = np.arange(len(self.live))
        last = self.tokens[rows, np.maximum(self.n_tokens - 1, 0)]
        input_ids = np.where(self.live, last, self.pad)[:, None]  # (B, 1)
        positions = (length - self.start)[:, None]  # (B, 1)
        mask = (np.arange(length + 1)[None, :] >= self.start[:, None]).astype(np.int64)  # (B, S+1)
        return DecoderInputs.token_step(input_ids, positions, mask, n_embd)
