"""The decoder side of a pool of caption slots: the KV cache, wherever it lives, and the steps.

The generator (generator.py) decides which slot holds which caption and which token each caption
takes next; a ``SlotDecoder`` holds the slots' KV cache and runs the decoder over it. Keeping the
two apart lets a backend keep its cache where its graphs run: ``HostSlotDecoder`` keeps it in host
memory and runs the contract's decoder graph (``Backend.decoder_step``, ONNX Runtime on CPU and the
PyTorch reference), while a GPU backend keeps a fixed-length cache on the device, writes each new
column in place, replays a captured CUDA graph per batch bucket, and sends back only what a search
asks for (token ids for greedy rows, logits for the others).

Every method takes slot indices as numpy int64 arrays. Only the rows ``[0, active)`` with
``active = 1 + the highest live slot`` are stepped, so a lightly loaded pool costs what its live
captions cost; new videos take the lowest free slots (``SlotState.free`` is sorted), which keeps
the live rows packed at the front.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .contract import DecoderInputs
from .kv_cache import SlotCache


class SlotDecoder(Protocol):
    slots: int
    frame_num: int  # frames per video, fixed by the first videos (the cache's layout depends on it)

    def prefill(self, rows: np.ndarray, prefix: Any, source: np.ndarray) -> None:
        """Rows `rows` begin captions: row ``rows[i]`` of the video whose frame embeddings are
        ``prefix[source[i]]`` (prefix (k, F, E), what the backend's ``encode_frames`` returned,
        reshaped). Afterwards their logits predict each caption's first token."""

    def step(self, tokens: np.ndarray, live: np.ndarray) -> None:
        """Feed every live row its caption's last token (tokens (slots,) int64, live (slots,)
        bool); afterwards their logits predict the next one. Rows that are not live compute
        nothing that a later caption can see."""

    def copy_rows(self, rows: np.ndarray, source_rows: np.ndarray) -> None:
        """Rows `rows` continue the captions of `source_rows` (beam search's reorder), in place;
        a row may be both read and written (the sources are read first)."""

    def logits(self, rows: np.ndarray) -> np.ndarray:
        """(n, V) float32 host logits of `rows` after the last prefill or step."""

    def argmax(self, rows: np.ndarray) -> np.ndarray:
        """(n,) int64 greedy tokens of `rows`: only ids cross to the host."""


def active_rows(live: np.ndarray) -> int:
    """Rows a step must run: up to and including the highest live slot."""
    idx = np.flatnonzero(live)
    return int(idx[-1]) + 1 if len(idx) else 0


def cache_slack(span: int) -> int:
    """Columns beyond the longest caption's span before the host cache is compacted. Every step
    reads all columns, masked ones included (measured: +10 % step time from 36 to 72 columns at 32
    slots), and each compaction copies the cache once: a quarter span keeps both small."""
    return max(4, span // 4)


class HostSlotDecoder:
    """The KV cache in host memory (kv_cache.SlotCache) and ``Backend.decoder_step`` over it.

    Every row shares the cache's column axis: a slot's video occupies the columns ``[start, S)``,
    the columns before ``start`` belong to earlier videos and are hidden from the row by the
    attention mask, and positions count from ``start``, so a row's logits do not depend on what the
    other slots hold. Each step adds one column to every row; when the cache is full, the columns
    no live row reads are dropped (``SlotCache.compact``)."""

    def __init__(self, backend, slots: int, frame_num: int, max_new_tokens: int):
        cfg = backend.config
        self.backend, self.slots, self.frame_num = backend, slots, frame_num
        span = frame_num + max_new_tokens
        self.cache = SlotCache(2 * cfg.n_layer, slots, cfg.n_head, cfg.head_dim, span + cache_slack(span),
                               length=frame_num)
        self.start = np.full(slots, frame_num, np.int64)  # first cache column of each slot's video
        self._live = np.zeros(slots, bool)  # rows holding a caption, as of the last prefill or step
        self._logits = np.zeros((slots, cfg.vocab_size), np.float32)

    def prefill(self, rows: np.ndarray, prefix: np.ndarray, source: np.ndarray) -> None:
        cfg = self.backend.config
        k, F, _ = prefix.shape
        empty = np.zeros((k, cfg.n_head, 0, cfg.head_dim), np.float32)
        kv = [np.empty((k, cfg.n_head, F, cfg.head_dim), np.float32) for _ in range(2 * cfg.n_layer)]
        logits = self.backend.decoder_step(DecoderInputs.prefix_step(np.asarray(prefix)), [empty] * len(kv), kv)
        self.cache.write_rows(rows, source, kv)
        self.start[rows] = self.cache.length - F
        self._live[rows] = True
        self._logits[rows] = logits[source]

    def step(self, tokens: np.ndarray, live: np.ndarray) -> None:
        self._live = live.copy()
        active = active_rows(live)
        if active == 0:
            return
        if self.cache.length + 1 > self.cache.capacity:
            first = int(self.start[live].min())
            self.cache.compact(first)
            self.start -= first
        length = self.cache.length
        # A row that is not live computes a throwaway token that sees only its own new column.
        self.start[~live] = length
        start = self.start[:active]
        input_ids = np.where(live[:active], tokens[:active], self.backend.config.pad_id)[:, None]
        positions = (length - start)[:, None]
        mask = (np.arange(length + 1)[None, :] >= start[:, None]).astype(np.int64)  # (active, S+1)
        inputs = DecoderInputs.token_step(input_ids, positions, mask, self.backend.config.n_embd)
        # The first `active` rows of a (B, nh, S, hs) view are contiguous: the step reads and
        # writes them in place. Rows past `active` hold no caption; the columns they would have
        # gained are never read, since a new video's rows see only from its own start.
        past = [t[:active] for t in self.cache.past()]
        present = [t[:active] for t in self.cache.next_present()]
        self._logits[:active] = self.backend.decoder_step(inputs, past, present)
        self.cache.advance()

    def copy_rows(self, rows: np.ndarray, source_rows: np.ndarray) -> None:
        # Every column a source row reads is copied (from the earliest source start); the
        # columns before it are masked for the rows that take them, so copying those is harmless.
        self.cache.copy_rows(rows, source_rows, first_column=int(self.start[source_rows].min()))
        self.start[rows] = self.start[source_rows]

    def logits(self, rows: np.ndarray) -> np.ndarray:
        return self._logits[rows]

    def argmax(self, rows: np.ndarray) -> np.ndarray:
        return self._logits[rows].argmax(axis=-1)
