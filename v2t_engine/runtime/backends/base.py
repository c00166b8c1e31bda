"""What the generator needs from a backend, and how backends are found.

A backend runs the two graphs of the contract (contract.py): the frame encoder, and one decoder
step that reads the KV cache from the caller's ``past`` arrays and writes the extended cache into
the caller's ``present`` arrays (kv_cache.py owns those buffers). Everything else (search, the
generator, detokenizing) is shared by all backends.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from ...config import ModelConfig
from ...tokenizer import CaptionTokenizer
from ..contract import DecoderInputs


class Backend(Protocol):
    name: ClassVar[str]
    loads: ClassVar[str]  # what `accepts`, for messages: "an export directory (manifest.json) ..."
    config: ModelConfig
    tokenizer: CaptionTokenizer

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, verify: bool = False):
        """Load what `path` holds; `verify` checks file digests where the format records them."""

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """True when `path` holds what this backend loads (its `auto` choice)."""

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """frames (N, 3, S, S) float32, CLIP-normalized → embeddings (N, n_embd) float32."""

    def decoder_step(self, inputs: DecoderInputs, past: Sequence[np.ndarray],
                     present: Sequence[np.ndarray]) -> np.ndarray:
        """One decoder step → last-position logits (B, V) float32. ``past``: (B, nh, S, hs) per
        cache tensor, in contract order; ``present``: float32 C-contiguous arrays of
        (B, nh, S + step_len, hs) that receive the extended cache."""
