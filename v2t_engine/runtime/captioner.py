"""The Python API: load an export (or a checkpoint) once, caption videos.

    from v2t_engine import Captioner
    cap = Captioner.load("export_dir")
    captions = cap.caption_pixels(pixels)  # (B, F, 3, S, S) uint8 crops → [[caption, ...], ...]
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..tokenizer import CaptionTokenizer
from .backends import load_backend
from .backends.base import Backend
from .generator import generate_candidates, stream_captions
from .search import SearchOptions


class Captioner:
    def __init__(self, backend: Backend, tokenizer: CaptionTokenizer | None = None):
        self.backend = backend
        self.tokenizer = tokenizer or backend.tokenizer
        self.config = backend.config

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str = "cpu",
             threads: int | None = None, verify: bool = False, precision: str | None = None) -> "Captioner":
        """An export directory runs on ONNX Runtime (on TensorRT with device "cuda" where it
        holds engines this machine can run), a training checkpoint on the PyTorch reference (with
        the training extra installed); `backend` names one instead. `verify` checks the SHA-256
        of the export's files against its manifest."""
        return cls(load_backend(path, backend, device, threads, verify, precision))

    def max_new_tokens(self, text_len: int | None) -> int:
        """Caption length limit: the model's text_len unless a shorter one is asked for. Longer is
        possible up to the position table, but the model never saw captions that long."""
        cfg = self.config
        if text_len is None:
            return cfg.text_len
        limit = cfg.block_size - cfg.frame_num
        if not 1 <= text_len <= limit:
            raise ConfigError(f"text_len={text_len} must be between 1 and {limit} for this model")
        return text_len

    def generate_ids(self, pixels: np.ndarray, opts: SearchOptions = SearchOptions(),
                     rng: np.random.Generator | None = None, text_len: int | None = None) -> np.ndarray:
        """pixels (B, F, 3, S, S), uint8 crops or CLIP-normalized float32 → token ids (B, num_return, T)."""
        if rng is None:
            rng = np.random.default_rng(opts.seed)
        return generate_candidates(self.backend, pixels, opts, rng, self.max_new_tokens(text_len))

    def caption_pixels(self, pixels: np.ndarray, opts: SearchOptions = SearchOptions(),
                       rng: np.random.Generator | None = None, text_len: int | None = None) -> list[list[str]]:
        return [self.decode_candidates(video) for video in self.generate_ids(pixels, opts, rng, text_len)]

    def caption_stream(self, videos: Iterable[tuple[Any, np.ndarray]], opts: SearchOptions = SearchOptions(),
                       text_len: int | None = None, slots: int = 8) -> Iterator[tuple[Any, list[str]]]:
        """(key, pixels (F, 3, S, S) uint8 crops) → (key, captions) in the order captions
        finish, with continuous batching of `slots` videos at a time (generator.py): each takes
        opts.rows_per_video decoder rows (1 greedy, num_return sampled, num_beams beams).
        opts.seed keys the sampling. Videos are read lazily, as slots free up."""
        rows = slots * opts.rows_per_video
        stream = stream_captions(self.backend, videos, opts, self.max_new_tokens(text_len), rows, opts.seed)
        for key, ids in stream:
            yield key, self.decode_candidates(ids)

    def decode_candidates(self, ids: np.ndarray) -> list[str]:
        """Token ids (n, T) of one video → its n captions."""
        return [self.tokenizer.decode(c) for c in ids.tolist()]
