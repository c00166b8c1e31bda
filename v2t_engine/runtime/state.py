"""The per-slot state of a batch of decoder slots: which slots are live and the tokens written.

Every slot holds one caption; where its video's frames and tokens sit in the KV cache is the slot
decoder's business (slot_decoder.py).
"""
from __future__ import annotations

import numpy as np


class SlotState:
    def __init__(self, slots: int, max_new_tokens: int, pad_id: int):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.pad = pad_id
        self.max_new = max_new_tokens
        self.live = np.zeros(slots, bool)
        self.n_tokens = np.zeros(slots, np.int64)
        self.tokens = np.full((slots, max_new_tokens), pad_id, np.int64)

    @property
    def free(self) -> np.ndarray:
        """Indices of the slots without a caption in progress."""
        return np.flatnonzero(~self.live)

    def begin(self, rows: np.ndarray) -> None:
        """New captions in `rows`."""
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

    def last_tokens(self) -> np.ndarray:
        """(slots,) each slot's latest token ([PAD] for a slot that has none yet)."""
        return self.tokens[np.arange(len(self.live)), np.maximum(self.n_tokens - 1, 0)]
