"""The decoder side of a pool of caption slots: the KV cache, wherever it lives, and the steps.

The generator (generator.py) decides which slot holds which caption and which token each caption
takes next; a ``SlotDecoder`` holds the slots' KV cache and runs the decoder over it.

The cache is one fixed-length buffer per cache tensor, ``(slots, nh, cache_len, hs)``, in which
a row's column c holds position c (contract.py). A prefill writes a video's frames into columns
``[0, F)``; each step feeds every live row its last token at its position and writes the
returned key/value into that column, in place. Nothing is ever compacted or reallocated, and a
row never reads a column at or past its position, so whatever an earlier video left there is
harmless. ``BoundSlotDecoder`` keeps these buffers wherever the backend's graphs run (host numpy
for ONNX Runtime on the CPU, device arrays for a GPU runtime) and binds views of them to the
graphs; a backend with its own way (``torch-fast``'s CUDA graphs over PyTorch buffers) brings its
own ``SlotDecoder``.

Every method takes slot indices as numpy int64 arrays. Only the rows ``[0, active)`` with
``active = 1 + the highest live slot`` are stepped (rounded up to a batch bucket where the backend
captures a graph per shape), so a lightly loaded pool costs what its live captions cost; new
videos take the lowest free slots (``SlotState.free`` is sorted), which keeps the live rows packed
at the front, and the first ``n`` rows of a ``(slots, ...)`` buffer are one contiguous block.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError
from .contract import cache_len


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


def bucket(active: int, slots: int) -> int:
    """Rows to run for `active` live rows where a graph is captured per batch shape: the next
    power of two, at most `slots`, so a few shapes cover every load at under 2x the rows needed."""
    return min(slots, 1 << max(0, active - 1).bit_length())


def to_host(xp, array) -> np.ndarray:
    """An array of the array module `xp` (numpy, or a device module such as CuPy) in host memory."""
    return array if xp is np else xp.asnumpy(array)


def _columns(backend, frame_num: int, max_new_tokens: int) -> int:
    """KV columns of the slot buffers: what `frame_num` frames and captions of `max_new_tokens`
    need, or the backend's ``fixed_cache_len`` (ConfigError when that is too few)."""
    needed = cache_len(backend.config, frame_num, max_new_tokens)
    fixed = getattr(backend, "fixed_cache_len", None)
    if fixed is None:
        return needed
    if needed > fixed:
        raise ConfigError(f"captions of up to {max_new_tokens} tokens after {frame_num} frames need {needed} KV "
                          f"cache columns, and the {backend.name} backend's decode graph has {fixed}: ask for "
                          f"captions of at most {fixed - frame_num} tokens (text_len), or run the ONNX graphs with "
                          "--backend ort --device cuda")
    return fixed


class BoundSlotDecoder:
    """The fixed-length KV buffers in the memory of the backend's graphs, bound to its prefill
    and decode (``Backend.prefill`` / ``Backend.decode``): ``backend.xp`` is the array module of
    that memory. Only the token ids of greedy rows leave it each step, unless a search asks for
    logits. The buffers have the columns the captions need, or the backend's ``fixed_cache_len``
    where its decode graph takes no other length (a TensorRT engine)."""

    def __init__(self, backend, slots: int, frame_num: int, max_new_tokens: int):
        cfg, xp = backend.config, backend.xp
        self.backend, self.xp, self.slots, self.frame_num = backend, xp, slots, frame_num
        self.cache_len = _columns(backend, frame_num, max_new_tokens)
        # A row's position is fed to the graph clamped to the position table, for rows whose
        # caption ran to the length limit and are no longer live (they write nothing).
        self.max_pos = min(self.cache_len, cfg.block_size) - 1
        shape = (slots, cfg.n_head, self.cache_len, cfg.head_dim)
        # One buffer for every cache tensor, (2 n_layer, slots, ...): each tensor's rows [0, n)
        # are one contiguous block to bind, and a step's new columns are written for all of them
        # in one indexing operation. Zeros, not empty: a column no row may see still gets
        # attention weight exactly 0, and 0 * NaN from uninitialised memory would poison the row.
        self.kv = xp.zeros((2 * cfg.n_layer, *shape), np.float32)
        self.new = xp.zeros((2 * cfg.n_layer, slots, cfg.n_head, 1, cfg.head_dim), np.float32)
        self.out = xp.zeros((slots, cfg.vocab_size), np.float32)  # each row's latest logits
        self.feed = xp.zeros((2, slots, 1), np.int64)  # token and position of each row
        self.pos = np.zeros(slots, np.int64)  # columns each row holds, on the host
        self.buckets = bool(getattr(backend, "batch_buckets", False))
        self._bound: dict[int, tuple] = {}

    def _views(self, n: int) -> tuple:
        """The decode arguments for rows [0, n): the same objects over the same memory at every
        step of that size, so a backend may keep what it bound for them."""
        if n not in self._bound:
            self._bound[n] = (self.feed[0, :n], self.feed[1, :n], [t[:n] for t in self.kv], self.out[:n],
                              [t[:n] for t in self.new])
        return self._bound[n]

    def prefill(self, rows: np.ndarray, prefix: Any, source: np.ndarray) -> None:
        cfg, xp = self.backend.config, self.xp
        k, n_frames, _ = prefix.shape
        if n_frames != self.frame_num:
            raise ValueError(f"videos have {n_frames} frames, the first ones had {self.frame_num}")
        logits = xp.empty((k, cfg.vocab_size), np.float32)
        kv = xp.empty((len(self.kv), k, cfg.n_head, n_frames, cfg.head_dim), np.float32)
        self.backend.prefill(xp.ascontiguousarray(xp.asarray(prefix, dtype=np.float32)), logits, list(kv))
        r, s = xp.asarray(rows), xp.asarray(source)
        self.kv[:, r, :, :n_frames] = kv[:, s]
        self.out[r] = logits[s]
        self.pos[rows] = n_frames

    def step(self, tokens: np.ndarray, live: np.ndarray) -> None:
        active = active_rows(live)
        if active == 0:
            return
        n = bucket(active, self.slots) if self.buckets else active
        feed = np.stack([np.where(live[:n], tokens[:n], self.backend.config.pad_id),
                         np.minimum(self.pos[:n], self.max_pos)])[:, :, None]
        self.feed[:, :n] = self.xp.asarray(feed)
        self.backend.decode(*self._views(n))
        rows = np.flatnonzero(live)
        r, c = self.xp.asarray(rows), self.xp.asarray(self.pos[rows])
        # Row r[i]'s new key/value into its column c[i], in every cache tensor at once.
        self.kv[:, r, :, c] = self.new[:, r, :, 0]
        self.pos[rows] += 1

    def copy_rows(self, rows: np.ndarray, source_rows: np.ndarray) -> None:
        r, s = self.xp.asarray(rows), self.xp.asarray(source_rows)
        self.kv[:, r] = self.kv[:, s]  # the gather on the right is a copy: sources are read first
        self.pos[rows] = self.pos[source_rows]

    def logits(self, rows: np.ndarray) -> np.ndarray:
        return to_host(self.xp, self.out[self.xp.asarray(rows)])

    def argmax(self, rows: np.ndarray) -> np.ndarray:
        return to_host(self.xp, self.out[self.xp.asarray(rows)].argmax(axis=-1))
