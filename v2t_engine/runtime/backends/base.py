"""What the generator needs from a backend, and how backends are found.

A backend runs the two graphs of the contract (contract.py): the frame encoder, and one decoder
step that reads the KV cache from the caller's ``past`` arrays and writes the extended cache into
the caller's ``present`` arrays (kv_cache.py owns those buffers). Everything else (search, the
generator, detokenizing) is shared by all backends.

A backend whose decoder runs elsewhere than host memory (a GPU) also has
``slot_decoder(slots, frame_num, max_new_tokens)``, which returns its own
``slot_decoder.SlotDecoder``: the generator then leaves the KV cache with it. Without that method
the generator keeps the cache in host memory and calls ``decoder_step`` (``HostSlotDecoder``).
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
    precision: str  # what it computes in: fp32, bf16, fp16 or an export's int8 variant

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None, verify: bool = False,
                 precision: str | None = None):
        """Load what `path` holds; `verify` checks file digests where the format records them.
        `precision` asks for a compute precision where the backend chooses one at load time
        (None: the backend's default); a backend whose precision is fixed by its files refuses
        another one."""

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """True when `path` holds what this backend loads (its `auto` choice)."""

    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """frames (N, 3, S, S): uint8 crops (``preprocess.crop_frame``), normalized by the
        backend exactly as ``preprocess.normalize`` does, or float32 already CLIP-normalized →
        embeddings (N, n_embd) float32. Uint8 is the production form: a quarter of the bytes to
        move, and a GPU backend normalizes on the device."""

    def decoder_step(self, inputs: DecoderInputs, past: Sequence[np.ndarray],
                     present: Sequence[np.ndarray]) -> np.ndarray:
        """One decoder step → last-position logits (B, V) float32. ``past``: (B, nh, S, hs) per
        cache tensor, in contract order; ``present``: float32 C-contiguous arrays of
        (B, nh, S + step_len, hs) that receive the extended cache."""
